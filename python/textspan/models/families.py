"""The one place where a model's family is recognised: a registry of tower families, each a
predicate that recognises a model and the adapter (`Tower`) that decomposes its image tower,
with the family's own way to embed texts where it is not open_clip's `encode_text`.

Adding a family is an adapter module (a `Tower` subclass, see `tower.py`) and one
`TowerFamily` line in `FAMILIES` (or `register_tower` from outside the package)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .hf import HfTower, is_hf_model, text_features
from .openclip import OpenClipTower, is_open_clip_tower
from .timm import TimmTower, is_timm_tower
from .tower import Tower

__all__ = ["FAMILIES", "TowerFamily", "encode_text", "family_of", "register_tower", "tower_of"]


@dataclass(frozen=True)
class TowerFamily:
    """A family of image towers: `recognises(model)` says whether a model (a whole CLIP, or
    its image tower alone) is one of them, `adapter(model)` decomposes it, and
    `text_features(model, tokens)`, where given, embeds texts (unnormalised) instead of
    `model.encode_text`."""

    name: str
    recognises: Callable[[nn.Module], bool]
    adapter: Callable[[nn.Module], Tower]
    text_features: Callable[[nn.Module, Any], torch.Tensor] | None = None


# Asked in order: the first family that recognises a model decomposes it.
FAMILIES: list[TowerFamily] = [
    TowerFamily("Hugging Face CLIP/SigLIP", is_hf_model, HfTower, text_features),
    TowerFamily("timm VisionTransformer/Eva trunk", is_timm_tower, TimmTower),
    TowerFamily("open_clip VisionTransformer", is_open_clip_tower, OpenClipTower),
]

# Towers that are not sums of attention heads, and why (by class name, so that their
# libraries need not be imported to recognise them).
_NOT_SUMS_OF_HEADS = {
    "ModifiedResNet": "a ResNet (convolutions, then an attention pool over its feature map)",
    "ConvNeXt": "a ConvNeXt (convolutions only)",
    "FastVit": "a FastViT (convolutional token mixers and re-parameterised stages)",
    "MobileCLIPImageEncoder": "a MobileCLIP-S encoder (convolutional stages)",
}


def register_tower(family: TowerFamily) -> None:
    """Adds a family, asked before the built-in ones."""
    FAMILIES.insert(0, family)


def family_of(model: nn.Module) -> TowerFamily:
    """The family of `model`; `UnsupportedModelError` says why none fits."""
    visual = getattr(model, "visual", model)
    inner = getattr(visual, "trunk", visual)
    why = _NOT_SUMS_OF_HEADS.get(type(inner).__name__)
    if why is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({type(inner).__name__}) cannot be decomposed exactly: it "
            f"is {why}, so its output is not a sum of attention-head terms."
        )
    for family in FAMILIES:
        if family.recognises(model):
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} ({type(inner).__name__}) cannot be decomposed exactly: it is "
        "not a tower textspan knows. Supported: "
        + "; ".join(f.name for f in FAMILIES)
        + " (class-token, average and attentional pooling). Run `textspan models` for the "
        "open_clip list."
    )


def encode_text(model: nn.Module, tokens: Any) -> torch.Tensor:
    """Unit-norm text embeddings [M, D] (float32) of tokenized texts: by the model's family
    where it embeds texts its own way, else by open_clip's `encode_text` (whatever its image
    tower, which need not decompose to embed texts)."""
    for family in FAMILIES:
        if family.text_features is not None and family.recognises(model):
            features = family.text_features(model, tokens).float()
            return torch.nn.functional.normalize(features, dim=-1)
    return model.encode_text(tokens, normalize=True).float()


def tower_of(model: nn.Module) -> Tower:
    """The adapter for `model`'s image tower; `UnsupportedModelError` says why none fits."""
    return family_of(model).adapter(model)
