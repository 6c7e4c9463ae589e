"""Extraction in this process (`LocalEngine`): a DataLoader over the images, the decomposition
on the model's device, rows handed to the store's writer, checkpoints that a rerun resumes
from.

Nothing is lost or counted twice whenever the run stops: a Ctrl-C (SIGINT) that arrives while
a batch is being recorded or a checkpoint saved is held until that is done (`_Interrupts`), so
the statistics always hold exactly the rows that the progress record says are done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..datasets import ImageSet
from ..errors import InputError, UnreadableImageError
from ..models import Decomposer, encode_texts, load, tower_of
from ..store.images import TolerantImages, collate_readable
from ..store.reader import StoreReader
from ..store.writer import DECOMPOSED, StoreWriter
from .job import ExtractJob

__all__ = ["LocalEngine"]


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual, except inside a critical section, where it
    is held and raised when the section ends."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        """This handler for SIGINT while the block runs (main thread only: elsewhere Python
        delivers no signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class LocalEngine:
    """Runs the model in this process.

    Args:
        workers: DataLoader worker processes reading the images (0: read in this process).
        device: "cuda" when available, else "cpu", unless given.
        checkpoint_every: images between checkpoints (rounded up to whole batches).
    """

    workers: int = 2
    device: str | None = None
    checkpoint_every: int = 4096

    def __post_init__(self) -> None:
        if self.workers < 0 or self.checkpoint_every < 1:
            raise InputError(
                f"LocalEngine: workers >= 0 and checkpoint_every >= 1 expected, got "
                f"{self.workers} and {self.checkpoint_every}"
            )

    def extract(self, source: ImageSet, out: Path, job: ExtractJob) -> StoreReader:
        """`textspan.extract` in this process. `job.on_progress(files)` is called after each
        batch is recorded, with the number of image files done so far (before any
        checkpoint)."""
        net, preprocess, _ = load(
            job.model, pretrained=job.pretrained, device=self.device, precision=job.precision
        )
        device = next(net.parameters()).device
        interrupts = _Interrupts()
        with (
            StoreWriter.open(out, job.manifest(source, tower_of(net)), device=device) as writer,
            interrupts.installed(),
        ):
            with interrupts.critical():
                writer.absorb(strict=job.strict)  # rows another engine wrote
            print(
                f"textspan extract: {writer.manifest.count} images into {out} "
                f"({writer.files} done before)",
                flush=True,
            )
            self._run(writer, net, source, preprocess, job, interrupts)
            return writer.finish()

    def _run(
        self,
        writer: StoreWriter,
        net: Any,
        source: ImageSet,
        preprocess: Any,
        job: ExtractJob,
        interrupts: _Interrupts,
    ) -> None:
        from tqdm.auto import tqdm

        files = list(writer.manifest.files)
        device = next(net.parameters()).device
        every = max(1, -(-self.checkpoint_every // job.batch_size)) * job.batch_size
        loader = torch.utils.data.DataLoader(
            TolerantImages(source.root, files, preprocess, writer.files, source.reader),
            batch_size=job.batch_size,
            num_workers=self.workers,
            shuffle=False,
            collate_fn=collate_readable,
            pin_memory=device.type == "cuda",
        )
        first = writer.files
        bar = tqdm(
            total=len(files), initial=first, desc="extracting", unit="img", disable=not job.progress
        )
        try:
            with Decomposer(net) as decomposer:
                for batch in loader:
                    rows = {}
                    if batch.images is not None:
                        parts = decomposer.decompose(
                            batch.images.to(device, non_blocking=True),
                            convention=writer.manifest.convention,
                        )
                        rows = {k: getattr(parts, k) for k in DECOMPOSED}
                    stop = batch.unreadable[0] if job.strict and batch.unreadable else None
                    upto = batch.last + 1 if stop is None else stop[0]
                    with interrupts.critical():
                        writer.append(rows, batch.indices, unreadable=batch.unreadable, upto=upto)
                    bar.update(len(batch.indices) + len(batch.unreadable))
                    if stop is not None:
                        with interrupts.critical():
                            writer.checkpoint(failed=files[stop[0]])
                        raise UnreadableImageError(
                            f"{stop[1]} (--strict; the {writer.files} images before it are "
                            "saved: remove or repair it and rerun the same command to resume)"
                        )
                    job.report(writer.files)
                    if writer.unsaved_rows >= every:
                        with interrupts.critical():
                            writer.checkpoint()
            with interrupts.critical():
                writer.checkpoint()
        except KeyboardInterrupt:
            with interrupts.critical():
                writer.checkpoint()  # every recorded batch is kept
            bar.close()
            print(
                f"\ninterrupted after {writer.files} of {len(files)} images; rerun the same "
                "command to resume"
            )
            raise
        elapsed = bar.format_dict["elapsed"]
        bar.close()
        ran = writer.files - first
        speed = f" ({ran / elapsed:.1f} images/s)" if ran and elapsed > 0 else ""
        print(f"done: {writer.out}{speed}", flush=True)

    def encode_texts(self, model: Any, tokenizer: Any, texts: Any, *, batch_size: int,
                     progress: bool) -> Any:  # fmt: skip
        """Unit-norm text embeddings [M, D], in batches, in this process."""
        return encode_texts(model, tokenizer, texts, batch_size=batch_size, progress=progress)
