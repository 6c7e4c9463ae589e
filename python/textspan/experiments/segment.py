"""`textspan segment`: zero-shot segmentation of an image folder → heatmaps.npy, classes.csv,
overlays.png, and with masks, metrics.json."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import report
from ..analysis import Segmentation, segment
from ..core.checks import CONVENTIONS, Convention
from ..core.metrics import foreground
from ..datasets import open_images
from ..errors import InputError, MissingFileError
from ..models import load, tower_of
from ..store.images import ImageDataset
from .common import (
    class_names,
    model_options,
    store_options,
    template_list,
    zero_shot_weights,
)

NAME = "segment"
ORDER = 7  # its place in `textspan --help`
HELP = "zero-shot segmentation of an image folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images",
        help="image folder (one sub-folder per class, or flat), a dataset spec "
        "(imagenet:ROOT, waterbirds:ROOT:SPLIT, webdataset:GLOB), or imagenet-seg:FILE "
        "(gtsegs_ijcv.mat: images and masks, scored under both mask protocols)",
    )
    store_options(p, store=False)
    model_options(p)
    p.add_argument(
        "--masks",
        default=None,
        help="folder of binary mask PNGs named like the images: adds metrics",
    )
    p.add_argument(
        "--given-class",
        action="store_true",
        help="use each image's class folder instead of the predicted class",
    )
    p.add_argument("--method", choices=["decomposition", "attention"], default="decomposition")
    p.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        default="textspan",
        help="textspan's (default) or the paper code's token terms and map arithmetic",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--overlays", type=int, default=8, help="images shown in overlays.png")


def main(args: argparse.Namespace) -> int:
    run(
        args.images,
        args.out or "segmentation",
        model=args.model,
        pretrained=args.pretrained,
        classes_file=args.classes,
        templates=args.templates,
        masks=args.masks,
        given_class=args.given_class,
        method=args.method,
        batch_size=args.batch_size,
        workers=args.workers,
        overlays=args.overlays,
        device=args.device,
        precision=args.precision,
        convention=args.convention,
    )
    return 0


@dataclass
class SegmentStudy:
    """The segmentation, and its scores against the masks when masks were given."""

    segmentation: Segmentation
    scores: dict[str, float] | None
    # ImageNet-segmentation: the scores under each mask protocol ("paper", "aligned").
    protocols: dict[str, dict[str, float]] | None = None


def aligned_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask [H0, W0] resized (nearest) and centre-cropped exactly like the model's
    preprocessing crops its image; any non-zero pixel is foreground."""
    from PIL import Image

    im = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    h, w = size
    scale = max(h / im.height, w / im.width)
    im = im.resize(
        (max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.NEAREST
    )
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h))) > 0


def paper_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The paper's protocol: the mask resized (nearest) straight to the crop size, while its
    image is resized and centre-cropped (the two disagree on images that are not square)."""
    from PIL import Image

    im = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return np.asarray(im.resize((size[1], size[0]), Image.NEAREST)) > 0


# Mask protocols for a set whose masks come at the image's own size.
MASK_PROTOCOLS = {"paper": paper_mask, "aligned": aligned_mask}


def read_mask(path: Path, size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """A mask file, aligned with its image of `image_size` (W, H) (`aligned_mask`)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.size != image_size:
            raise InputError(
                f"mask {path}: it is {im.size[0]}×{im.size[1]} px, its image "
                f"{image_size[0]}×{image_size[1]}: a mask of another image, or transposed"
            )
        values = np.unique(np.asarray(im.convert("L")))
        if not np.isin(values, (0, 1, 255)).all():
            raise InputError(
                f"mask {path}: expected a binary mask (0/1 or 0/255), got values "
                f"{values[:6].tolist()}"
            )
        return aligned_mask(np.asarray(im.convert("L")), size)


def _image_size(source: Any, i: int) -> tuple[int, int]:
    """The i-th image's (W, H): from the file's header, or the decoded item."""
    from PIL import Image

    if source.reader is not None:
        return source.open(i).size
    with Image.open(source.root / source.files[i]) as im:
        return im.size


