"""Benchmark files as they are distributed, written small for the tests: ImageNet-segmentation's
MATLAB v7.3 file and img2dataset-style WebDataset shards."""

from __future__ import annotations

import io
import tarfile

import h5py
import numpy as np
from PIL import Image


def pixels(seed: int, size=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def write_gtsegs(path, images, masks, with_images=True) -> None:
    """A MATLAB v7.3-style file: /value/img[i, 0] references an image stored transposed
    (3, W, H); /value/gt[i, 0] references a 1×1 cell whose reference points at the mask
    stored transposed (W, H)."""
    ref = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = np.empty((len(images), 1), dtype=ref)
        gt = np.empty((len(images), 1), dtype=ref)
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            img[i, 0] = refs.create_dataset(f"img{i}", data=image.T).ref  # (3, W, H) or (W, H)
            target = refs.create_dataset(f"mask{i}", data=mask.transpose(1, 0))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=ref)
            cell[0, 0] = target.ref
            gt[i, 0] = cell.ref
        value = f.create_group("value")
        if with_images:
            value.create_dataset("img", data=img)
        value.create_dataset("gt", data=gt)


def write_shards(folder, per_shard=3, shards=2, images=True) -> list[tuple[np.ndarray, int]]:
    """img2dataset-style shards: KEY.png, KEY.txt, KEY.json and KEY.cls per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                array = pixels(100 * s + k)
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                label = (s * per_shard + k) % 3
                members = {".txt": b"a caption", ".json": b"{}", ".cls": str(label).encode()}
                if images:
                    members[".png"] = buffer.getvalue()
                for suffix, data in members.items():
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written.append((array, label))
    return written
