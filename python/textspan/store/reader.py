"""Reading a store: `open_store` checks it and memory-maps its arrays; `StoreReader` is what an
analysis reads (rows, file names, labels, head statistics), each range of rows checked
against its checksum as it is reached."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.checks import Convention
from ..core.stats import HeadStats
from ..errors import StoreError
from .format import checksum, load_progress, open_arrays, writer_of
from .manifest import ROW_KINDS, Manifest
from .sums import stats_from_sums

__all__ = ["Store", "StoreReader", "open_store"]

ARRAYS = tuple(k.name for k in ROW_KINDS)


@dataclass
class StoreReader:
    """An extracted store: memory-mapped arrays (one row per image), file names, labels and
    head statistics.

    An analysis reading the store's rows checks each range's checksum as it reaches it
    (`check_rows`), so a corrupt row is a `StoreError` naming the file and rows, not a
    silently wrong figure."""

    path: Path
    manifest: Manifest
    arrays: dict[str, np.ndarray] = field(repr=False)  # every kind in ROW_KINDS, by name
    stats: HeadStats
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image -> why
    ranges: list[list[Any]] = field(default_factory=list, repr=False)
    _verified: set[int] = field(default_factory=set, repr=False)

    @property
    def heads(self) -> np.ndarray:
        """[N, L, H, D] every head's direct contribution."""
        return self.arrays["heads"]

    @property
    def mlps(self) -> np.ndarray:
        """[N, terms, D] the embedding term and every MLP (`terms` names them)."""
        return self.arrays["mlps"]

    @property
    def class_token(self) -> np.ndarray:
        """[N, L, D] the class token's own share of each attention layer."""
        return self.arrays["class_token"]

    @property
    def representation(self) -> np.ndarray:
        """[N, D] the image representation."""
        return self.arrays["representation"]

    @property
    def labels(self) -> np.ndarray:
        """[N] class index, or -1."""
        return self.arrays["labels"]

    @property
    def files(self) -> list[str]:
        """The image of each row (the listed files less the skipped ones)."""
        if not self.skipped:
            return list(self.manifest.files)
        return [f for f in self.manifest.files if f not in self.skipped]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        """Per-row integers the images' reader gave (Waterbirds: place, group)."""
        kept = [f not in self.skipped for f in self.manifest.files]
        return {k: np.asarray(v, dtype=np.int64)[kept] for k, v in self.manifest.attributes.items()}

    @property
    def terms(self) -> list[str]:
        """The names of the `mlps` entries."""
        return list(self.manifest.terms)

    @property
    def convention(self) -> Convention:
        """The decomposition's convention the rows were written in ("textspan", "paper")."""
        return self.manifest.convention

    def __len__(self) -> int:
        return len(self.labels)

    def check_rows(self, rows: slice) -> None:
        """Checks the checksum of every range of rows that `rows` touches, once each."""
        for i, (start, end, digest) in enumerate(self.ranges):
            if i in self._verified or end <= rows.start or start >= rows.stop:
                continue
            if checksum(self.arrays, start, end) != digest:
                raise StoreError(
                    f"store {self.path}: rows {start}..{end} do not match their checksum (a "
                    "corrupt or modified file among "
                    + ", ".join(f"{a}.npy" for a in ARRAYS)
                    + "): extract the images again"
                )
            self._verified.add(i)


def _check_ranges(path: Path, ranges: list[Any], rows: int) -> None:
    """The checksummed ranges must cover rows 0..rows exactly, in order."""
    at = 0
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 3 and r[0] == at and r[1] > at):
            raise StoreError(f"store {path}: progress.json is corrupt (range {r!r} after {at})")
        at = r[1]
    if at != rows:
        raise StoreError(
            f"store {path}: progress.json is corrupt: its checksums cover rows 0..{at}, the "
            f"store holds {rows}"
        )


def _check_stats(path: Path, stats: HeadStats, heads: np.ndarray) -> None:
    """The statistics must be those of the stored rows: the same count, and (as far as the
    rows' precision allows) the same means and covariances."""
    if stats.count != len(heads):
        raise StoreError(
            f"store {path}: its statistics count {stats.count} images, it holds {len(heads)}"
        )
    if len(heads) == 0:
        return
    recomputed = None
    for start in range(0, len(heads), 1024):
        part = HeadStats.from_outputs(np.asarray(heads[start : start + 1024], dtype=np.float32))
        recomputed = part if recomputed is None else recomputed + part
    # float32 rows give the statistics to rounding; float16 rows only to their precision.
    tolerance = 1e-5 if heads.dtype == np.float32 else 1e-2
    spread = np.sqrt(np.diagonal(recomputed.covariance, axis1=-2, axis2=-1).max(-1))
    scales = {
        "means": np.abs(recomputed.mean).max(-1) + spread,
        "covariances": np.abs(recomputed.covariance).max((-2, -1)),
    }
    for what, a, b in (
        ("means", stats.mean, recomputed.mean),
        ("covariances", stats.covariance, recomputed.covariance),
    ):
        scale = scales[what].reshape(*scales[what].shape, *[1] * (a.ndim - 2)) + 1e-30
        error = float((np.abs(a - b) / scale).max())
        if error > tolerance:
            raise StoreError(
                f"store {path}: its statistics' {what} differ from those of its rows by "
                f"{error:.2g} (relative; at most {tolerance:g} expected): the statistics are "
                "corrupt, extract the images again"
            )


def open_store(path: str | os.PathLike, *, verify: bool = False) -> StoreReader:
    """Opens a finished store, memory-mapped read-only.

    Checks the manifest, every array's shape and dtype against it, the progress record and
    the statistics; an analysis then checks each range of rows against its checksum as it
    reads it. With `verify=True`, also now: every range's checksum (reads the whole store),
    that the ranges cover every row, and that the statistics are those of the rows. Raises
    StoreError with what is wrong."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise StoreError(f"store {path} {what}: expected a folder made by `textspan extract`")
    writer = writer_of(path)
    if writer is not None:
        raise StoreError(
            f"store {path} is being written by process {writer}: open it once that "
            "extraction has finished"
        )
    manifest = Manifest.read(path)
    progress, sums = load_progress(path, manifest.count, manifest.head_shape)
    if sums is None and progress["files_done"] == manifest.count:
        raise StoreError(f"store {path}: none of its {manifest.count} images could be read")
    if sums is None or progress["files_done"] < manifest.count:
        raise StoreError(
            f"store {path} is incomplete: {progress['files_done']} of {manifest.count} "
            "images extracted. Rerun the same extract command to finish it."
        )
    rows = progress["done"]
    arrays = {k: a[:rows] for k, a in open_arrays(path, manifest.shapes(), "r").items()}
    store = StoreReader(
        path,
        manifest,
        arrays,
        stats=stats_from_sums(sums),
        skipped=progress["skipped"],
        ranges=progress["ranges"],
    )
    if verify:
        _check_ranges(path, progress["ranges"], rows)
        store.check_rows(slice(0, rows))
        _check_stats(path, store.stats, store.heads)
    return store


# The name of the reader before 0.6 (the CHANGELOG says so).
Store = StoreReader
