"""The one place where an image tower's family is recognised."""

from __future__ import annotations

from torch import nn

from .openclip import OpenClipTower
from .tower import Tower

__all__ = ["tower_of"]


def tower_of(model: nn.Module) -> Tower:
    """The adapter for `model`'s image tower; `UnsupportedModelError` says why none fits."""
    return OpenClipTower(model)