def run(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    classes_file: str | None = None,
    templates: str | None = None,
    masks: str | os.PathLike | None = None,
    given_class: bool = False,
    method: str = "decomposition",
    batch_size: int = 16,
    workers: int = 0,
    overlays: int = 8,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = True,
    convention: Convention = "textspan",
) -> SegmentStudy:
    """Zero-shot segmentation of an image folder → heatmaps.npy, classes.csv, overlays.png,
    and with `masks` (a folder of mask images named like the images) metrics.json;
    `images` "imagenet-seg:FILE" reads images and masks from gtsegs_ijcv.mat and scores
    both mask protocols."""
    if method not in ("decomposition", "attention"):
        raise InputError(f"method: expected 'decomposition' or 'attention', got {method!r}")
    if overlays < 0 or batch_size < 1 or workers < 0:
        raise InputError(
            f"overlays >= 0, batch_size >= 1 and workers >= 0 expected, got {overlays}, "
            f"{batch_size} and {workers}"
        )
    template_list(templates)  # a bad templates file fails now, not after the work
    if str(images).startswith("imagenet-seg:"):
        if masks is not None or given_class:
            raise InputError(
                "imagenet-seg: the file holds the masks and no classes: drop --masks and "
                "--given-class"
            )
        return _run_imagenet_seg(
            str(images).split(":", 1)[1],
            out,
            model=model,
            pretrained=pretrained,
            classes_file=classes_file or "imagenet",
            templates=templates,
            method=method,
            batch_size=batch_size,
            workers=workers,
            overlays=overlays,
            device=device,
            precision=precision,
            progress=progress,
            convention=convention,
        )
    source = open_images(images)
    files, labels, folders = source.files, source.labels, source.classes
    if given_class and (labels < 0).any():
        raise InputError("given_class: the images have no class labels to take the class from")
    mask_files = None
    if masks is not None:
        mask_root = Path(masks)
        mask_files = [mask_root / Path(f).with_suffix(".png") for f in files]
        missing = [str(p) for p in mask_files if not p.is_file()]
        if missing:
            raise MissingFileError(
                f"masks: expected a mask per image ({len(files)}), {len(missing)} missing, "
                f"e.g. {missing[0]}"
            )
    names = class_names(folders, classes_file)
    net, preprocess, tokenizer = load(
        model, pretrained=pretrained, device=device, precision=precision
    )
    size = tower_of(net).image_size
    # Masks are read (and checked) before the long work starts.
    truth = None
    if mask_files is not None:
        truth = np.stack(
            [read_mask(p, size, _image_size(source, i)) for i, p in enumerate(mask_files)]
        )
    w = zero_shot_weights(net, tokenizer, names, templates)
    loader = torch.utils.data.DataLoader(
        ImageDataset(source.root, files, preprocess, 0, source.reader),
        batch_size=batch_size,
        num_workers=workers,
    )
    result = segment(
        net,
        loader,
        w,
        classes=np.array(labels) if given_class else None,
        method=method,
        progress=progress,
        convention=convention,
    )
    folder = report.output_folder(out)
    pictures = [report.crop_rgb(source.open(i), size[0]) for i in range(min(overlays, len(files)))]
    _write(folder, result, files, names, pictures)
    scores = None
    if truth is not None:
        scores = result.scores(truth)
        report.write_json(
            folder / "metrics.json",
            {
                "method": method,
                "convention": convention,
                "protocol": "aligned",
                "images": len(files),
                **scores,
            },
        )
        print(", ".join(f"{k} {v:.2%}" for k, v in scores.items()))
    print(f"written: {folder}")
    return SegmentStudy(result, scores)


class _Preprocessed(torch.utils.data.Dataset):
    """The images of an ImageNet-segmentation file, preprocessed."""

    def __init__(self, ds: Any, preprocess: Any) -> None:
        self.ds, self.preprocess = ds, preprocess

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.preprocess(self.ds.image(i))


def _run_imagenet_seg(
    path: str,
    out: str | os.PathLike,
    *,
    model: str,
    pretrained: str | None,
    classes_file: str,
    templates: str | None,
    method: str,
    batch_size: int,
    workers: int,
    overlays: int,
    device: str | None,
    precision: str,
    progress: bool,
    convention: Convention,
) -> SegmentStudy:
    """ImageNet-segmentation: the predicted class's heatmap of each image, scored against its
    mask under both protocols (`MASK_PROTOCOLS`)."""
    from ..datasets import imagenet_segmentation

    ds = imagenet_segmentation(path)
    names = class_names([], classes_file)
    net, preprocess, tokenizer = load(
        model, pretrained=pretrained, device=device, precision=precision
    )
    size = tower_of(net).image_size
    truth: dict[str, list[np.ndarray]] = {name: [] for name in MASK_PROTOCOLS}
    for i in range(len(ds)):
        mask = ds.mask(i)
        if mask.shape != ds.image_shape(i):
            raise InputError(
                f"imagenet-seg: item {i}: its mask is {list(mask.shape)}, its image "
                f"{list(ds.image_shape(i))} (H, W): a mask of another image, or transposed"
            )
        for name, protocol in MASK_PROTOCOLS.items():
            truth[name].append(protocol(mask, size))
    w = zero_shot_weights(net, tokenizer, names, templates)
    loader = torch.utils.data.DataLoader(
        _Preprocessed(ds, preprocess), batch_size=batch_size, num_workers=workers
    )
    result = segment(net, loader, w, method=method, progress=progress, convention=convention)
    folder = report.output_folder(out)
    pictures = [report.crop_rgb(ds.image(i), size[0]) for i in range(min(overlays, len(ds)))]
    _write(folder, result, ds.files, names, pictures)
    protocols = {name: result.scores(np.stack(m)) for name, m in truth.items()}
    report.write_json(
        folder / "metrics.json",
        {"method": method, "convention": convention, "images": len(ds), "protocols": protocols},
    )
    for name, scores in protocols.items():
        print(f"{name} masks: " + ", ".join(f"{k} {v:.2%}" for k, v in scores.items()))
    print(f"written: {folder}")
    return SegmentStudy(result, protocols["aligned"], protocols)


def _write(
    folder: Path,
    result: Segmentation,
    files: list[str],
    names: list[str],
    pictures: list[np.ndarray],
) -> None:
    """heatmaps.npy, classes.csv and overlays.png (the first `overlays` images)."""
    np.save(folder / "heatmaps.npy", result.heatmaps)
    report.write_csv(
        folder / "classes.csv",
        ["file", "class", "name"],
        [[f, int(c), names[c]] for f, c in zip(files, result.classes, strict=True)],
    )
    shown = len(pictures)
    if shown:
        normalised = result.normalised()[:shown]
        report.overlays(
            folder / "overlays.png",
            pictures,
            normalised,
            foreground(normalised),
            [names[c] for c in result.classes[:shown]],
        )
