"""Extraction in this process: a DataLoader over the images, the decomposition on the model's
device, checkpoints that a rerun resumes from.

Nothing is lost or counted twice whenever the run stops: a Ctrl-C (SIGINT) that arrives while
a batch is being recorded or a checkpoint saved is held until that is done (`_Interrupts`), so
the statistics always hold exactly the rows that the progress record says are done.
"""

from __future__ import annotations

import json
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..datasets import ImageSet, manifest_of, open_images
from ..errors import InputError, StoreError, UnreadableImageError
from ..models import Decomposer, load, term_names, tower_of
from ..store.format import (
    Store,
    check_resume,
    checksum,
    create_arrays,
    disk_full,
    labels_of,
    load_progress,
    manifest_value,
    open_arrays,
    open_store,
    read_json,
    write_atomic,
    writer_lock,
)
from ..store.images import ReadableBatch, TolerantImages, collate_readable
from ..store.sums import DeviceStats, save_sums

__all__ = ["extract_local"]


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


class _Checkpoints:
    """The store being written: its arrays, its statistics, and how far it is done.

    `rows` rows are written (one per readable image, in file order) after `files` image files
    were consumed; progress only moves at a checkpoint, after the arrays are flushed and the
    statistics saved, so a store interrupted anywhere resumes from the last one."""

    def __init__(self, out: Path, manifest: dict[str, Any], device: Any):
        self.out = out
        if (out / "manifest.json").exists():
            old = read_json(out / "manifest.json", f"store {out}: manifest.json")
            state, sums = load_progress(out, old)
            failed = {state["failed"]} if state["failed"] else set()
            check_resume(old, manifest, set(state["skipped"]) | failed, out)
            for f in failed - set(manifest["files"]):  # removed since --strict stopped at it
                state["skipped"][f] = "removed after it could not be read"
                state["files_done"] += 1  # --strict stopped just before it
            if state["failed"]:
                state["failed"] = None
                write_atomic(out / "progress.json", json.dumps(state).encode())
            old["images"] = manifest["images"]  # the folder may have moved
            write_atomic(out / "manifest.json", json.dumps(old, indent=1).encode())
            self.manifest, self.state = old, state
            self.arrays = open_arrays(out, old, "r+")
        else:
            self.manifest = manifest
            self.arrays = create_arrays(out, manifest)
            self.state, sums = {"done": 0, "files_done": 0, "skipped": {}, "ranges": []}, None
            write_atomic(out / "progress.json", json.dumps(self.state).encode())
            write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
        self.labels = labels_of(self.manifest)
        self.rows, self.files = self.state["done"], self.state["files_done"]
        self.skipped = dict(self.state["skipped"])
        shape = (manifest["layers"], manifest["heads"])
        self.stats = DeviceStats(shape, manifest["dim"], device)
        if sums is not None:
            self.stats.load(sums)

    def write(self, batch: ReadableBatch, parts: Any, upto: int) -> None:
        """Records a batch: its rows (its images up to file index `upto`), their statistics,
        the unreadable files among them."""
        n = sum(1 for i in batch.indices if i < upto)
        end = self.rows + n
        if n:
            self.stats.update(parts.heads[:n])
            for name in ("heads", "mlps", "class_token", "representation"):
                self.arrays[name][self.rows : end] = getattr(parts, name)[:n].cpu().numpy()
            self.arrays["labels"][self.rows : end] = [self.labels[i] for i in batch.indices[:n]]
        for i, why in batch.unreadable:
            if i < upto:
                self.skipped[self.manifest["files"][i]] = why
        self.rows, self.files = end, upto

    def save(self, failed: str | None = None) -> None:
        """A checkpoint of everything recorded (unless nothing moved since the last)."""
        done = self.state["done"]
        if (self.rows, self.files, failed) == (done, self.state["files_done"], None):
            return
        try:
            for a in self.arrays.values():
                a.flush()
            if self.rows > done:
                save_sums(self.out / f"stats-{self.rows}.npz", self.stats.state())
            ranges = list(self.state["ranges"])
            if self.rows > done:
                ranges.append([done, self.rows, checksum(self.arrays, done, self.rows)])
            state = {
                "done": self.rows,
                "files_done": self.files,
                "skipped": self.skipped,
                "failed": failed,
                "ranges": ranges,
            }
            write_atomic(self.out / "progress.json", json.dumps(state).encode())
        except OSError as e:
            if not disk_full(e):
                raise
            raise StoreError(
                f"store {self.out}: the disk is full; the last checkpoint ({done} images) is "
                "kept: free some space and rerun the same command to resume"
            ) from None
        self.state = state
        for old in self.out.glob("stats-*.npz"):
            if old.name != f"stats-{self.rows}.npz":
                old.unlink()


