"""The on-disk store of contributions: its files, and the helpers that write and read them.

A store is a folder:

    manifest.json    what was extracted and how (model, weights, images, dtype, shapes)
    heads.npy        [N, L, H, D]  direct contribution of every head (float16 or float32)
    mlps.npy         [N, L+1, D]   embedding term and every MLP (L+2: a pooler's MLP last)
    class_token.npy  [N, L, D]     the class token's own share of each attention layer
    representation.npy [N, D]
    labels.npy       [N]           class index (ImageFolder layout) or -1
    stats-<n>.npz    per-head float64 sums over the first n rows, about a fixed shift s:
                     count, s, Σ(x − s), Σ(x − s)(x − s)ᵀ (`StoreReader.stats` is their
                     HeadStats)
    progress.json    rows done, image files consumed, the unreadable images skipped, and a
                     checksum of each finished range of rows
    parts/           rows written elsewhere (Ray actors), not yet in the arrays (`writer`)
    .lock            held by the process writing the store (its id inside)

N is the number of image files listed; a row is written for each readable one, in file order,
so a store with skipped images holds fewer rows than N (the arrays' first `done` rows). The
arrays are declared in `manifest.ROW_KINDS`; `writer.StoreWriter` is the one writer and
`reader.open_store` the one reader; the engines only hand rows to a writer. The arrays are
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
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError

# Each array's full shape and dtype, by name (`Manifest.shapes()`).
Shapes = dict[str, tuple[tuple[int, ...], str]]

__all__ = [
    "checksum",
    "create_arrays",
    "disk_full",
    "load_progress",
    "open_arrays",
    "read_json",
    "write_atomic",
    "writer_lock",
    "writer_of",
]

# Rows hashed at a time: a checksum never holds more than this many rows of an array.
CHECKSUM_BLOCK = 256


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
    """A digest of rows start..end of every array, in the order of `ROW_KINDS` (read a block
    of rows at a time)."""
    h = hashlib.blake2b(digest_size=16)
    for name in arrays:
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


def open_arrays(path: Path, shapes: Shapes, mode: str) -> dict[str, np.ndarray]:
    """The store's arrays, memory-mapped, each checked against its shape in the manifest."""
    arrays = {}
    for name, (shape, dtype) in shapes.items():
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
    path: Path, count: int, heads: tuple[int, int, int]
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The progress record of a store of `count` listed files (with the defaults of stores
    written before images could be skipped) and the statistics' sums of its `heads` (L, H,
    D) at its last checkpoint (None before the first)."""
    progress = read_json(path / "progress.json", f"store {path}: progress.json")
    done = progress.get("done")
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
    if int(sums["count"]) != done or sums["sum1"].shape != heads:
        raise StoreError(f"store {path}: stats-{done}.npz does not match the progress record")
    return progress, sums


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


def create_arrays(path: Path, shapes: Shapes) -> dict[str, np.ndarray]:
    """The store's arrays, preallocated (memory-mapped, writable), their space reserved on
    disk first, so a full disk is a clear error now rather than a crash (SIGBUS) later."""
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
