"""Where the pieces of an open_clip `VisionTransformer` are, for the decomposition.

It answers the questions of `textspan.models.tower.Tower` (which modules to hook, each
layer's attention weights, the projection after the final norm); the maths is in
`decompose.py`, shared by every family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .tower import LayerWeights

__all__ = ["OpenClipTower"]


def _refusal(model: nn.Module, visual: nn.Module) -> Any:
    name = type(model).__name__ if visual is model else f"{type(model).__name__}.visual"

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{name} ({type(visual).__name__}) cannot be decomposed exactly: {what}. "
            "Supported: open_clip VisionTransformer towers with class-token pooling and "
            "standard residual attention blocks."
        )

    return refuse


class OpenClipTower:
    """An open_clip `VisionTransformer` with class-token pooling and standard residual
    attention blocks (a packed `nn.MultiheadAttention`, optional LayerScale)."""

    def __init__(self, model: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", model)
        refuse = _refusal(model, visual)
        if not isinstance(visual, VisionTransformer):
            raise refuse(
                "only open_clip's own VisionTransformer is supported (timm and ResNet towers "
                "are not)"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise refuse("attentional pooling is not supported")
        if getattr(visual, "pool_type", "tok") != "tok":
            raise refuse(f"pool_type {visual.pool_type!r} is not supported, only 'tok'")
        for i, block in enumerate(visual.transformer.resblocks):
            if type(block) is not ResidualAttentionBlock:
                raise refuse(f"block {i} is a {type(block).__name__}, not a ResidualAttentionBlock")
            attn = block.attn
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise refuse(f"block {i}'s attention is not a packed nn.MultiheadAttention")
            if hasattr(block, "ln_1_kv"):
                raise refuse(f"block {i} is a cross-attention block")
            for ls in (block.ls_1, block.ls_2):
                if not isinstance(ls, nn.Identity) and not hasattr(ls, "gamma"):
                    raise refuse(f"block {i} has an unknown scale layer {type(ls).__name__}")
        self.model = model
        self.module = visual
        self.blocks = list(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    # shapes ---------------------------------------------------------------------------------

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def dim(self) -> int:
        """D, the width of the joint image–text space."""
        return int(self.module.output_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.module.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.module.image_size)

    # hook points ----------------------------------------------------------------------------

    @property
    def embedding(self) -> nn.Module:
        """Its output holds every token after the embedding (class token first)."""
        return self.module.ln_pre

    @property
    def final_norm(self) -> nn.LayerNorm:
        """Its input is the residual stream the representation is read from."""
        return self.module.ln_post

    def attention_input(self, layer: int) -> nn.Module:
        """Its output is the attention's input at every token (the block's first norm)."""
        return self.blocks[layer].ln_1

    def mlp_output(self, layer: int) -> nn.Module:
        """Its output is the MLP branch's contribution to the residual stream."""
        return self.blocks[layer].ls_2

    # weights --------------------------------------------------------------------------------

    def layer_weights(self, layer: int, device: torch.device) -> LayerWeights:
        block = self.blocks[layer]
        attn: nn.MultiheadAttention = block.attn
        w, h = attn.embed_dim, attn.num_heads
        dh = w // h
        bias = attn.in_proj_bias
        out_bias = attn.out_proj.bias
        gamma = getattr(block.ls_1, "gamma", None)
        return LayerWeights(
            qkv_weight=attn.in_proj_weight.detach().float().view(3, h, dh, w),
            qkv_bias=torch.zeros(3, h, dh, device=device)
            if bias is None
            else bias.detach().float().view(3, h, dh),
            out_weight=attn.out_proj.weight.detach().float(),
            out_bias=torch.zeros(w, device=device)
            if out_bias is None
            else out_bias.detach().float(),
            scale=torch.ones(w, device=device) if gamma is None else gamma.detach().float(),
        )

    def projection(self) -> torch.Tensor | None:
        """The map after the final norm, [W, D], or None for the identity."""
        proj = self.module.proj
        return None if proj is None else proj.detach().float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The representation the parts add up to (before normalisation)."""
        encode = getattr(self.model, "encode_image", self.module)
        return encode(images)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A hooked activation as [B, T, W]."""
        return x if self.batch_first else x.transpose(0, 1)
