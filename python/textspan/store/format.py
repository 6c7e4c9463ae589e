"""The on-disk store of contributions: its format, and reading it back.

A store is a folder:

    manifest.json    what was extracted and how (model, weights, images, dtype, shapes)
    heads.npy        [N, L, H, D]  direct contribution of every head (float16 or float32)
    mlps.npy         [N, L+1, D]   embedding term and every MLP (L+2: a pooler's MLP last)
    class_token.npy  [N, L, D]     the class token's own share of each attention layer
    representation.npy [N, D]
    labels.npy       [N]           class index (ImageFolder layout) or -1
    stats-<n>.npz    per-head float64 sums over the first n rows, about a fixed shift s:
                     count, s, Σ(x − s), Σ(x − s)(x − s)ᵀ (`Store.stats` is their HeadStats)
    progress.json    rows done, image files consumed, the unreadable images skipped, and a
                     checksum of each finished range of rows
    .lock            held by the process writing the store (its id inside)

N is the number of image files listed; a row is written for each readable one, in file order,
so a store with skipped images holds fewer rows than N (the arrays' first `done` rows). The
engines (`textspan.engines`) write stores; this module owns the format. The arrays are
preallocated (their space reserved on disk) and written in place. Progress only moves at
checkpoints, after the arrays are flushed and the statistics saved (each file written to a
temporary name and renamed, so a crash leaves the old or the new one, never half of one). A
run interrupted anywhere — Ctrl-C, `kill -9`, a lost machine — resumes from the last
checkpoint when rerun with the same arguments; rows written after it are written again,
identically.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.stats import HeadStats
from ..errors import StoreError
from .sums import stats_from_sums

__all__ = [
    "ARRAYS",
    "STORE_VERSION",
    "Store",
    "check_resume",
    "checksum",
    "create_arrays",
    "disk_full",
    "expected_shapes",
    "labels_of",
    "load_progress",
    "make_manifest",
    "manifest_value",
    "open_arrays",
    "open_store",
    "read_json",
    "row_shapes",
    "write_atomic",
    "writer_lock",
]

STORE_VERSION = 2
ARRAYS = ("heads", "mlps", "class_token", "representation", "labels")


# Rows hashed at a time: a checksum never holds more than this many rows of an array.
CHECKSUM_BLOCK = 256
MANIFEST_KEYS = {
    "version": int,
    "model": str,
    "precision": str,
    "dtype": str,
    "images": str,
    "count": int,
    "layers": int,
    "heads": int,
    "dim": int,
    "classes": list,
    "files": list,
}


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def checksum(arrays: dict[str, np.ndarray], start: int, end: int) -> str:
    """A digest of rows start..end of every array (read a block of rows at a time)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ARRAYS:
        for s in range(start, end, CHECKSUM_BLOCK):
            h.update(np.ascontiguousarray(arrays[name][s : min(end, s + CHECKSUM_BLOCK)]).tobytes())
    return h.hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{what} is corrupt ({path}): {e}") from None
    except OSError as e:
        raise StoreError(f"{what} cannot be read ({path}): {e}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{what} is corrupt ({path}): expected a JSON object")
    return data


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise StoreError(
                f"store {path}: manifest.json is corrupt: expected {key!r} to be a "
                f"{kind.__name__}, got {m.get(key)!r:.60}"
            )
    if len(m["files"]) != m["count"]:
        raise StoreError(
            f"store {path}: manifest.json is corrupt: {len(m['files'])} files for a count of "
            f"{m['count']}"
        )


