"""The benchmarks as they are distributed: ImageNet's validation set, Waterbirds,
ImageNet-segmentation and WebDataset shards.

Every reader returns an `ImageSet`: `len(ds)`, `ds[i]` → (PIL image, target), `ds.files` in
the source's order and `ds.labels` read from the data (never from file order). Every command
that takes an image folder also takes a *spec* (`open_images`):

    FOLDER                     an image folder (class sub-folders, or flat)
    imagenet:ROOT              ImageNet validation: synset folders, or the flat
                               ILSVRC2012_val_*.JPEG with LOC_val_solution.csv or the devkit
    imagenet:ROOT:LABELS       the same with the label file given (a LOC_val_solution.csv,
                               or the devkit folder)
    waterbirds:ROOT:SPLIT      waterbird_complete95_forest2water2 (train, val or test)
    webdataset:PATTERN         .tar shards (a glob, or several separated by commas)

ImageNet-segmentation (`imagenet_segmentation`) holds masks as well and is read by
`textspan segment imagenet-seg:FILE OUT`.
"""

from __future__ import annotations

import atexit
import csv
import glob
import os
import re
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.checks import Convention
from .errors import DataWarning, InputError, MissingDependencyError, MissingFileError
from .store.images import IMAGE_SUFFIXES, MEMBER_SEPARATOR, list_images, open_file, stamps
from .store.manifest import Manifest

__all__ = [
    "WATERBIRDS_SPLITS",
    "ImageSet",
    "SegmentationSet",
    "imagenet",
    "imagenet_segmentation",
    "manifest_of",
    "open_images",
    "reader_of",
    "waterbirds",
    "webdataset",
]

WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")
IMAGENET_VAL_PER_CLASS = 50


@dataclass
class ImageSet:
    """Images as named items under a root, with labels.

    Attributes:
        root: the folder the names are relative to.
        files: each image's name, in the source's order.
        labels: [N] int64 class indices (-1: unknown).
        classes: class names or ImageNet synsets, indexed by the labels.
        name: what was read ("imagenet", "waterbirds:test", "folder", …).
        attributes: per-image integer arrays the source carries (Waterbirds: place, group).
        reader: opens the item `files[i]` under `root`; None for plain files.
    """

    root: Path
    files: list[str]
    labels: np.ndarray
    classes: list[str]
    name: str
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    reader: Callable[[Path, str], Any] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.open(i), int(self.labels[i])

    def open(self, i: int) -> Any:
        """The i-th image as an RGB PIL image."""
        return (self.reader or open_file)(self.root, self.files[i])

    @property
    def places(self) -> np.ndarray:
        return self._attribute("place")

    @property
    def groups(self) -> np.ndarray:
        return self._attribute("group")

    def _attribute(self, key: str) -> np.ndarray:
        if key not in self.attributes:
            raise InputError(f"{self.name}: has no {key!r} per image")
        return self.attributes[key]


def manifest_of(
    source: ImageSet,
    *,
    model: Any,
    pretrained: Any,
    precision: str,
    dtype: str,
    shape: tuple[int, int, int, tuple[str, ...]],
    convention: Convention,
) -> Manifest:
    """The manifest of a store of `source`'s images, decomposed by `model` (whose tower has
    `shape`: layers, heads, D and the names of the mlps terms)."""
    layers, heads, dim, terms = shape
    return Manifest(
        model=str(model),
        pretrained=None if pretrained is None else str(pretrained),
        precision=precision,
        dtype=dtype,
        convention=convention,
        images=str(source.root.resolve()),
        layers=layers,
        heads=heads,
        dim=dim,
        terms=tuple(terms),
        classes=tuple(source.classes),
        files=tuple(source.files),
        labels=tuple(int(v) for v in source.labels),
        stamps=tuple(tuple(s) for s in stamps(source.root, source.files)),
        dataset=source.name,
        attributes={k: tuple(int(v) for v in a) for k, a in source.attributes.items()},
    )


