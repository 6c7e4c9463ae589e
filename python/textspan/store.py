"""Decomposing an image folder to an on-disk store, resumably, and reading it back.

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

The arrays are preallocated and written in place, in image order. Progress only moves
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
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .span import HeadStats

__all__ = ["Store", "StoreError", "extract", "list_images", "open_store"]

STORE_VERSION = 2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARRAYS = ("heads", "mlps", "class_token", "representation", "labels")
# Set by tests only: the process kills itself (SIGKILL) once this many rows are written.
FAULT_ENV = "TEXTSPAN_TEST_KILL_AFTER_ROWS"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, corrupt, or made with other arguments."""


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Image files under `root` (relative paths, sorted), their labels and class names.

    ImageFolder layout (one sub-folder per class) gives labels 0..C-1 in sorted folder order;
    a flat folder gives labels -1 and no classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images: expected a folder, got {root}")

    def images_in(folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and images_in(d))
    files: list[str] = []
    labels: list[int] = []
    if classes:
        for label, name in enumerate(classes):
            for p in images_in(root / name):
                files.append(str(p.relative_to(root)))
                labels.append(label)
    else:
        files = [p.name for p in images_in(root)]
        labels = [-1] * len(files)
    if not files:
        raise ValueError(f"images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files, labels, classes


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, files: list[str], preprocess: Any, start: int) -> None:
        self.root, self.files, self.preprocess, self.start = root, files, preprocess, start

    def __len__(self) -> int:
        return len(self.files) - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.root / self.files[self.start + i]) as im:
            return self.preprocess(im.convert("RGB"))


class _DeviceStats:
    """Per-head sums about a fixed shift s, in float64 on the model's device: the count,
    Σ(x − s) and Σ(x − s)(x − s)ᵀ. One in-place batched product per batch. The shift is the
    first batch's mean, close to the final mean, so the covariance recovered at the end does
    not cancel catastrophically."""

    def __init__(self, shape: tuple[int, int], dim: int, device: torch.device) -> None:
        self.shape, self.dim, self.device = shape, dim, device
        self.count = 0
        self.shift = torch.zeros(*shape, dim, dtype=torch.float64, device=device)
        self.sum1 = torch.zeros_like(self.shift)
        self.sum2 = torch.zeros(*shape, dim, dim, dtype=torch.float64, device=device)

    def update(self, heads: torch.Tensor) -> None:
        x = heads.to(torch.float64)
        n = x.shape[0]
        if self.count == 0:
            self.shift = x.mean(0)
        centred = (x - self.shift).reshape(n, -1, self.dim).transpose(0, 1)  # [LH, n, D]
        self.sum1 += centred.sum(1).view_as(self.sum1)
        self.sum2.view(-1, self.dim, self.dim).baddbmm_(centred.transpose(1, 2), centred)
        self.count += n

    def state(self) -> dict[str, np.ndarray]:
        return {
            "count": np.array(self.count),
            **{k: getattr(self, k).cpu().numpy() for k in ("shift", "sum1", "sum2")},
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.count = int(state["count"])
        for k in ("shift", "sum1", "sum2"):
            setattr(self, k, torch.as_tensor(state[k], dtype=torch.float64, device=self.device))


def _stats_from_sums(state: dict[str, np.ndarray]) -> HeadStats:
    """HeadStats from the count, shift and shifted sums that `_DeviceStats` keeps."""
    n = int(state["count"])
    offset = state["sum1"] / n
    covariance = state["sum2"] / n - offset[..., :, None] * offset[..., None, :]
    return HeadStats(n, state["shift"] + offset, covariance)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_sums(path: Path, state: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **state)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checksum(arrays: dict[str, np.ndarray], start: int, end: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][start:end]).tobytes())
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
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


