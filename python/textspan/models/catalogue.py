"""The open_clip architectures, each asked whether its image tower decomposes exactly
(`catalogue`, `textspan models`), and the identity checked on one with random weights
(`check_identity`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError
from .decompose import Decomposer
from .families import tower_of
from .loading import load, resolve_model_name

__all__ = ["CatalogueEntry", "IdentityCheck", "catalogue", "check_identity"]


@dataclass
class CatalogueEntry:
    """One open_clip architecture: its pretrained tags and whether its image tower
    decomposes exactly (and why not)."""

    name: str
    tags: list[str]
    family: str  # e.g. "timm VisionTransformer", or the tower's class where unsupported
    pooling: str  # "token", "average", "attention", or "" where unsupported
    decomposes: bool
    why_not: str = ""


def _vision_tower(name: str, device: str) -> nn.Module:
    """Only the image tower of an open_clip architecture (no text tower, so no tokenizer or
    text library is needed), random weights."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise InputError(
            f"model: expected an open_clip model name, got {name!r} (`textspan models` lists them)"
        )
    try:
        # open_clip's own builder of the image tower (private, so guarded): create_model
        # builds the text tower too, which for some models needs files from the network.
        from open_clip.model import _build_vision_tower
    except ImportError:
        with torch.device(device):
            return open_clip.create_model(name, device=device).visual
    with torch.device(device):
        return _build_vision_tower(
            cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )


def catalogue() -> list[CatalogueEntry]:
    """Every open_clip architecture with pretrained tags, each built on the meta device (no
    memory, no download) and asked for its adapter."""
    import open_clip

    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    entries = []
    for name in sorted(tags, key=str.lower):
        visual = _vision_tower(name, "meta")
        try:
            tower = tower_of(visual)
        except UnsupportedModelError as e:
            inner = getattr(visual, "trunk", visual)
            reason = str(e).split("cannot be decomposed exactly: ", 1)[-1]
            entries.append(
                CatalogueEntry(name, tags[name], type(inner).__name__, "", False, reason)
            )
            continue
        entries.append(CatalogueEntry(name, tags[name], tower.family, tower.pooling_type, True))
    return entries


@dataclass
class IdentityCheck:
    name: str
    family: str
    pooling: str
    terms: int  # mlps entries (L + 1, or L + 2 with a pooler MLP)
    relative_error: float  # ‖Σ parts − representation‖ / ‖representation‖
    pooler_share: float | None  # ‖pooler MLP term‖ / ‖representation‖, where there is one
    seconds: float


def _model_to_check(name: str) -> nn.Module:
    """An open_clip architecture's image tower alone (random weights); any other name `load`
    takes (a config .json, "toy", "hf:…") loaded whole, on the CPU."""
    import open_clip

    if str(name).endswith(".json"):
        name = resolve_model_name(name)
    if open_clip.get_model_config(str(name)) is not None:
        return _vision_tower(str(name), "cpu")
    return load(name, device="cpu")[0]


def check_identity(name: str | os.PathLike, *, images: int = 2, seed: int = 0) -> IdentityCheck:
    """Builds `name`'s image tower (random weights, seeded, for an open_clip architecture)
    and checks that the parts sum to its output on random images."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = _model_to_check(str(name)).eval()
        with Decomposer(visual) as decomposer:
            x = torch.randn(images, 3, *decomposer.tower.image_size)
            parts = decomposer.decompose(x)
            tower = decomposer.tower
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    norm = parts.representation.norm()
    pooler = None
    if tower.extra_terms:
        pooler = float(
            parts.mlps[:, -1].norm(dim=-1).mean() / parts.representation.norm(dim=-1).mean()
        )
    return IdentityCheck(
        name,
        tower.family,
        tower.pooling_type,
        parts.mlps.shape[1],
        float((total - parts.representation).norm() / norm),
        pooler,
        time.perf_counter() - start,
    )