@dataclass
class Store:
    """An extracted store: memory-mapped arrays (one row per image), file names, labels and
    head statistics.

    An analysis reading the store's rows checks each range's checksum as it reaches it
    (`check_rows`), so a corrupt row is a `StoreError` naming the file and rows, not a
    silently wrong figure."""

    path: Path
    manifest: dict[str, Any]
    heads: np.ndarray
    mlps: np.ndarray
    class_token: np.ndarray
    representation: np.ndarray
    labels: np.ndarray
    stats: HeadStats
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image -> why
    ranges: list[list[Any]] = field(default_factory=list, repr=False)
    _verified: set[int] = field(default_factory=set, repr=False)

    @property
    def files(self) -> list[str]:
        """The image of each row (the listed files less the skipped ones)."""
        if not self.skipped:
            return self.manifest["files"]
        return [f for f in self.manifest["files"] if f not in self.skipped]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        """Per-row integers the images' reader gave (Waterbirds: place, group)."""
        kept = [f not in self.skipped for f in self.manifest["files"]]
        return {
            k: np.asarray(v, dtype=np.int64)[kept]
            for k, v in self.manifest.get("attributes", {}).items()
        }

    @property
    def terms(self) -> list[str]:
        """The names of the `mlps` entries (stores from before they were recorded: the
        embedding and each layer's MLP)."""
        layers = self.manifest["layers"]
        return self.manifest.get("terms") or [
            "embedding",
            *(f"layer {i} MLP" for i in range(layers)),
        ]

    @property
    def convention(self) -> str:
        """The decomposition's convention the rows were written in ("textspan", "paper")."""
        return manifest_value(self.manifest, "convention")

    def __len__(self) -> int:
        return len(self.labels)

    def check_rows(self, rows: slice) -> None:
        """Checks the checksum of every range of rows that `rows` touches, once each."""
        arrays = {name: getattr(self, name) for name in ARRAYS}
        for i, (start, end, digest) in enumerate(self.ranges):
            if i in self._verified or end <= rows.start or start >= rows.stop:
                continue
            if checksum(arrays, start, end) != digest:
                raise StoreError(
                    f"store {self.path}: rows {start}..{end} do not match their checksum (a "
                    "corrupt or modified file among "
                    + ", ".join(f"{a}.npy" for a in ARRAYS)
                    + "): extract the images again"
                )
            self._verified.add(i)


def row_shapes(
    layers: int, heads: int, dim: int, terms: int | None = None
) -> dict[str, tuple[int, ...]]:
    """The shape of one image's row of each contribution array (`terms`: the mlps entries,
    L + 1 unless a pooler's MLP adds one)."""
    return {
        "heads": (layers, heads, dim),
        "mlps": (terms or layers + 1, dim),
        "class_token": (layers, dim),
        "representation": (dim,),
    }