def folder(root: str | os.PathLike) -> ImageSet:
    """An image folder: class sub-folders (labels in sorted folder order) or flat."""
    files, labels, classes = list_images(root)
    return ImageSet(Path(root), files, np.asarray(labels, dtype=np.int64), classes, "folder")


# ImageNet ---------------------------------------------------------------------------------


def _synsets() -> list[str]:
    from .models.texts import imagenet_synsets

    return imagenet_synsets()


def imagenet(root: str | os.PathLike, ground_truth: str | os.PathLike | None = None) -> ImageSet:
    """ImageNet's validation set as distributed.

    Either class folders named by synset (any subset of the 1000), or the flat folder of
    `ILSVRC2012_val_*.JPEG` with its labels from `LOC_val_solution.csv` (in `root`, beside
    it, or `ground_truth`) or from the devkit (`ILSVRC2012_validation_ground_truth.txt` and
    `meta.mat`, in `ground_truth` or `root/ILSVRC2012_devkit_t12/data`). `labels` are the
    standard indices (sorted synsets: 0 = n01440764, 999 = n15075141) and `classes` the 1000
    synsets. A set whose per-class counts are not the validation set's 50 gets a warning.
    """
    root = Path(root).expanduser()
    if ground_truth is not None:
        ground_truth = Path(ground_truth).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"imagenet: expected the validation folder, got {root}")
    synsets = _synsets()
    index = {s: i for i, s in enumerate(synsets)}
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("n"))
    if folders and ground_truth is None:
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise InputError(
                f"imagenet: {root} has class folders that are not ImageNet-1k synsets, e.g. "
                f"{unknown[0]!r}"
            )
        files, labels, classes = list_images(root)
        strays = [c for c in classes if c not in index]
        if strays:
            raise InputError(
                f"imagenet: {root} has folders of images beside the synset folders that are not "
                f"ImageNet-1k synsets, e.g. {strays[0]!r}: move them out"
            )
        standard = np.array([index[classes[label]] for label in labels], dtype=np.int64)
        ds = ImageSet(root, files, standard, synsets, "imagenet")
    else:
        ds = _flat_imagenet(root, ground_truth, synsets, index)
    _check_counts(ds)
    return ds


