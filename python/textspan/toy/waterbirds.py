"""A Waterbirds-shaped dataset from the toy world (`textspan toy-data waterbirds DIR`).

The real Waterbirds (`waterbird_complete95_forest2water2`) pairs each bird class with a
background ("place") 95% of the time in its training split and evenly in val and test. Here
the class is the toy object's shape and the place its background, from the correlated pair
the spurious toy CLIP was trained on (`toy.model.SPURIOUS`: circle/grass, triangle/water),
written in the real layout: one folder per class of PNG images and a `metadata.csv` with
`img_id, img_filename, y, split, place`, so `textspan.datasets.waterbirds` reads it as it
reads the real thing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import world as tw
from .model import SPURIOUS

__all__ = ["write_waterbirds"]

# The real training split's share of images whose place is their class's usual one.
MAJORITY = 0.95


def _group_counts(split: str, per_class: int) -> dict[tuple[int, int], int]:
    """(y, place) → images: 95% majority groups in train, even in val and test."""
    if split == "train":
        minority = max(1, round(per_class * (1 - MAJORITY)))
        return {
            (y, p): per_class - minority if y == p else minority for y in (0, 1) for p in (0, 1)
        }
    half = per_class // 2
    return {(y, p): half for y in (0, 1) for p in (0, 1)}


def write_waterbirds(
    root: str | Path,
    train: int = 200,
    val: int = 60,
    test: int = 120,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Writes the dataset into `root` (per-class image counts of each split; val and test
    even numbers) and returns the path of its metadata.csv."""
    if min(train, val, test) < 2:
        raise InputError(
            f"toy waterbirds: expected >= 2 images per class and split, got {train}, {val}, {test}"
        )
    root = Path(root)
    classes = list(SPURIOUS.pairs)  # y = 0, 1
    places = list(SPURIOUS.pairs.values())  # place = 0, 1: each class's usual background
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rows = []
    for split_index, (split, per_class) in enumerate(
        (("train", train), ("val", val), ("test", test))
    ):
        counts = _group_counts(split, per_class)
        most = max(counts.values())
        world = tw.balanced_groups(most, SPURIOUS, seed=seed * 10 + split_index, size=size)
        shapes, backgrounds = world.names("shape"), world.names("background")
        for (y, place), count in counts.items():
            picked = np.flatnonzero((shapes == classes[y]) & (backgrounds == places[place]))
            for i in picked[:count]:
                image_id = len(rows) + 1
                name = f"{classes[y]}/{image_id:05d}_{places[place]}.png"
                Image.fromarray(world.images[i]).save(root / name)
                rows.append([image_id, name, y, split_index, place])
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    meta = root / "metadata.csv"
    with open(meta, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place"])
        writer.writerows(rows)
    return meta
