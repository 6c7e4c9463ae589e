"""The one place where an image tower's family is recognised."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .hf import HfTower, is_hf_model
from .openclip import OpenClipTower
from .timm import TimmTower, is_timm_tower
from .tower import Tower

__all__ = ["tower_of"]

# Towers that are not sums of attention heads, and why (by class name, so that their
# libraries need not be imported to recognise them).
_NOT_SUMS_OF_HEADS = {
    "ModifiedResNet": "a ResNet (convolutions, then an attention pool over its feature map)",
    "ConvNeXt": "a ConvNeXt (convolutions only)",
    "FastVit": "a FastViT (convolutional token mixers and re-parameterised stages)",
    "MobileCLIPImageEncoder": "a MobileCLIP-S encoder (convolutional stages)",
}


def tower_of(model: nn.Module) -> Tower:
    """The adapter for `model`'s image tower; `UnsupportedModelError` says why none fits."""
    visual = getattr(model, "visual", model)
    inner = getattr(visual, "trunk", visual)
    why = _NOT_SUMS_OF_HEADS.get(type(inner).__name__)
    if why is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({type(inner).__name__}) cannot be decomposed exactly: it "
            f"is {why}, so its output is not a sum of attention-head terms."
        )
    if is_hf_model(model):
        return HfTower(model)
    if is_timm_tower(model):
        return TimmTower(model)
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return OpenClipTower(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} ({type(inner).__name__}) cannot be decomposed exactly: it is "
        "not a tower textspan knows. Supported: open_clip VisionTransformer towers (class-"
        "token, average and attentional pooling), timm VisionTransformer and Eva trunks "
        "(inside open_clip or alone), Hugging Face CLIP and SigLIP. Run `textspan models` for "
        "the open_clip list."
    )