def _flat_imagenet(root: Path, ground_truth, synsets, index) -> ImageSet:
    files = sorted(
        p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise InputError(f"imagenet: no images and no synset folders in {root}")
    source = _label_source(root, ground_truth)
    if source.name.lower().endswith(".csv"):
        by_id = _solution_csv(source, index)
        what = str(source)
    else:
        by_id = _devkit(source, synsets)
        what = f"the devkit in {source}"
    missing = [f for f in files if Path(f).stem not in by_id]
    if missing:
        raise InputError(
            f"imagenet: {len(missing)} images have no label in {what}, e.g. {missing[0]!r}"
        )
    labels = np.array([by_id[Path(f).stem] for f in files], dtype=np.int64)
    if len(files) < len(by_id):
        warnings.warn(
            f"imagenet: {what} labels {len(by_id)} images, {root} holds {len(files)}",
            DataWarning,
            stacklevel=3,
        )
    return ImageSet(root, files, labels, synsets, "imagenet")


def _label_source(root: Path, ground_truth) -> Path:
    if ground_truth is not None:
        path = Path(ground_truth)
        if not path.exists():
            raise MissingFileError(f"imagenet: the label file or devkit {path} does not exist")
        return path
    for candidate in (
        root / "LOC_val_solution.csv",
        root.parent / "LOC_val_solution.csv",
        root / "ILSVRC2012_devkit_t12" / "data",
        root.parent / "ILSVRC2012_devkit_t12" / "data",
    ):
        if candidate.exists():
            return candidate
    raise MissingFileError(
        f"imagenet: {root} is a flat folder, so its labels are needed: expected "
        "LOC_val_solution.csv in it or beside it, or the devkit (ILSVRC2012_devkit_t12/data "
        "with ILSVRC2012_validation_ground_truth.txt and meta.mat); pass either as "
        "imagenet:ROOT:LABELS"
    )


def _solution_csv(path: Path, index: dict[str, int]) -> dict[str, int]:
    """LOC_val_solution.csv: ImageId, PredictionString ("n01751748 x0 y0 x1 y1 …"); the
    label is the first box's synset."""
    # utf-8-sig: a byte-order mark before the header (as spreadsheets write) is not a column.
    try:
        return _solution_rows(path, index)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: expected UTF-8 text ({e})") from None


def _solution_rows(path: Path, index: dict[str, int]) -> dict[str, int]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {"ImageId", "PredictionString"}
        if not columns <= set(reader.fieldnames or []):
            raise InputError(
                f"{path}: expected the columns ImageId and PredictionString, got "
                f"{reader.fieldnames}"
            )
        out = {}
        for row in reader:
            synset = (row["PredictionString"] or "").split()[:1]
            if not synset or synset[0] not in index:
                raise InputError(
                    f"{path}: image {row['ImageId']} is labelled {synset[0] if synset else '—'!r}, "
                    "not an ImageNet-1k synset"
                )
            label = index[synset[0]]
            if out.setdefault(row["ImageId"], label) != label:
                raise InputError(
                    f"{path}: image {row['ImageId']} is listed twice with other synsets "
                    f"({synset[0]!r} on line {reader.line_num}): which is its label?"
                )
    return out


def _devkit(folder: Path, synsets: list[str]) -> dict[str, int]:
    """The devkit's ground truth: one ILSVRC2012_ID per line for images 1..50,000, the IDs
    mapped to synsets by meta.mat."""
    truth, meta = folder / "ILSVRC2012_validation_ground_truth.txt", folder / "meta.mat"
    for path in (truth, meta):
        if not path.is_file():
            raise MissingFileError(f"imagenet: the devkit needs {path}")
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy comes with the datasets extra
        raise MissingDependencyError(
            "reading meta.mat needs scipy: pip install 'textspan[datasets]'"
        ) from None
    try:
        entries = loadmat(meta, squeeze_me=True)["synsets"]
        by_ilsvrc = {int(e["ILSVRC2012_ID"]): str(e["WNID"]) for e in entries}
    except Exception as e:  # scipy raises many kinds on a broken file
        raise InputError(
            f"{meta}: expected the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID "
            f"and WNID), could not read it: {type(e).__name__}: {e}"
        ) from None
    index = {s: i for i, s in enumerate(synsets)}
    out = {}
    for n, line in enumerate(truth.read_text(errors="replace").split(), 1):
        if not line.isdigit():
            raise InputError(f"{truth}: line {n}: expected an ILSVRC2012_ID, got {line[:20]!r}")
        wnid = by_ilsvrc.get(int(line))
        if wnid not in index:
            raise InputError(
                f"{truth}: line {n} names ILSVRC2012_ID {line}, which meta.mat maps to "
                f"{wnid!r}, not an ImageNet-1k synset"
            )
        out[f"ILSVRC2012_val_{n:08d}"] = index[wnid]
    return out


def _check_counts(ds: ImageSet) -> None:
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    present = counts[counts > 0]
    full = len(ds) == IMAGENET_VAL_PER_CLASS * len(ds.classes)
    if full and not (counts == IMAGENET_VAL_PER_CLASS).all():
        warnings.warn(
            f"imagenet: the full validation set has {IMAGENET_VAL_PER_CLASS} images per class; "
            f"this one has between {present.min()} and {counts.max()} (labels or files are "
            "wrong)",
            DataWarning,
            stacklevel=3,
        )


# Waterbirds ---------------------------------------------------------------------------


def _integer(path: Path, line: int, column: str, text: str | None) -> int:
    """A CSV cell that must hold an integer, or an InputError naming the file, line, column."""
    try:
        return int(text or "")
    except ValueError:
        raise InputError(
            f"{path}: line {line}: expected an integer {column}, got {text!r}"
        ) from None


def waterbirds(root: str | os.PathLike, split: str) -> ImageSet:
    """`waterbird_complete95_forest2water2` with its `metadata.csv` (img_filename, y, split,
    place): the images of one split ("train", "val" or "test"). `labels` is y (0 landbird,
    1 waterbird), `places` the place (0 land, 1 water), `groups` y × 2 + place. The class
    names are "landbird" and "waterbird", or the lines of a `classes.txt` beside the
    metadata (the toy dataset names its shapes so)."""
    root = Path(root).expanduser()
    if split not in WATERBIRDS_SPLITS:
        raise InputError(f"waterbirds: split: expected train, val or test, got {split!r}")
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise MissingFileError(f"waterbirds: expected {meta} (the dataset's metadata.csv)")
    # utf-8-sig: a byte-order mark before the header (as spreadsheets write) is not a column.
    with open(meta, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in WATERBIRDS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                f"{meta}: expected the columns {', '.join(WATERBIRDS_COLUMNS)}; missing "
                f"{', '.join(missing)} (got {reader.fieldnames})"
            )
        rows = []
        for r in reader:
            values = {c: _integer(meta, reader.line_num, c, r[c]) for c in ("y", "split", "place")}
            if values["split"] == WATERBIRDS_SPLITS[split]:
                rows.append({**r, **values})
    if not rows:
        raise InputError(f"{meta}: no image in the {split} split")
    files = [r["img_filename"] for r in rows]
    escaping = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if escaping:
        raise InputError(f"{meta}: img_filename must name a file under {root}, got {escaping[0]!r}")
    absent = [f for f in files if not (root / f).is_file()]
    if absent:
        raise MissingFileError(
            f"waterbirds: {len(absent)} images of metadata.csv are missing under {root}, e.g. "
            f"{absent[0]}"
        )
    y = np.array([r["y"] for r in rows], dtype=np.int64)
    place = np.array([r["place"] for r in rows], dtype=np.int64)
    names = root / "classes.txt"
    classes = names.read_text().split("\n")[:2] if names.is_file() else ["landbird", "waterbird"]
    return ImageSet(
        root,
        files,
        y,
        classes,
        f"waterbirds:{split}",
        attributes={"place": place, "group": y * 2 + place},
    )


# ImageNet-segmentation ----------------------------------------------------------------


@dataclass
class SegmentationSet:
    """ImageNet-segmentation (`gtsegs_ijcv.mat`): `ds[i]` → (PIL image, mask [H, W] uint8
    exactly as stored)."""

    path: Path
    count: int

    def __len__(self) -> int:
        return self.count

    @property
    def files(self) -> list[str]:
        return [f"{i:04d}" for i in range(self.count)]

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray]:
        return self.image(i), self.mask(i)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(i)

    def image(self, i: int) -> Any:
        """The i-th image (PIL, RGB; a grayscale one is made RGB), without reading its
        mask. Pixels must be integers in 0..255."""
        from PIL import Image

        self._check(i)
        with _h5(self.path) as f:
            image = np.asarray(f[f["value/img"][i, 0]]).T  # stored transposed: (3, W, H)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"{self.path}: image {i}: expected [H, W, 3], got {list(image.shape)}")
        integral = np.issubdtype(image.dtype, np.integer)
        if not integral or (image.size and (image.min() < 0 or image.max() > 255)):
            raise InputError(
                f"{self.path}: image {i}: expected integer pixels in 0..255, got {image.dtype}"
            )
        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))

    def image_shape(self, i: int) -> tuple[int, int]:
        """The i-th image's (H, W), read from the file's header only."""
        self._check(i)
        with _h5(self.path) as f:
            shape = f[f["value/img"][i, 0]].shape  # (3, W, H) or (W, H)
        return int(shape[-1]), int(shape[-2])

    def mask(self, i: int) -> np.ndarray:
        """The i-th mask [H, W] exactly as stored (0/1, or 0/255), without reading its
        image; other values are refused, naming the item."""
        self._check(i)
        with _h5(self.path) as f:
            cell = f[f["value/gt"][i, 0]]
            mask = np.asarray(f[cell[0, 0]]).transpose(1, 0)
        values = np.unique(mask)
        if not np.isin(values, (0, 1, 255)).all():
            raise InputError(
                f"{self.path}: mask {i}: expected a binary mask (0/1 or 0/255), got values "
                f"{values[:6].tolist()}"
            )
        return mask


