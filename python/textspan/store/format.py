"""The on-disk store of contributions: its format, and reading it back.

A store is a folder:

    manifest.json    what was extracted and how (model, weights, images, dtype, shapes)
    heads.npy        [N, L, H, D]  direct contribution of every head (float16 or float32)
    mlps.npy         [N, L+1, D]   embedding term and every MLP
    class_token.npy  [N, L, D]     the class token's own share of each attention layer
    representation.npy [N, D]
    labels.npy       [N]           class index (ImageFolder layout) or -1
    stats-<n>.npz    per-head float64 sums over the first n images, about a fixed shift s:
                     count, s, Σ(x − s), Σ(x − s)(x − s)ᵀ (`Store.stats` is their HeadStats)
    progress.json    how many images are done, with a checksum of each finished range

The engines (`textspan.engines`) write stores; this module owns the format. The arrays are
preallocated and written in place, in image order. Progress only moves
at checkpoints, after the arrays are flushed and the statistics saved (each file written
to a temporary name and renamed, so a crash leaves the old or the new one, never half of
one). A run interrupted anywhere — Ctrl-C, `kill -9`, a lost machine — resumes from the
last checkpoint when rerun with the same arguments; rows written after it are written
again, identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
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
    "checksum",
    "create_arrays",
    "expected_shapes",
    "load_progress",
    "make_manifest",
    "open_arrays",
    "open_store",
    "read_json",
    "same_arguments",
    "write_atomic",
]

STORE_VERSION = 2
ARRAYS = ("heads", "mlps", "class_token", "representation", "labels")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checksum(arrays: dict[str, np.ndarray], start: int, end: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][start:end]).tobytes())
    return h.hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{what} is corrupt ({path}): {e}") from None


@dataclass
class Store:
    """An extracted store: memory-mapped arrays, file names, labels and head statistics."""

    path: Path
    manifest: dict[str, Any]
    heads: np.ndarray
    mlps: np.ndarray
    class_token: np.ndarray
    representation: np.ndarray
    labels: np.ndarray
    stats: HeadStats

    @property
    def files(self) -> list[str]:
        return self.manifest["files"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def __len__(self) -> int:
        return len(self.labels)


def expected_shapes(m: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    n, layers, heads, dim = m["count"], m["layers"], m["heads"], m["dim"]
    return {
        "heads": ((n, layers, heads, dim), m["dtype"]),
        "mlps": ((n, layers + 1, dim), m["dtype"]),
        "class_token": ((n, layers, dim), m["dtype"]),
        "representation": ((n, dim), m["dtype"]),
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
        except (ValueError, OSError) as e:
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
    progress = read_json(path / "progress.json", f"store {path}: progress.json")
    done = progress.get("done")
    if not isinstance(done, int) or not 0 <= done <= manifest["count"]:
        raise StoreError(f"store {path}: progress.json is corrupt (done = {done!r})")
    if done == 0:
        return progress, None
    shape = (manifest["layers"], manifest["heads"], manifest["dim"])
    try:
        with np.load(path / f"stats-{done}.npz") as f:
            sums = {k: f[k] for k in ("count", "shift", "sum1", "sum2")}
    except FileNotFoundError:
        raise StoreError(f"store {path}: stats-{done}.npz is missing") from None
    except (ValueError, OSError, KeyError, EOFError) as e:
        raise StoreError(f"store {path}: stats-{done}.npz is corrupt ({e})") from None
    if int(sums["count"]) != done or sums["sum1"].shape != shape:
        raise StoreError(f"store {path}: stats-{done}.npz does not match the progress record")
    return progress, sums


def open_store(path: str | os.PathLike, verify: bool = False) -> Store:
    """Opens a finished store, memory-mapped read-only.

    Checks the manifest, every array's shape and dtype against it, the progress record and
    the statistics; with `verify=True` also every finished range's checksum (reads the whole
    store). Raises StoreError with what is wrong."""
    path = Path(path)
    manifest = read_json(path / "manifest.json", f"store {path}: manifest.json")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(
            f"store {path}: version {manifest.get('version')!r}, expected {STORE_VERSION} "
            "(stores of other versions hold other arrays: extract the images again)"
        )
    progress, sums = load_progress(path, manifest)
    if sums is None or progress["done"] < manifest["count"]:
        raise StoreError(
            f"store {path} is incomplete: {progress['done']} of {manifest['count']} images "
            "extracted. Rerun the same extract command to finish it."
        )
    arrays = open_arrays(path, manifest, "r")
    if verify:
        for start, end, digest in progress["ranges"]:
            if checksum(arrays, start, end) != digest:
                raise StoreError(f"store {path}: rows {start}..{end} do not match their checksum")
    return Store(path, manifest, stats=stats_from_sums(sums), **arrays)


def make_manifest(
    model: Any,
    pretrained: Any,
    precision: str,
    dtype: str,
    root: Path,
    listing: tuple[list[str], list[int], list[str]],
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    """What identifies a store: the model, the images (`listing`: files, labels and classes,
    as `list_images` gives them) and the arrays' shape (layers, heads, D)."""
    files, labels, classes = listing
    layers, heads, dim = shape
    return {
        "version": STORE_VERSION,
        "model": str(model),
        "pretrained": None if pretrained is None else str(pretrained),
        "precision": precision,
        "dtype": dtype,
        "images": str(root.resolve()),
        "count": len(files),
        "layers": layers,
        "heads": heads,
        "dim": dim,
        "classes": classes,
        "files": files,
        "labels_digest": hashlib.blake2b(json.dumps(labels).encode(), digest_size=16).hexdigest(),
    }


def same_arguments(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    differing = [k for k in new if old.get(k) != new[k]]
    if differing:
        shown = ", ".join(
            f"{k}: {old.get(k)!r} there, {new[k]!r} now"
            if k != "files"
            else "the image files differ"
            for k in differing
        )
        raise StoreError(
            f"{out} already holds a store made with other arguments ({shown}). "
            "Use another output folder, or rerun with the same arguments to resume."
        )


def create_arrays(path: Path, manifest: dict[str, Any], labels: list[int]) -> dict[str, np.ndarray]:
    """The store's arrays, preallocated (memory-mapped, writable), labels filled in."""
    arrays = {
        name: np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dt, shape=shape)
        for name, (shape, dt) in expected_shapes(manifest).items()
    }
    arrays["labels"][:] = labels
    return arrays
