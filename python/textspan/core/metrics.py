"""Patch maps and segmentation metrics: the NumPy side of zero-shot segmentation.

A patch map is upsampled bilinearly to the image size, negatives are clipped, it is min–max
normalised and thresholded at its mean (the paper's steps); the metrics follow the
ImageNet-segmentation protocol. The per-image reductions and the metrics run in the Rust core,
in parallel over images. `textspan.analysis.segmentation` makes the maps from a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import textspan._core as _core

from ..errors import InputError, InputTypeError
from .checks import Convention, as_float_array, check_convention, check_finite, check_ndim

__all__ = [
    "class_heatmaps",
    "foreground",
    "normalised_heatmaps",
    "segmentation_scores",
]


def _maps(heatmaps: Any) -> np.ndarray:
    maps = np.ascontiguousarray(as_float_array(heatmaps, "heatmaps"), dtype=np.float64)
    check_ndim(maps, "heatmaps", 3, "[N, h, w]")
    return maps


def _binary_masks(masks: Any) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3:
        raise InputError(f"masks: expected shape [N, H, W], got {list(m.shape)}")
    if m.dtype == np.bool_:
        return np.ascontiguousarray(m, dtype=np.uint8)
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise InputTypeError(f"masks: expected a boolean or numeric array, got dtype {m.dtype}")
    if np.issubdtype(m.dtype, np.integer):
        binary = m.size == 0 or (m.min() >= 0 and m.max() <= 1)
    else:
        binary = bool(((m == 0) | (m == 1)).all())
    if not binary:
        values = np.unique(m)
        shown = ", ".join(str(v) for v in values[:6]) + (" …" if len(values) > 6 else "")
        raise InputError(f"masks: expected binary masks (values 0 and 1), got values {shown}")
    return np.ascontiguousarray(m, dtype=np.uint8)


def _paper_size(maps: np.ndarray, height: int, width: int, convention: Convention) -> bool:
    """Whether the paper's arithmetic applies; it scales by an integer factor (the patch
    size), so the size must be a multiple of the map's."""
    if check_convention(convention) != "paper":
        return False
    _, h, w = maps.shape
    if height % h or width % w:
        raise InputError(
            f"size: the paper's upsampling scales a map by the patch size, so expected a "
            f"multiple of the map's {h}×{w}, got {height}×{width}"
        )
    return True


def segmentation_scores(
    heatmaps: Any, masks: Any, *, convention: Convention = "textspan"
) -> dict[str, float]:
    """Pixel accuracy, mIoU and mAP of heatmaps against binary masks (ImageNet-segmentation
    protocol, as in the paper).

    Args:
        heatmaps: [N, h, w] at patch resolution (any real scores: each is upsampled to its
            mask's size, negatives clipped, min–max normalised, thresholded at its mean).
        masks: [N, H, W], boolean or 0/1.
        convention: "textspan" (float64 upsampling from the sizes' exact ratio; a map that
            is constant after clipping is scored as the zero map it becomes) or "paper"
            (the paper code's float32 `interpolate(scale_factor=patch)` and min–max, and
            AP = 0.5 for such a map, its 0/0 case).

    Returns:
        {"pixel_accuracy", "miou", "map"}: pixel accuracy and two-class mIoU from counts
        summed over the set; mAP, the mean over images of the average precision of the
        two-channel score [1 − s, s] against the one-hot mask.
    """
    maps, m = _maps(heatmaps), _binary_masks(masks)
    if maps.shape[0] != m.shape[0] or maps.shape[0] == 0:
        raise InputError(
            f"heatmaps and masks: expected the same number N >= 1 of images, got heatmaps "
            f"{list(maps.shape)} and masks {list(m.shape)}"
        )
    check_finite(maps, "heatmaps")
    paper = _paper_size(maps, m.shape[1], m.shape[2], convention)
    pixel_accuracy, miou, mean_ap = _core.segmentation_scores(maps, m, paper)
    return {"pixel_accuracy": pixel_accuracy, "miou": miou, "map": mean_ap}


def normalised_heatmaps(
    heatmaps: Any, size: tuple[int, int], *, convention: Convention = "textspan"
) -> np.ndarray:
    """Heatmaps [N, h, w] upsampled bilinearly to `size` = (H, W) (half-pixel centres, as
    PyTorch's `align_corners=False`), negatives clipped, each min–max normalised to [0, 1]
    (`convention`: as in `segmentation_scores`)."""
    maps = _maps(heatmaps)
    check_finite(maps, "heatmaps")
    height, width = (int(v) for v in size)
    paper = _paper_size(maps, height, width, convention)
    return _core.normalised_heatmaps(maps, height, width, paper)


def foreground(normalised: np.ndarray) -> np.ndarray:
    """Binary segmentation [N, H, W]: each normalised heatmap thresholded at its own mean."""
    return normalised > normalised.mean(axis=(-2, -1), keepdims=True)


def class_heatmaps(patch_scores: Any, classes: Any) -> np.ndarray:
    """Per image, the patch scores [N, P, C] of its class minus their mean over the C
    classes → [N, P]."""
    scores = np.ascontiguousarray(as_float_array(patch_scores, "patch_scores"), dtype=np.float32)
    check_ndim(scores, "patch_scores", 3, "[N, P, C]")
    c = np.asarray(classes)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise InputError(
            f"classes: expected integer class indices [N], got {c.dtype} {list(c.shape)}"
        )
    return _core.class_heatmaps(scores, np.ascontiguousarray(c, dtype=np.int64))