def _report_skipped(skipped: dict[str, str], out: Path) -> None:
    if skipped:
        shown = "; ".join(f"{f} ({why})" for f, why in list(skipped.items())[:3])
        warnings.warn(
            f"{len(skipped)} unreadable images skipped (recorded in {out}/progress.json and "
            f"Store.skipped): {shown}" + (" …" if len(skipped) > 3 else ""),
            RuntimeWarning,
            stacklevel=3,
        )


def extract_local(
    images: str | Any,
    out: str | Any,
    model: str,
    pretrained: str | None,
    batch_size: int,
    workers: int,
    device: str | None,
    dtype: str,
    precision: str,
    checkpoint_every: int,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    strict: bool = False,
    convention: str = "textspan",
) -> Store:
    """`textspan.extract(..., engine="local")`. `after_batch(rows)` is called after each
    batch is recorded, with the number of rows written so far (before any checkpoint)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: expected a folder for the store, got the file {out}")
    source = open_images(images)
    files = source.files
    net, preprocess, _ = load(model, pretrained=pretrained, device=device, precision=precision)
    tower = tower_of(net)
    shape = (tower.layers, tower.heads, tower.dim, term_names(tower))
    manifest = manifest_of(source, model, pretrained, precision, dtype, shape, convention)
    out.mkdir(parents=True, exist_ok=True)
    interrupts = _Interrupts()
    with writer_lock(out), interrupts.installed():
        device_ = next(net.parameters()).device
        store = _Checkpoints(out, manifest, device_)
        print(
            f"textspan extract: {len(files)} images into {out} ({store.files} done before)",
            flush=True,
        )
        _run(
            store,
            net,
            source,
            preprocess,
            batch_size,
            workers,
            checkpoint_every,
            interrupts,
            progress,
            after_batch,
            strict,
        )
        _report_skipped(store.skipped, out)
    return open_store(out)


def _run(
    store: _Checkpoints,
    net: Any,
    source: ImageSet,
    preprocess: Any,
    batch_size: int,
    workers: int,
    checkpoint_every: int,
    interrupts: _Interrupts,
    progress: bool,
    after_batch: Callable[[int], None] | None,
    strict: bool,
) -> None:
    from tqdm.auto import tqdm

    files = store.manifest["files"]
    device = next(net.parameters()).device
    every = max(1, -(-checkpoint_every // batch_size)) * batch_size
    loader = torch.utils.data.DataLoader(
        TolerantImages(source.root, files, preprocess, store.files, source.reader),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=collate_readable,
        pin_memory=device.type == "cuda",
    )
    first = store.files
    bar = tqdm(total=len(files), initial=first, desc="extracting", unit="img", disable=not progress)
    try:
        with Decomposer(net) as decomposer:
            for batch in loader:
                parts = None
                if batch.images is not None:
                    parts = decomposer.decompose(
                        batch.images.to(device, non_blocking=True),
                        convention=manifest_value(store.manifest, "convention"),
                    )
                stop = batch.unreadable[0] if strict and batch.unreadable else None
                with interrupts.critical():
                    store.write(batch, parts, batch.last + 1 if stop is None else stop[0])
                bar.update(len(batch.indices) + len(batch.unreadable))
                if stop is not None:
                    with interrupts.critical():
                        store.save(failed=files[stop[0]])
                    raise UnreadableImageError(
                        f"{stop[1]} (--strict; the {store.files} images before it are "
                        "saved: remove or repair it and rerun the same command to resume)"
                    )
                if after_batch is not None:
                    after_batch(store.rows)
                if store.rows - store.state["done"] >= every:
                    with interrupts.critical():
                        store.save()
        with interrupts.critical():
            store.save()
    except KeyboardInterrupt:
        with interrupts.critical():
            store.save()  # every recorded batch is kept
        bar.close()
        print(
            f"\ninterrupted after {store.files} of {len(files)} images; rerun the same command "
            "to resume"
        )
        raise
    elapsed = bar.format_dict["elapsed"]
    bar.close()
    ran = store.files - first
    speed = f" ({ran / elapsed:.1f} images/s)" if ran and elapsed > 0 else ""
    print(f"done: {store.out}{speed}", flush=True)
