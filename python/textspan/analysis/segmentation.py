"""Zero-shot segmentation from patch contributions (the paper's method) and the raw-attention
baseline.

For each image, the contribution of every patch token (summed over layers and heads) is
scored against the text of the image's class minus the mean score over all classes; the
metrics and the per-image reductions are `textspan.core.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checks import Convention, as_float_array, check_convention
from ..core.metrics import (
    class_heatmaps,
    foreground,
    normalised_heatmaps,
    segmentation_scores,
)
from ..errors import InputError

__all__ = ["Segmentation", "segment"]


@dataclass
class Segmentation:
    """Zero-shot segmentation of a set of images.

    Attributes:
        heatmaps: [N, h, w] at patch resolution (the class's score minus the mean class's).
        classes: [N] the class each map is about (predicted, or given).
        image_size: (H, W) of the model's input.
        convention: the decomposition's ("textspan" or "paper"); it also decides the
            arithmetic of `normalised` and of `scores`.
    """

    heatmaps: np.ndarray
    classes: np.ndarray
    image_size: tuple[int, int]
    convention: Convention = "textspan"

    def normalised(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """[N, H, W] in [0, 1] at `size` (default: the model's input size)."""
        return normalised_heatmaps(
            self.heatmaps, size or self.image_size, convention=self.convention
        )

    def scores(self, masks: Any) -> dict[str, float]:
        """Pixel accuracy, mIoU and mAP against binary masks [N, H, W] (see
        `textspan.core.metrics.segmentation_scores`), in this segmentation's convention."""
        return segmentation_scores(self.heatmaps, masks, convention=self.convention)

    def masks(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """[N, H, W] boolean foreground, thresholded at each map's mean."""
        return foreground(self.normalised(size))


def segment(
    model: Any,
    images: Any,
    classifier: Any,
    *,
    classes: Any = None,
    method: str = "decomposition",
    progress: bool = True,
    convention: Convention = "textspan",
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
        convention: the decomposition's, "textspan" or "paper" (whose token terms share
            `ln_post`'s mean and bias, and whose maps are upsampled and scored in the paper
            code's arithmetic).
    """
    import torch
    from tqdm.auto import tqdm

    from ..models import Decomposer

    check_convention(convention)
    if method not in ("decomposition", "attention"):
        raise InputError(f"method: expected 'decomposition' or 'attention', got {method!r}")
    weights = torch.as_tensor(as_float_array(classifier, "classifier"), dtype=torch.float32)
    if weights.ndim != 2:
        raise InputError(f"classifier: expected shape [D, C], got {list(weights.shape)}")
    batches: Iterable[Any] = [images] if isinstance(images, torch.Tensor) else images
    given = None if classes is None else np.asarray(classes, dtype=np.int64)
    if given is not None and given.ndim != 1:
        raise InputError(f"classes: expected shape [N], got {list(given.shape)}")
    if given is not None and isinstance(images, torch.Tensor) and len(given) != len(images):
        raise InputError(f"classes: expected one per image ({len(images)}), got {len(given)}")
    maps, chosen = [], []
    done = 0
    bar = tqdm(desc="segmenting", unit="img", disable=not progress)
    with Decomposer(model) as decomposer:
        grid, size = decomposer.tower.grid_size, decomposer.tower.image_size
        device = next(model.parameters()).device
        directions = weights.T.to(device)
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise InputError(f"images: expected tensors [B, 3, H, W], got {type(x).__name__}")
            parts = decomposer.decompose(x.to(device), spatial=True, convention=convention)
            if parts.representation.shape[-1] != directions.shape[-1]:
                raise InputError(
                    f"classifier: expected shape [{parts.representation.shape[-1]}, C], got "
                    f"{list(weights.shape)}"
                )
            b = x.shape[0]
            if given is None:
                batch_classes = (parts.representation @ directions.T).argmax(-1).cpu().numpy()
            else:
                if done + b > len(given):
                    raise InputError(f"classes: expected one per image, got {len(given)}")
                batch_classes = given[done : done + b]
            if method == "decomposition":
                patch = parts.token_scores(directions)[:, parts.prefix_tokens :].cpu().numpy()
                maps.append(class_heatmaps(patch, batch_classes))
            else:
                maps.append(
                    parts.class_attention(-1)[:, :, parts.prefix_tokens :]
                    .mean(1)
                    .cpu()
                    .numpy()
                    .astype(np.float64)
                )
            chosen.append(np.asarray(batch_classes, dtype=np.int64))
            done += b
            bar.update(b)
    bar.close()
    if not maps:
        raise InputError("images: expected at least one image, got none")
    if given is not None and done != len(given):
        raise InputError(f"classes: expected one per image ({done}), got {len(given)}")
    heatmaps = np.concatenate(maps).reshape(done, *grid)
    return Segmentation(heatmaps, np.concatenate(chosen), size, convention)
