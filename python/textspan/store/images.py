"""Image sources: the files of an image folder and their labels, and a dataset over them."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingFileError, UnreadableImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "ReadableBatch",
    "TolerantImages",
    "collate_readable",
    "list_images",
    "open_file",
    "stamps",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _visible(path: Path, root: Path) -> bool:
    """Hidden files and folders (a name starting with '.') are not images of the set."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _images_under(folder: Path, root: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, root) and p.is_file()
    )


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Image files under `root` (relative paths, sorted), their labels and class names.

    ImageFolder layout: each sub-folder of `root` is a class, holding its images at any
    depth; labels are 0..C-1 in sorted folder order. A flat folder (images, no sub-folders
    with images) gives labels -1 and no classes. Hidden files and folders are ignored. Images
    beside class folders make the layout ambiguous: an error names them."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"images: expected a folder, got {root}")
    loose = _images_under(root, root, recursive=False)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d, root))
    per_class = {d.name: _images_under(d, root, recursive=True) for d in folders}
    classes = [name for name, found in per_class.items() if found]
    if classes and loose:
        shown = ", ".join(p.name for p in loose[:3]) + (" …" if len(loose) > 3 else "")
        raise InputError(
            f"images: {root} mixes {len(loose)} images at its top level ({shown}) with "
            f"{len(classes)} class folders; move them into a class folder (or the class "
            "folders' images up, for a flat set)"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files += [str(p.relative_to(root)) for p in per_class[name]]
        labels += [label] * len(per_class[name])
    if not classes:
        files = [p.name for p in loose]
        labels = [-1] * len(files)
    if not files:
        raise InputError(f"images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files, labels, classes


# An item inside a container file (a WebDataset shard): "CONTAINER//MEMBER".
MEMBER_SEPARATOR = "//"


def stamps(root: Path, files: list[str]) -> list[list[int]]:
    """What identifies each file's content cheaply: [size, modification time in ns] (of its
    container, for an item inside one)."""
    out = []
    for f in files:
        st = (root / f.split(MEMBER_SEPARATOR, 1)[0]).stat()
        out.append([st.st_size, st.st_mtime_ns])
    return out


# Opens the item `name` under `root` as an RGB PIL image.
Reader = Callable[[Path, str], Any]


def open_file(root: Path, name: str) -> Any:
    """The image file `root / name` as an RGB PIL image (the `Reader` of plain files)."""
    from PIL import Image

    with Image.open(root / name) as im:
        return im.convert("RGB")


def why_unreadable(path: Path, error: Exception) -> str:
    """Why an image cannot be read, the same in every run: PIL names an image read from
    memory by the object's address, which is left out."""
    why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image's bytes", str(error))
    return f"image {path} cannot be read: {why}"


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images `files[start:]` under `root`, in order; an unreadable image is an
    error naming it. `reader(root, name)` opens items that are not plain files."""

    def __init__(
        self,
        root: Path,
        files: list[str],
        preprocess: Any,
        start: int,
        reader: Reader | None = None,
    ) -> None:
        self.root, self.files, self.preprocess, self.start = root, files, preprocess, start
        self.reader = reader

    def __len__(self) -> int:
        return len(self.files) - self.start

    def _read(self, index: int) -> Any:
        """The preprocessed image; an unreadable one (truncated, empty, not an image) is an
        `UnreadableImageError` naming it."""
        name = self.files[index]
        try:
            return self.preprocess((self.reader or open_file)(self.root, name))
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken files
            raise UnreadableImageError(why_unreadable(self.root / name, e)) from None

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._read(self.start + i)


class TolerantImages(ImageDataset):
    """Like `ImageDataset`, but each item is (file index, image or None, why not): the
    engines decide whether an unreadable image is skipped or stops the run."""

    def __getitem__(self, i: int) -> tuple[int, Any, str]:
        index = self.start + i
        try:
            return index, self._read(index), ""
        except UnreadableImageError as e:
            return index, None, str(e)


def collate_readable(items: list[tuple[int, Any, str]]) -> ReadableBatch:
    """A batch of `TolerantImages` items: the readable images stacked, in file order."""
    good = [(i, x) for i, x, _ in items if x is not None]
    return ReadableBatch(
        indices=[i for i, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        unreadable=[(i, why) for i, x, why in items if x is None],
        last=max(i for i, _, _ in items),
    )


@dataclass
class ReadableBatch:
    indices: list[int]  # file indices of the readable images, in order
    images: torch.Tensor | None  # [len(indices), 3, H, W]
    unreadable: list[tuple[int, str]]  # file index and reason of each unreadable image
    last: int  # the batch's last file index

    def pin_memory(self) -> ReadableBatch:
        """Called by a DataLoader with `pin_memory=True` (on CUDA): page-locks the images."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self