def _h5(path: Path):
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py comes with the datasets extra
        raise MissingDependencyError(
            "reading ImageNet-segmentation needs h5py: pip install 'textspan[datasets]'"
        ) from None
    return h5py.File(path, "r")


def imagenet_segmentation(path: str | os.PathLike) -> SegmentationSet:
    """`gtsegs_ijcv.mat` (MATLAB v7.3: HDF5 with object references under `/value/img` and
    `/value/gt`): 4,276 images with binary masks."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"imagenet-seg: expected the file gtsegs_ijcv.mat, got {path}")
    try:
        f = _h5(path)
    except OSError as e:
        raise InputError(f"imagenet-seg: {path} is not a MATLAB v7.3 (HDF5) file: {e}") from None
    with f:
        for key in ("value/img", "value/gt"):
            if key not in f:
                raise InputError(
                    f"imagenet-seg: {path} has no /{key} (expected gtsegs_ijcv.mat's "
                    "/value/img and /value/gt references)"
                )
        count = f["value/img"].shape[0]
        if f["value/gt"].shape[0] != count:
            raise InputError(
                f"imagenet-seg: {path} has {count} images but {f['value/gt'].shape[0]} masks"
            )
    return SegmentationSet(path, count)


# WebDataset shards ---------------------------------------------------------------------


def _shards(pattern: str) -> list[Path]:
    paths: list[Path] = []
    for part in pattern.split(","):
        part = os.path.expanduser(part)
        found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not found:  # a typo in one part must not silently drop its shards
            raise MissingFileError(f"webdataset: no shard matches {part!r} (in {pattern!r})")
        paths += [Path(p) for p in found]
    # A shard listed twice (two overlapping patterns) is read once.
    firsts = {p.resolve(): p for p in reversed(paths)}
    paths = [p for p in paths if firsts[p.resolve()] is p]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"webdataset: the shard {missing[0]} does not exist")
    return paths


# Per process (each DataLoader worker has its own): the shards opened so far, with an index
# of their members, so that reading an item does not scan its archive again.
_OPEN_SHARDS: dict[Path, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
_MAX_OPEN_SHARDS = 8


@atexit.register
def _close_shards() -> None:
    while _OPEN_SHARDS:
        _OPEN_SHARDS.popitem()[1][0].close()


def _shard(path: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    if path not in _OPEN_SHARDS:
        if len(_OPEN_SHARDS) >= _MAX_OPEN_SHARDS:
            oldest = next(iter(_OPEN_SHARDS))
            _OPEN_SHARDS.pop(oldest)[0].close()
        tar = tarfile.open(path)
        _OPEN_SHARDS[path] = (tar, {m.name: m for m in tar.getmembers()})
    return _OPEN_SHARDS[path]


def _read_member(root: Path, name: str) -> Any:
    from io import BytesIO

    from PIL import Image

    shard, member = name.split(MEMBER_SEPARATOR, 1)
    tar, members = _shard(root / shard)
    data = tar.extractfile(members[member]) if member in members else None
    if data is None:
        raise OSError(f"{member} is not a file in {shard}")
    with Image.open(BytesIO(data.read())) as im:
        return im.convert("RGB")


def _check_complete(shard: Path, tar: tarfile.TarFile) -> None:
    """Python's tarfile takes a short or damaged header for the end of the archive: a
    truncated shard would read as a shorter one. What follows the last member must be the
    archive's end, within the file: two zero blocks of 512 bytes (and zero padding)."""
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return  # compressed: the offsets are the decompressed stream's
        f.seek(min(tar.offset, size))
        rest = f.read()
    if tar.offset > size or len(rest) < 1024 or any(rest):  # the end: two zero blocks
        raise InputError(
            f"webdataset: {shard} is truncated or damaged after {len(tar.getmembers())} "
            f"members (byte {tar.offset} of {size}): write or download it again"
        )


