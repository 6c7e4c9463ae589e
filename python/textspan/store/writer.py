"""Writing a store: one writer for every engine.

`StoreWriter` creates a store or resumes one, whichever engine began it. The engines hand it
decomposed rows (`append`) and ask for checkpoints; it owns the files. Work done elsewhere —
by Ray actors, on other machines — is written as *parts* by `PartWriter`: a part is the rows
of some image files, their unreadable files and their statistics, in a folder under
`out/parts/` that appears whole (renamed from a temporary name) or not at all. The writer
`absorb`s the parts that continue the store, in file order, into its arrays and statistics.

So a store begun by the local engine is finished by Ray (its shards start where the store
stopped) and the reverse (the local engine absorbs the parts Ray wrote, then goes on).
Progress only moves at a checkpoint, after the arrays are flushed and the statistics saved;
a part is removed only once a checkpoint holds its rows, so an interruption anywhere resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.stats import HeadStats
from ..errors import InputError, SkippedImagesWarning, StoreError, UnreadableImageError
from .format import (
    checksum,
    create_arrays,
    disk_full,
    load_progress,
    open_arrays,
    write_atomic,
    writer_lock,
)
from .manifest import ROW_KINDS, Manifest
from .reader import StoreReader, open_store
from .sums import DeviceStats, save_sums, stats_from_sums

__all__ = ["PARTS", "PartWriter", "StoreWriter"]

PARTS = "parts"
# Rows per checksum range of rows absorbed from parts.
CHECKSUM_ROWS = 1024
DECOMPOSED = tuple(k.name for k in ROW_KINDS if k.decomposed)


def _rows_of(rows: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    a = rows[name][:n]
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


class StoreWriter:
    """A store being written. Open it with `StoreWriter.open(out, manifest)` (a context
    manager that holds the store's lock); `append` rows, `checkpoint`, `finish`.

    `rows` rows are written (one per readable image, in file order) after `files` image
    files were consumed. When resuming, `manifest` is the store's own (its file list
    governs), with the images' folder updated to where they are now."""

    def __init__(self, out: Path, manifest: Manifest, device: Any) -> None:
        self.out = out
        self._lock = ExitStack()
        fresh = {"done": 0, "files_done": 0, "skipped": {}, "failed": None, "ranges": []}
        # Written in this order when a store is created: arrays, manifest, progress record.
        begun = (out / "manifest.json").exists() and (out / "progress.json").exists()
        if (out / "manifest.json").exists():
            old = Manifest.read(out)
            state, sums = load_progress(out, old.count, old.head_shape) if begun else (fresh, None)
            failed = {state["failed"]} if state["failed"] else set()
            old.check_resume(manifest, [*state["skipped"], *failed], out)
            for f in failed - set(manifest.files):  # removed since --strict stopped at it
                state["skipped"][f] = "removed after it could not be read"
                state["files_done"] += 1  # --strict stopped just before it
            state["failed"] = None
            self.manifest = old.moved_to(manifest.images)  # the folder may have moved
        else:
            self.manifest, state, sums = manifest, fresh, None
        shapes = self.manifest.shapes()
        self.arrays = open_arrays(out, shapes, "r+") if begun else create_arrays(out, shapes)
        write_atomic(out / "manifest.json", self.manifest.to_json())
        write_atomic(out / "progress.json", json.dumps(state).encode())
        self.state = state
        self.rows, self.files = state["done"], state["files_done"]
        self.skipped: dict[str, str] = dict(state["skipped"])
        m = self.manifest
        self.stats = DeviceStats((m.layers, m.heads), m.dim, torch.device(device or "cpu"))
        if sums is not None:
            self.stats.load(sums)
        self.parts_found = len(_complete_parts(out / PARTS))

    @classmethod
    def open(cls, out: str | os.PathLike, manifest: Manifest, *, device: Any = None) -> StoreWriter:
        """The writer of the store in `out`, to use in a `with` block: created, or resumed
        if `out` holds one begun with the same arguments on the same images (else a
        StoreError says what differs). Only one process writes a store at a time: a second
        is refused, naming the first. `device` holds the running statistics."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"out: expected a folder for the store, got the file {out}")
        out.mkdir(parents=True, exist_ok=True)
        with ExitStack() as lock:
            lock.enter_context(writer_lock(out))
            writer = cls(out, manifest, device)
            writer._lock = lock.pop_all()
        return writer

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.close()

    # Rows written here ------------------------------------------------------------------------

    def append(
        self,
        rows: Mapping[str, Any],
        indices: Sequence[int],
        *,
        unreadable: Sequence[tuple[int, str]] = (),
        upto: int,
    ) -> None:
        """Records a batch: the decomposed `rows` (every kind in `ROW_KINDS` that comes from
        the decomposition, a row per index) of the image files `indices`, the `unreadable`
        (file index, why) among them; files up to index `upto` (exclusive) are then consumed.
        Rows of indices at or past `upto` are dropped."""
        n = sum(1 for i in indices if i < upto)
        end = self.rows + n
        if n:
            self.stats.update(torch.as_tensor(rows["heads"][:n]))
            for name in DECOMPOSED:
                self.arrays[name][self.rows : end] = _rows_of(rows, name, n)
            self.arrays["labels"][self.rows : end] = [self.manifest.labels[i] for i in indices[:n]]
        for i, why in unreadable:
            if i < upto:
                self.skipped[self.manifest.files[i]] = why
        self.rows, self.files = end, upto

    @property
    def unsaved_rows(self) -> int:
        """Rows recorded since the last checkpoint."""
        return self.rows - self.state["done"]

    def checkpoint(self, failed: str | None = None) -> None:
        """Saves everything recorded (unless nothing moved since the last checkpoint);
        `failed` names the file --strict stopped at."""
        done = self.state["done"]
        if (self.rows, self.files, failed) == (done, self.state["files_done"], None):
            return
        try:
            for a in self.arrays.values():
                a.flush()
            ranges = list(self.state["ranges"])
            if self.rows > done:
                save_sums(self.out / f"stats-{self.rows}.npz", self.stats.state())
                ranges += [
                    [s, min(self.rows, s + CHECKSUM_ROWS), ""]
                    for s in range(done, self.rows, CHECKSUM_ROWS)
                ]
                for r in ranges[len(self.state["ranges"]) :]:
                    r[2] = checksum(self.arrays, r[0], r[1])
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

    def finish(self) -> StoreReader:
        """The last checkpoint; the unreadable images named in a warning; the parts that no
        longer matter removed. Returns the store, opened for reading."""
        self.checkpoint()
        if self.files < self.manifest.count:
            raise StoreError(
                f"store {self.out}: {self.manifest.count - self.files} images were not written"
            )
        shutil.rmtree(self.out / PARTS, ignore_errors=True)
        shutil.rmtree(self.out / "shards", ignore_errors=True)  # the layout before parts
        self._lock.close()  # a reader is refused while the store is locked
        if self.skipped:
            shown = "; ".join(f"{f} ({why})" for f, why in list(self.skipped.items())[:3])
            warnings.warn(
                f"{len(self.skipped)} unreadable images skipped (recorded in "
                f"{self.out}/progress.json and Store.skipped): {shown}"
                + (" …" if len(self.skipped) > 3 else ""),
                SkippedImagesWarning,
                stacklevel=4,
            )
        return open_store(self.out)

    # Parts written elsewhere ------------------------------------------------------------------

    def covered(self) -> np.ndarray:
        """[count] bool: the image files done, here or in a complete part."""
        done = np.zeros(self.manifest.count, dtype=bool)
        done[: self.files] = True
        for part in _complete_parts(self.out / PARTS):
            done[part.files] = True
        return done

    def pending(self, size: int) -> list[tuple[int, int]]:
        """The ranges of image files not yet done, in ranges of at most `size` files."""
        todo = ~self.covered()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], todo.view(np.int8), [0]])))
        return [
            (s, min(int(e), s + size))
            for start, e in zip(edges[::2], edges[1::2], strict=True)
            for s in range(int(start), int(e), size)
        ]

    def absorb(self, *, strict: bool = False) -> None:
        """The complete parts that continue the store, in file order, into its rows and
        statistics; then a checkpoint, and those parts removed. Parts behind the store's
        progress (absorbed before an interruption, or overtaken) are removed.

        With `strict`, an unreadable image stops the store just before it: its rows before
        it are kept, the parts that hold an unreadable image removed (a rerun computes them
        again), and UnreadableImageError names it."""
        parts = _complete_parts(self.out / PARTS)
        for part in parts:
            if part.first < self.files:
                shutil.rmtree(part.folder, ignore_errors=True)
        parts = [p for p in parts if p.first >= self.files]
        end = self._reach(parts)
        taken = [p for p in parts if p.last < end]
        stop = None
        if strict:
            unreadable = [(i, why) for p in taken for i, why in p.skipped.items()]
            if unreadable:
                # A strict part ends at its unreadable image (`PartWriter`), so the parts
                # up to it hold no row after it.
                stop = min(unreadable)
                taken = [p for p in taken if p.first <= stop[0]]
                end = stop[0]
        self._take(taken, end)
        if stop is not None:  # removed first: a crash before the checkpoint recomputes them
            for part in parts:
                if part.skipped:
                    shutil.rmtree(part.folder, ignore_errors=True)
        self.checkpoint(failed=None if stop is None else self.manifest.files[stop[0]])
        for part in taken:
            shutil.rmtree(part.folder, ignore_errors=True)
        if stop is not None:
            raise UnreadableImageError(
                f"{stop[1]} (--strict; the {self.files} images before it are saved: remove or "
                "repair it and rerun the same command to resume)"
            )

    def _reach(self, parts: list[_Part]) -> int:
        """How far the store's files would be done with the parts that continue it: the
        first file covered neither by the store nor by a part, less any part that would
        straddle that point (parts are disjoint, so the rest cover the files exactly)."""
        covered = np.zeros(self.manifest.count + 1, dtype=bool)
        covered[: self.files] = True
        for part in parts:
            covered[part.files] = True
        end = int(np.argmin(covered))
        while True:
            straddling = [p.first for p in parts if p.first < end <= p.last]
            if not straddling:
                return end
            end = min(straddling)

    def _take(self, parts: list[_Part], end: int) -> None:
        """The rows of `parts` appended in file order (files before `end`)."""
        readable = np.sort(np.concatenate([np.zeros(0, np.int64), *(p.indices for p in parts)]))
        labels = np.asarray(self.manifest.labels)
        for part in parts:
            if len(part.indices):
                rows = self.rows + np.searchsorted(readable, part.indices)
                for name in DECOMPOSED:
                    self.arrays[name][rows] = np.load(part.folder / f"{name}.npy")
                self.arrays["labels"][rows] = labels[part.indices]
                self.stats.add(HeadStats.load(part.folder / "stats.npz"))
            for i, why in part.skipped.items():
                if i < end:  # a strict store stops just before its unreadable image
                    self.skipped[self.manifest.files[i]] = why
        self.rows, self.files = self.rows + len(readable), end


@dataclass
class _Part:
    folder: Path
    indices: np.ndarray  # file indices of its rows, increasing
    skipped: dict[int, str]  # unreadable file index -> why

    @property
    def files(self) -> np.ndarray:
        return np.concatenate([self.indices, np.fromiter(self.skipped, np.int64)]).astype(int)

    @property
    def first(self) -> int:
        return int(self.files.min())

    @property
    def last(self) -> int:
        return int(self.files.max())


def _complete_parts(folder: Path) -> list[_Part]:
    """The complete parts (not temporary folders being written) in `folder`."""
    if not folder.is_dir():
        return []
    parts = []
    for f in sorted(folder.iterdir()):
        if not f.is_dir() or ".tmp-" in f.name:
            continue
        try:
            skipped = json.loads((f / "skipped.json").read_text())
            indices = np.load(f / "indices.npy")
        except (OSError, ValueError) as e:
            raise StoreError(f"part {f} is corrupt ({e}): remove it and rerun") from None
        parts.append(_Part(f, indices, {int(k): v for k, v in skipped.items()}))
    return [p for p in parts if len(p.indices) or p.skipped]


class PartWriter:
    """Writes one part of a store: the rows of some image files, decomposed elsewhere (a Ray
    actor), with their unreadable files and statistics; `commit` renames it into place.

    With `strict`, the part ends at its first unreadable image (rows after it are dropped),
    so that its statistics are those of exactly the rows a strict store keeps."""

    def __init__(
        self, out: str | os.PathLike, manifest: Manifest, *, device: Any, strict: bool = False
    ) -> None:
        self.out, self.manifest, self.strict = Path(out), manifest, strict
        self.device = torch.device(device)
        self._begin()

    def _begin(self) -> None:
        m = self.manifest
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in DECOMPOSED}
        self.indices: list[int] = []
        self.skipped: dict[int, str] = {}
        self.stats = DeviceStats((m.layers, m.heads), m.dim, self.device)

    @property
    def stopped(self) -> bool:
        """With `strict`, whether an unreadable image ended the part."""
        return self.strict and bool(self.skipped)

    def add(
        self,
        rows: Mapping[str, Any],
        indices: Sequence[int],
        unreadable: Sequence[tuple[int, str]] = (),
    ) -> None:
        """A batch: the decomposed `rows` of the image files `indices`, and the `unreadable`
        (file index, why) among its files."""
        if self.stopped:
            return
        n = len(indices)
        if self.strict and unreadable:  # the rows before the first unreadable image only
            first = min(i for i, _ in unreadable)
            n = sum(1 for i in indices if i < first)
            unreadable = [u for u in unreadable if u[0] == first]
        if n:
            self.stats.update(torch.as_tensor(rows["heads"][:n]))
            dtype = np.dtype(self.manifest.dtype)
            for k in DECOMPOSED:
                self.rows[k].append(_rows_of(rows, k, n).astype(dtype))
            self.indices += [int(i) for i in indices[:n]]
        for i, why in unreadable:
            self.skipped[int(i)] = why

    def commit(self) -> None:
        """The part, renamed into `out/parts/` when complete; then a new one begins."""
        if not self.indices and not self.skipped:
            return
        order = np.argsort(self.indices, kind="stable")
        files = [*self.indices, *self.skipped]
        final = self.out / PARTS / f"{min(files):010d}-{max(files) + 1:010d}"
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        m = self.manifest
        for k, v in self.rows.items():
            empty = np.zeros((0, *m.row_shape(k)), dtype=m.dtype)
            np.save(tmp / f"{k}.npy", np.concatenate(v)[order] if v else empty)
        np.save(tmp / "indices.npy", np.asarray(self.indices, dtype=np.int64)[order])
        (tmp / "skipped.json").write_text(json.dumps({str(k): v for k, v in self.skipped.items()}))
        if self.indices:
            stats_from_sums(self.stats.state()).save(tmp / "stats.npz")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:  # another attempt at the same files finished first: same content
            shutil.rmtree(tmp, ignore_errors=True)
        self._begin()
