"""Extraction in this process: a DataLoader over the images, the decomposition on the model's
device, checkpoints that a rerun resumes from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..models import Decomposer, load, tower_of
from ..store.format import (
    Store,
    checksum,
    create_arrays,
    load_progress,
    make_manifest,
    open_arrays,
    open_store,
    read_json,
    same_arguments,
    write_atomic,
)
from ..store.images import ImageDataset, list_images
from ..store.sums import DeviceStats, save_sums

__all__ = ["extract_local"]


class _Checkpoints:
    """The store being written: its arrays, its statistics, and how far it is done.

    Progress only moves at a checkpoint, after the arrays are flushed and the statistics
    saved, so a store interrupted anywhere resumes from the last one."""

    def __init__(self, out: Path, manifest: dict[str, Any], labels: list[int], device: Any):
        self.out = out
        if (out / "manifest.json").exists():
            old = read_json(out / "manifest.json", f"store {out}: manifest.json")
            same_arguments(old, manifest, out)
            self.arrays = open_arrays(out, manifest, "r+")
            self.state, sums = load_progress(out, manifest)
        else:
            self.arrays = create_arrays(out, manifest, labels)
            self.state, sums = {"done": 0, "ranges": []}, None
            write_atomic(out / "progress.json", json.dumps(self.state).encode())
            write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
        shape = (manifest["layers"], manifest["heads"])
        self.stats = DeviceStats(shape, manifest["dim"], device)
        if sums is not None:
            self.stats.load(sums)

    @property
    def done(self) -> int:
        return self.state["done"]

    def write(self, row: int, parts: Any) -> int:
        """Writes a batch's contributions at `row` and adds its heads to the statistics;
        returns the row after it."""
        end = row + len(parts.heads)
        self.stats.update(parts.heads)
        for name in ("heads", "mlps", "class_token", "representation"):
            self.arrays[name][row:end] = getattr(parts, name).cpu().numpy()
        return end

    def save(self, upto: int) -> None:
        done = self.done
        if upto == done:
            return
        for a in self.arrays.values():
            a.flush()
        save_sums(self.out / f"stats-{upto}.npz", self.stats.state())
        self.state["ranges"].append([done, upto, checksum(self.arrays, done, upto)])
        self.state["done"] = upto
        write_atomic(self.out / "progress.json", json.dumps(self.state).encode())
        for old in self.out.glob("stats-*.npz"):
            if old.name != f"stats-{upto}.npz":
                old.unlink()


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
) -> Store:
    """`textspan.extract(..., engine="local")`. `after_batch(rows)` is called after each
    batch is written, with the number of rows written so far (before any checkpoint)."""
    from tqdm.auto import tqdm

    root, out = Path(images), Path(out)
    listing = list_images(root)
    files, labels, _ = listing
    net, preprocess, _ = load(model, pretrained=pretrained, device=device, precision=precision)
    tower = tower_of(net)
    shape = (tower.layers, tower.heads, tower.dim)
    manifest = make_manifest(model, pretrained, precision, dtype, root, listing, shape)
    out.mkdir(parents=True, exist_ok=True)
    device_ = next(net.parameters()).device
    store = _Checkpoints(out, manifest, labels, device_)
    print(
        f"textspan extract: {len(files)} images into {out} ({store.done} done before)", flush=True
    )
    every = max(1, -(-checkpoint_every // batch_size)) * batch_size
    loader = torch.utils.data.DataLoader(
        ImageDataset(root, files, preprocess, store.done),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        pin_memory=device_.type == "cuda",
    )
    row = first_row = store.done
    bar = tqdm(total=len(files), initial=row, desc="extracting", unit="img", disable=not progress)
    try:
        with Decomposer(net) as decomposer:
            for batch in loader:
                row = store.write(row, decomposer.decompose(batch.to(device_, non_blocking=True)))
                bar.update(len(batch))
                if after_batch is not None:
                    after_batch(row)
                if row - store.done >= every:
                    store.save(row)
        store.save(row)
    except KeyboardInterrupt:
        store.save(row)  # every finished batch is kept
        bar.close()
        print(f"\ninterrupted after {row} of {len(files)} images; rerun the same command to resume")
        raise
    elapsed = bar.format_dict["elapsed"]
    bar.close()
    ran = row - first_row
    speed = f" ({ran / elapsed:.1f} images/s)" if ran and elapsed > 0 else ""
    print(f"done: {out}{speed}", flush=True)
    return open_store(out)