def _expected_shapes(m: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    n, layers, heads, dim = m["count"], m["layers"], m["heads"], m["dim"]
    return {
        "heads": ((n, layers, heads, dim), m["dtype"]),
        "mlps": ((n, layers + 1, dim), m["dtype"]),
        "class_token": ((n, layers, dim), m["dtype"]),
        "representation": ((n, dim), m["dtype"]),
        "labels": ((n,), "int64"),
    }


def _open_arrays(path: Path, manifest: dict[str, Any], mode: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (shape, dtype) in _expected_shapes(manifest).items():
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


def _load_progress(
    path: Path, manifest: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    progress = _read_json(path / "progress.json", f"store {path}: progress.json")
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
    manifest = _read_json(path / "manifest.json", f"store {path}: manifest.json")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(
            f"store {path}: version {manifest.get('version')!r}, expected {STORE_VERSION} "
            "(stores of other versions hold other arrays: extract the images again)"
        )
    progress, sums = _load_progress(path, manifest)
    if sums is None or progress["done"] < manifest["count"]:
        raise StoreError(
            f"store {path} is incomplete: {progress['done']} of {manifest['count']} images "
            "extracted. Rerun the same extract command to finish it."
        )
    arrays = _open_arrays(path, manifest, "r")
    if verify:
        for start, end, digest in progress["ranges"]:
            if _checksum(arrays, start, end) != digest:
                raise StoreError(f"store {path}: rows {start}..{end} do not match their checksum")
    return Store(path, manifest, stats=_stats_from_sums(sums), **arrays)


def _manifest(
    model: str,
    pretrained: str | None,
    precision: str,
    dtype: str,
    root: Path,
    files: list[str],
    labels: list[int],
    classes: list[str],
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    layers, heads, dim = shape
    return {
        "version": STORE_VERSION,
        "model": model,
        "pretrained": pretrained,
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


def _same_arguments(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
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


def extract(
    images: str | os.PathLike,
    out: str | os.PathLike,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str | None = None,
    dtype: str = "float16",
    precision: str = "fp32",
    checkpoint_every: int = 4096,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_gpus_per_worker: float | None = None,
    shard_size: int = 1024,
) -> Store:
    """Decomposes every image under `images` into a store in `out`, resuming if it exists.

    Args:
        images: an ImageFolder-layout folder (labels from sub-folders) or a flat folder.
        out: the store's folder.
        model, pretrained, precision: as in `textspan.load`.
        batch_size: images per forward pass.
        workers: DataLoader worker processes ("local"), or Ray actors each holding the
            model ("ray").
        device: "cuda" when available, else "cpu", unless given ("local" only).
        dtype: "float16" or "float32" storage of the contributions (statistics are always
            accumulated in float64 from the float32 contributions).
        checkpoint_every: images between checkpoints (rounded up to whole batches; "local").
        engine: "local" (this process) or "ray": a Ray Data pipeline over a cluster (see
            `textspan.distributed`); `pip install 'textspan[ray]'`.
        address: the Ray cluster to join ("auto", "ray://host:10001", …); by default the
            instance running in this process, or a new local one.
        num_gpus_per_worker: GPUs per Ray actor (default: 1 when the cluster has GPUs).
        shard_size: images per Ray shard, the unit of work and of resumption.
    """
    from tqdm.auto import tqdm

    from .decompose import Decomposer
    from .models import load

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    if batch_size < 1 or workers < 0 or checkpoint_every < 1:
        raise ValueError(
            f"batch_size >= 1, workers >= 0 and checkpoint_every >= 1 expected, got "
            f"{batch_size}, {workers} and {checkpoint_every}"
        )
    if engine == "ray":
        from .distributed import extract_ray

        return extract_ray(
            images,
            out,
            model,
            pretrained,
            batch_size,
            workers,
            dtype,
            precision,
            address=address,
            num_gpus_per_worker=num_gpus_per_worker,
            shard_size=shard_size,
            progress=progress,
        )
    if engine != "local":
        raise ValueError(f"engine: expected 'local' or 'ray', got {engine!r}")
    root, out = Path(images), Path(out)
    files, labels, classes = list_images(root)
    net, preprocess, _ = load(model, pretrained=pretrained, device=device, precision=precision)
    visual = net.visual
    layers = len(visual.transformer.resblocks)
    heads = visual.transformer.resblocks[0].attn.num_heads
    dim = visual.output_dim
    pretrained_id = None if pretrained is None else str(pretrained)
    manifest = _manifest(
        str(model),
        pretrained_id,
        precision,
        dtype,
        root,
        files,
        labels,
        classes,
        (layers, heads, dim),
    )
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        old = _read_json(out / "manifest.json", f"store {out}: manifest.json")
        _same_arguments(old, manifest, out)
        arrays = _open_arrays(out, manifest, "r+")
        state, sums = _load_progress(out, manifest)
    else:
        arrays = {
            name: np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=dt, shape=shape)
            for name, (shape, dt) in _expected_shapes(manifest).items()
        }
        arrays["labels"][:] = labels
        state = {"done": 0, "ranges": []}
        sums = None
        _write_atomic(out / "progress.json", json.dumps(state).encode())
        _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    done = state["done"]
    print(f"textspan extract: {len(files)} images into {out} ({done} done before)", flush=True)
    device_ = next(net.parameters()).device
    acc = _DeviceStats((layers, heads), dim, device_)
    if sums is not None:
        acc.load(sums)
    every = max(1, -(-checkpoint_every // batch_size)) * batch_size
    fault = int(os.environ[FAULT_ENV]) if FAULT_ENV in os.environ else None

    def checkpoint(upto: int) -> None:
        nonlocal done
        if upto == done:
            return
        for a in arrays.values():
            a.flush()
        _save_sums(out / f"stats-{upto}.npz", acc.state())
        state["ranges"].append([done, upto, _checksum(arrays, done, upto)])
        state["done"] = upto
        _write_atomic(out / "progress.json", json.dumps(state).encode())
        for old in out.glob("stats-*.npz"):
            if old.name != f"stats-{upto}.npz":
                old.unlink()
        done = upto

    loader = torch.utils.data.DataLoader(
        _ImageDataset(root, files, preprocess, done),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        pin_memory=device_.type == "cuda",
    )
    row = first_row = done
    bar = tqdm(total=len(files), initial=done, desc="extracting", unit="img", disable=not progress)
    try:
        with Decomposer(net) as decomposer:
            for batch in loader:
                parts = decomposer.decompose(batch.to(device_, non_blocking=True))
                end = row + len(batch)
                acc.update(parts.heads)
                arrays["heads"][row:end] = parts.heads.cpu().numpy()
                arrays["mlps"][row:end] = parts.mlps.cpu().numpy()
                arrays["class_token"][row:end] = parts.class_token.cpu().numpy()
                arrays["representation"][row:end] = parts.representation.cpu().numpy()
                row = end
                bar.update(len(batch))
                if fault is not None and row >= fault:
                    os.kill(os.getpid(), signal.SIGKILL)
                if row - done >= every:
                    checkpoint(row)
        checkpoint(row)
    except KeyboardInterrupt:
        checkpoint(row)  # every finished batch is kept
        bar.close()
        print(f"\ninterrupted after {row} of {len(files)} images; rerun the same command to resume")
        raise
    elapsed = bar.format_dict["elapsed"]
    bar.close()
    ran = row - first_row
    speed = f" ({ran / elapsed:.1f} images/s)" if ran and elapsed > 0 else ""
    print(f"done: {out}{speed}", flush=True)
    return open_store(out)