def reader_of(dataset: str) -> Callable[[Path, str], Any]:
    """How the items of a store's images are opened, by the name of the reader that listed
    them (`Manifest.dataset`): members of WebDataset shards, else plain files."""
    return _read_member if dataset == "webdataset" else open_file


def webdataset(pattern: str | os.PathLike | list[str]) -> ImageSet:
    """WebDataset shards (the `.tar` files img2dataset writes: `KEY.jpg` beside `KEY.txt` /
    `KEY.json`): one item per image member, named `SHARD//MEMBER`, in shard and member
    order; labels -1 (a `.cls` sidecar, when present, gives the class index)."""
    paths = _shards(",".join(map(str, pattern)) if isinstance(pattern, list) else str(pattern))
    root = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    files: list[str] = []
    labels: list[int] = []
    for shard in paths:
        relative = str(shard.resolve().relative_to(root))
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                _check_complete(shard, tar)
                classes = {}
                for m in members:
                    if m.name.endswith(".cls"):
                        data = tar.extractfile(m)
                        text = data.read().strip() if data else b""
                        number = re.fullmatch(rb"-?\d{1,18}", text)
                        if number is None:
                            raise InputError(
                                f"webdataset: {shard}: {m.name}: expected a class index, got "
                                f"{text[:20]!r}"
                            )
                        classes[m.name[:-4]] = int(text)
        except tarfile.TarError as e:
            raise InputError(
                f"webdataset: {shard} is not a tar archive, or is truncated or damaged: {e}"
            ) from None
        names = [m.name for m in members]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InputError(
                f"webdataset: {shard} holds the member {twice!r} twice: an item must be one "
                "member (rewrite the shard with unique keys)"
            )
        for m in members:
            stem, suffix = os.path.splitext(m.name)
            if suffix.lower() in IMAGE_SUFFIXES:
                files.append(f"{relative}{MEMBER_SEPARATOR}{m.name}")
                labels.append(classes.get(stem, -1))
    if not files:
        raise InputError(
            f"webdataset: no image members ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
            f"{len(paths)} shard(s), e.g. {paths[0]}"
        )
    return ImageSet(
        root, files, np.array(labels, dtype=np.int64), [], "webdataset", reader=_read_member
    )


# Specs ---------------------------------------------------------------------------------


def open_images(spec: Any) -> ImageSet:
    """An `ImageSet` from a spec (see the module docstring), a folder path, or an ImageSet."""
    if isinstance(spec, ImageSet):
        return spec
    text = str(spec)
    kind, _, rest = text.partition(":")
    if kind == "imagenet" and rest:
        root, _, labels = rest.partition(":")
        return imagenet(root, labels or None)
    if kind == "waterbirds" and rest:
        root, _, split = rest.rpartition(":")
        if not root:
            raise InputError(f"waterbirds: expected waterbirds:ROOT:SPLIT, got {text!r}")
        return waterbirds(root, split)
    if kind == "webdataset" and rest:
        return webdataset(rest)
    if kind == "imagenet-seg":
        raise InputError(
            "imagenet-seg holds masks, not a labelled image set: use it with "
            "`textspan segment imagenet-seg:FILE OUT`"
        )
    return folder(text)
