"""Image sources: the files of an image folder and their labels, and a dataset over them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingFileError

__all__ = ["IMAGE_SUFFIXES", "ImageDataset", "list_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Image files under `root` (relative paths, sorted), their labels and class names.

    ImageFolder layout (one sub-folder per class) gives labels 0..C-1 in sorted folder order;
    a flat folder gives labels -1 and no classes."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"images: expected a folder, got {root}")

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
        raise InputError(f"images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files, labels, classes


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images `files[start:]` under `root`, in order."""

    def __init__(self, root: Path, files: list[str], preprocess: Any, start: int) -> None:
        self.root, self.files, self.preprocess, self.start = root, files, preprocess, start

    def __len__(self) -> int:
        return len(self.files) - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.root / self.files[self.start + i]) as im:
            return self.preprocess(im.convert("RGB"))
