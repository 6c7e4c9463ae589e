"""Zero-shot segmentation from patch contributions, and its metrics.

The paper's method: for each image, the contribution of every patch token (summed over
layers and heads) is scored against the text of the image's class minus the mean score over
all classes; the map is upsampled bilinearly to the image size, negatives are clipped, it is
min–max normalised and thresholded at its mean. The per-image reductions and the metrics run
in the Rust core, in parallel over images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._arrays import as_float_array, check_finite, check_ndim

__all__ = [
    "Segmentation",
    "class_heatmaps",
    "foreground",
    "normalised_heatmaps",
    "segment",
    "segmentation_scores",
]


def _maps(heatmaps: Any) -> np.ndarray:
    maps = np.ascontiguousarray(as_float_array(heatmaps, "heatmaps"), dtype=np.float64)
    check_ndim(maps, "heatmaps", 3, "[N, h, w]")
    return maps


def _binary_masks(masks: Any) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"masks: expected shape [N, H, W], got {list(m.shape)}")
    if m.dtype == np.bool_:
        return np.ascontiguousarray(m, dtype=np.uint8)
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise TypeError(f"masks: expected a boolean or numeric array, got dtype {m.dtype}")
    if np.issubdtype(m.dtype, np.integer):
        binary = m.size == 0 or (m.min() >= 0 and m.max() <= 1)
    else:
        binary = bool(((m == 0) | (m == 1)).all())
    if not binary:
        values = np.unique(m)
        shown = ", ".join(str(v) for v in values[:6]) + (" …" if len(values) > 6 else "")
        raise ValueError(f"masks: expected binary masks (values 0 and 1), got values {shown}")
    return np.ascontiguousarray(m, dtype=np.uint8)


def segmentation_scores(heatmaps: Any, masks: Any) -> dict[str, float]:
    """Pixel accuracy, mIoU and mAP of heatmaps against binary masks (ImageNet-segmentation
    protocol, as in the paper).

    Args:
        heatmaps: [N, h, w] at patch resolution (any real scores: each is upsampled to its
            mask's size, negatives clipped, min–max normalised, thresholded at its mean).
        masks: [N, H, W], boolean or 0/1.

    Returns:
        {"pixel_accuracy", "miou", "map"}: pixel accuracy and two-class mIoU from counts
        summed over the set; mAP, the mean over images of the average precision of the
        two-channel score [1 − s, s] against the one-hot mask.
    """
    maps, m = _maps(heatmaps), _binary_masks(masks)
    if maps.shape[0] != m.shape[0] or maps.shape[0] == 0:
        raise ValueError(
            f"heatmaps and masks: expected the same number N >= 1 of images, got heatmaps "
            f"{list(maps.shape)} and masks {list(m.shape)}"
        )
    check_finite(maps, "heatmaps")
    pixel_accuracy, miou, mean_ap = _core.segmentation_scores(maps, m)
    return {"pixel_accuracy": pixel_accuracy, "miou": miou, "map": mean_ap}


def normalised_heatmaps(heatmaps: Any, size: tuple[int, int]) -> np.ndarray:
    """Heatmaps [N, h, w] upsampled bilinearly to `size` = (H, W) (half-pixel centres, as
    PyTorch's `align_corners=False`), negatives clipped, each min–max normalised to [0, 1]."""
    maps = _maps(heatmaps)
    check_finite(maps, "heatmaps")
    height, width = (int(v) for v in size)
    return _core.normalised_heatmaps(maps, height, width)


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
        raise ValueError(
            f"classes: expected integer class indices [N], got {c.dtype} {list(c.shape)}"
        )
    return _core.class_heatmaps(scores, np.ascontiguousarray(c, dtype=np.int64))


@dataclass
class Segmentation:
    """Zero-shot segmentation of a set of images.

    Attributes:
        heatmaps: [N, h, w] at patch resolution (the class's score minus the mean class's).
        classes: [N] the class each map is about (predicted, or given).
        image_size: (H, W) of the model's input.
    """

    heatmaps: np.ndarray
    classes: np.ndarray
    image_size: tuple[int, int]

    def normalised(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """[N, H, W] in [0, 1] at `size` (default: the model's input size)."""
        return normalised_heatmaps(self.heatmaps, size or self.image_size)

    def masks(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """[N, H, W] boolean foreground, thresholded at each map's mean."""
        return foreground(self.normalised(size))


def segment(
    model: Any,
    images: Any,
    classifier: Any,
    classes: Any = None,
    method: str = "decomposition",
    progress: bool = True,
) -> Segmentation:
    """Zero-shot segmentation of `images` by the paper's method.

    Args:
        model: an open_clip CLIP model with a ViT image tower.
        images: a tensor [N, 3, H, W] of preprocessed images, or an iterable of such batches
            (a DataLoader yielding tensors or (tensor, ...) tuples).
        classifier: [D, C] class text embeddings (`zero_shot_classifier`).
        classes: [N] the class of each image; by default the model's zero-shot prediction.
        method: "decomposition" (the paper's) or "attention", the baseline: the last layer's
            class-token attention to each patch, averaged over heads, scored the same way.
    """
    import torch
    from tqdm.auto import tqdm

    from .decompose import Decomposer

    if method not in ("decomposition", "attention"):
        raise ValueError(f"method: expected 'decomposition' or 'attention', got {method!r}")
    weights = torch.as_tensor(as_float_array(classifier, "classifier"), dtype=torch.float32)
    if weights.ndim != 2:
        raise ValueError(f"classifier: expected shape [D, C], got {list(weights.shape)}")
    batches: Iterable[Any] = [images] if isinstance(images, torch.Tensor) else images
    given = None if classes is None else np.asarray(classes, dtype=np.int64)
    if given is not None and given.ndim != 1:
        raise ValueError(f"classes: expected shape [N], got {list(given.shape)}")
    if given is not None and isinstance(images, torch.Tensor) and len(given) != len(images):
        raise ValueError(f"classes: expected one per image ({len(images)}), got {len(given)}")
    visual = getattr(model, "visual", model)
    grid = tuple(int(v) for v in visual.grid_size)
    size = tuple(int(v) for v in visual.image_size)
    maps, chosen = [], []
    done = 0
    bar = tqdm(desc="segmenting", unit="img", disable=not progress)
    with Decomposer(model) as decomposer:
        device = next(model.parameters()).device
        directions = weights.T.to(device)
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"images: expected tensors [B, 3, H, W], got {type(x).__name__}")
            parts = decomposer.decompose(x.to(device), spatial=True)
            if parts.representation.shape[-1] != directions.shape[-1]:
                raise ValueError(
                    f"classifier: expected shape [{parts.representation.shape[-1]}, C], got "
                    f"{list(weights.shape)}"
                )
            b = x.shape[0]
            if given is None:
                batch_classes = (parts.representation @ directions.T).argmax(-1).cpu().numpy()
            else:
                if done + b > len(given):
                    raise ValueError(f"classes: expected one per image, got {len(given)}")
                batch_classes = given[done : done + b]
            if method == "decomposition":
                patch = parts.token_scores(directions)[:, 1:].cpu().numpy()
                maps.append(class_heatmaps(patch, batch_classes))
            else:
                maps.append(parts._attention[-1][:, :, 1:].mean(1).cpu().numpy().astype(np.float64))
            chosen.append(np.asarray(batch_classes, dtype=np.int64))
            done += b
            bar.update(b)
    bar.close()
    if not maps:
        raise ValueError("images: expected at least one image, got none")
    if given is not None and done != len(given):
        raise ValueError(f"classes: expected one per image ({done}), got {len(given)}")
    heatmaps = np.concatenate(maps).reshape(done, *grid)
    return Segmentation(heatmaps, np.concatenate(chosen), size)