def expected_shapes(m: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    n = m["count"]
    rows = row_shapes(m["layers"], m["heads"], m["dim"], len(m.get("terms", ())) or None)
    return {
        **{name: ((n, *shape), m["dtype"]) for name, shape in rows.items()},
        "labels": ((n,), "int64"),
    }


def open_arrays(path: Path, manifest: dict[str, Any], mode: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (shape, dtype) in expected_shapes(manifest).items():
        file = path / f"{name}.npy"
        try:
            a = np.load(file, mmap_mode=mode)
        except FileNotFoundError:
            raise StoreError(f"store {path}: {name}.npy is missing") from None
        except (ValueError, OSError, EOFError) as e:
            raise StoreError(f"store {path}: {name}.npy is truncated or corrupt ({e})") from None
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise StoreError(
                f"store {path}: {name}.npy holds {list(a.shape)} {a.dtype}, the manifest says "
                f"{list(shape)} {dtype}"
            )
        arrays[name] = a
    return arrays


def load_progress(
    path: Path, manifest: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The progress record (with the defaults of stores written before images could be
    skipped) and the statistics' sums at its last checkpoint (None before the first)."""
    progress = read_json(path / "progress.json", f"store {path}: progress.json")
    done = progress.get("done")
    count = manifest["count"]
    if not isinstance(done, int) or not 0 <= done <= count:
        raise StoreError(f"store {path}: progress.json is corrupt (done = {done!r})")
    progress.setdefault("files_done", done)
    progress.setdefault("skipped", {})
    progress.setdefault("failed", None)
    ranges = progress.get("ranges")
    if (
        not isinstance(ranges, list)
        or not isinstance(progress["skipped"], dict)
        or not isinstance(progress["files_done"], int)
        or not done <= progress["files_done"] <= count
    ):
        raise StoreError(f"store {path}: progress.json is corrupt (its ranges or files)")
    if done == 0:
        return progress, None
    shape = (manifest["layers"], manifest["heads"], manifest["dim"])
    try:
        # Opened here, so that it is closed even when NumPy fails on a corrupt archive.
        with open(path / f"stats-{done}.npz", "rb") as fh, np.load(fh) as f:
            sums = {k: f[k] for k in ("count", "shift", "sum1", "sum2")}
    except FileNotFoundError:
        raise StoreError(
            f"store {path}: stats-{done}.npz is missing (is another process writing the "
            "store? else it is corrupt: extract the images again)"
        ) from None
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise StoreError(f"store {path}: stats-{done}.npz is corrupt ({e})") from None
    if int(sums["count"]) != done or sums["sum1"].shape != shape:
        raise StoreError(f"store {path}: stats-{done}.npz does not match the progress record")
    return progress, sums


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


def open_store(path: str | os.PathLike, verify: bool = False) -> Store:
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
    manifest = read_json(path / "manifest.json", f"store {path}: manifest.json")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(
            f"store {path}: version {manifest.get('version')!r}, expected {STORE_VERSION} "
            "(stores of other versions hold other arrays: extract the images again)"
        )
    _check_manifest(path, manifest)
    progress, sums = load_progress(path, manifest)
    if sums is None and progress["files_done"] == manifest["count"]:
        raise StoreError(f"store {path}: none of its {manifest['count']} images could be read")
    if sums is None or progress["files_done"] < manifest["count"]:
        raise StoreError(
            f"store {path} is incomplete: {progress['files_done']} of {manifest['count']} "
            "images extracted. Rerun the same extract command to finish it."
        )
    rows = progress["done"]
    arrays = {k: a[:rows] for k, a in open_arrays(path, manifest, "r").items()}
    store = Store(
        path,
        manifest,
        stats=stats_from_sums(sums),
        skipped=progress["skipped"],
        ranges=progress["ranges"],
        **arrays,
    )
    if verify:
        _check_ranges(path, progress["ranges"], rows)
        store.check_rows(slice(0, rows))
        _check_stats(path, store.stats, store.heads)
    return store


def make_manifest(
    model: Any,
    pretrained: Any,
    precision: str,
    dtype: str,
    root: Path,
    listing: tuple[list[str], list[int], list[str]],
    shape: tuple[int, int, int, Any],
    stamps: list[list[int]],
    convention: str = "textspan",
    dataset: str = "folder",
    attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies a store: the model, the images (`listing`: files, labels and classes,
    as `list_images` gives them, and each file's size and modification time), the arrays'
    shape (layers, heads, D, the names of the mlps terms) and the decomposition's
    convention. `dataset` names the reader (`textspan.datasets`), `attributes` are its
    per-image integers (Waterbirds' place)."""
    files, labels, classes = listing
    layers, heads, dim, terms = shape
    return {
        "version": STORE_VERSION,
        "model": str(model),
        "pretrained": None if pretrained is None else str(pretrained),
        "precision": precision,
        "dtype": dtype,
        "convention": convention,
        "images": str(root.resolve()),
        "count": len(files),
        "layers": layers,
        "heads": heads,
        "dim": dim,
        "terms": list(terms),
        "classes": classes,
        "files": files,
        "labels": [int(v) for v in labels],
        "stamps": stamps,
        "dataset": dataset,
        "attributes": {k: [int(v) for v in a] for k, a in (attributes or {}).items()},
    }


def labels_of(manifest: dict[str, Any]) -> list[int]:
    """Each listed file's label: as its reader gave it, or (stores from before labels were
    recorded) its class folder's index, or -1 in a flat set."""
    if "labels" in manifest:
        return list(manifest["labels"])
    classes = {name: i for i, name in enumerate(manifest["classes"])}
    return [classes.get(Path(f).parts[0], -1) if classes else -1 for f in manifest["files"]]


ARGUMENTS = (
    "version",
    "model",
    "pretrained",
    "precision",
    "dtype",
    "convention",
    "layers",
    "heads",
    "dim",
)


def manifest_value(manifest: dict[str, Any], key: str) -> Any:
    """A manifest's entry; stores from before conventions were recorded are textspan's."""
    return manifest.get(key, "textspan" if key == "convention" else None)


def check_resume(old: dict[str, Any], new: dict[str, Any], passed: set[str], out: Path) -> None:
    """Refuses to resume a store begun with other arguments or on other images.

    The images are compared by what identifies them — relative names, classes, sizes and
    modification times — not by the folder's path, so a moved folder resumes. Files the
    store already `passed` (skipped as unreadable, or stopped at by --strict) may since have
    been removed."""
    differing = [k for k in ARGUMENTS if manifest_value(old, k) != manifest_value(new, k)]
    if differing:
        shown = ", ".join(
            f"{k}: {manifest_value(old, k)!r} there, {manifest_value(new, k)!r} now"
            for k in differing
        )
        raise StoreError(
            f"{out} already holds a store made with other arguments ({shown}). "
            "Use another output folder, or rerun with the same arguments to resume."
        )
    now = dict(zip(new["files"], new["stamps"], strict=True))
    before = dict(zip(old["files"], old.get("stamps") or [None] * len(old["files"]), strict=True))
    added = [f for f in now if f not in before]
    removed = [f for f in before if f not in now and f not in passed]
    changed = [f for f, stamp in before.items() if f in now and stamp not in (None, now[f])]
    problems = [
        f"{len(fs)} {what} (e.g. {', '.join(fs[:3])})"
        for what, fs in (("added", added), ("removed", removed), ("changed", changed))
        if fs
    ]
    if old["classes"] != new["classes"] and not problems:
        problems.append(f"the classes differ ({old['classes'][:3]} … there)")
    if "labels" in old and not problems:
        before_labels = dict(zip(old["files"], old["labels"], strict=True))
        relabelled = [
            f
            for f, label in zip(new["files"], new["labels"], strict=True)
            if before_labels.get(f, label) != label
        ]
        if relabelled:
            problems.append(
                f"{len(relabelled)} relabelled (e.g. {relabelled[0]}: another label file?)"
            )
    if problems:
        raise StoreError(
            f"{out} holds a store begun on other images: since then, images were "
            + "; ".join(problems)
            + ". Use another output folder, or restore the images to resume."
        )


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Holds the store's lock for as long as it is written; a second writer (or a reader
    that checks `writer_of`) learns which process holds it."""
    lock = path / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StoreError(
                f"store {path} is being written by process {holder}: wait for it to finish, "
                "or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def writer_of(path: Path) -> str | None:
    """The process id of the process writing the store now, or None."""
    lock = path / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file (nobody ever wrote here), or not ours to read
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:  # a file system without locks: nobody can be told apart
            return None
        return None
    finally:
        os.close(fd)


def create_arrays(path: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The store's arrays, preallocated (memory-mapped, writable), their space reserved on
    disk first, so a full disk is a clear error now rather than a crash (SIGBUS) later."""
    shapes = expected_shapes(manifest)
    need = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in shapes.values())
    free = shutil.disk_usage(path).free
    if need > free:
        raise StoreError(
            f"store {path}: the arrays need {need / 1e9:.2f} GB, the disk has "
            f"{free / 1e9:.2f} GB free"
        )
    arrays = {}
    for name, (shape, dt) in shapes.items():
        file = path / f"{name}.npy"
        arrays[name] = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shape)
        with open(file, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(file))
            except OSError as e:
                if not disk_full(e):
                    raise
                raise StoreError(
                    f"store {path}: the disk is full: {name}.npy needs "
                    f"{os.path.getsize(file) / 1e9:.2f} GB ({need / 1e9:.2f} GB in all)"
                ) from None
    return arrays
