"""What the decomposition needs to know of an image tower, whatever its family.

The maths (`decompose.py`) is the same for every pre-norm ViT; a family is one adapter that
says where its pieces are (`openclip.py`), and `families.tower_of` picks the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

__all__ = ["LayerWeights", "Tower"]


@dataclass
class LayerWeights:
    """One layer's attention, float32, detached.

    qkv_weight [3, H, d_h, W] and qkv_bias [3, H, d_h]: query, key and value of each head
    from the attention's input; out_weight [W, H·d_h] and out_bias [W]: the output map
    (`out = o @ out_weightᵀ + out_bias`); scale [W]: LayerScale's gamma (ones without it).
    """

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    scale: torch.Tensor


class Tower(Protocol):
    """An image tower as the decomposition sees it."""

    model: nn.Module  # what the user passed (a CLIP model or its tower)
    module: nn.Module  # the image tower; its parameters key the cached read-out maps
    layers: int
    heads: int
    dim: int  # D, the width of the joint space
    grid_size: tuple[int, int]
    image_size: tuple[int, int]
    embedding: nn.Module  # output: every token after the embedding, class token first
    final_norm: nn.LayerNorm  # input: the residual stream the representation is read from

    def attention_input(self, layer: int) -> nn.Module: ...  # output: the attention's input
    def mlp_output(self, layer: int) -> nn.Module: ...  # output: the MLP branch's term
    def layer_weights(self, layer: int, device: torch.device) -> LayerWeights: ...
    def projection(self) -> torch.Tensor | None: ...  # [W, D] after the final norm
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # the representation
    def tokens(self, x: torch.Tensor) -> torch.Tensor: ...  # a hooked activation as [B, T, W]
