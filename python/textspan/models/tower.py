"""What the decomposition needs to know of an image tower, whatever its family.

The maths (`decompose.py`) is the same for every tower whose representation is a sum of
attention heads: a family is one adapter (`openclip.py`, `timm.py`) that hooks the model's
own modules to fill a `LayerCapture` per layer, says how each layer's heads map into the
residual stream (`LayerMaps`), and how the representation reads the final stream
(`Pooling`); `families.tower_of` picks the adapter.

Every norm on the path is linearised per token with that token's own σ, so with the σ's and
the pooler's attention weights fixed by the forward pass the representation is linear in
the final stream: `Σ_g Σ_j P[b, g, j] · y_j @ value_g @ out_g + constant (+ a pooler MLP
term)`, where j runs over the tokens the pooling reads and g over the pooler's heads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "Adapter",
    "Capture",
    "LayerCapture",
    "LayerMaps",
    "Pooling",
    "Tower",
    "attention_pooling",
    "centred",
    "exact",
    "inverse_sigma",
    "norm_parts",
    "norm_pooling",
    "take",
    "term_names",
    "token_count",
    "work_dtype",
]


def exact(x: torch.Tensor) -> torch.Tensor:
    """The working precision of the maths: float32, or float64 for a float64 model (half and
    bfloat16 activations are widened, so the parts are summed in float32 at least)."""
    return x if x.dtype == torch.float64 else x.float()


def take(x: torch.Tensor, tokens: slice, axis: int = 1) -> torch.Tensor:
    """The read tokens of a hooked activation, in the working precision, as a tensor of their
    own: a view would keep the whole activation alive until the end of the forward."""
    part = exact(x[(slice(None),) * axis + (tokens,)])
    if part.shape == x.shape or part.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        return part  # all of it, or already a copy (a widened half-precision activation)
    return part.clone()


def work_dtype(module: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise."""
    p = next(module.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def centred(m: torch.Tensor) -> torch.Tensor:
    """`C @ m` for the centring matrix C = I − 11ᵀ/n over m's first axis: what a norm's mean
    subtraction does to every vector entering it (so each term is centred by its own mean)."""
    return m - m.mean(0, keepdim=True)


def norm_parts(
    norm: nn.Module, width: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """(γ [W], β [W]) of a LayerNorm, ones and zeros where it has none."""
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    gamma = torch.ones(width, device=device, dtype=dtype) if weight is None else weight.detach()
    beta = torch.zeros(width, device=device, dtype=dtype) if bias is None else bias.detach()
    return exact(gamma), exact(beta)


def inverse_sigma(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """1/σ over the last axis as `norm` computes it (biased variance plus its eps)."""
    return torch.rsqrt(exact(x).var(dim=-1, unbiased=False) + norm.eps)


@dataclass
class LayerMaps:
    """How one layer's heads write into the residual stream, float32, detached.

    A head's output at a token is its attention-weighted value o_h [d_h]; the branch adds
    `s · (Σ_h o_h @ head_map[h] + bias_scaled) · t + bias_fixed` to the stream, where s and t
    are per-token scales the capture holds (1/σ of a sub-LN or a post-norm; ones without).

    value_weight [H, d_h, W], value_bias [H, d_h]: v_h = value_weight[h] @ x + value_bias[h]
    from the attention's input x. head_map [H, d_h, W] holds the output map, LayerScale and
    the norms' centring and γ inside the branch.
    """

    value_weight: torch.Tensor
    value_bias: torch.Tensor
    head_map: torch.Tensor
    bias_scaled: torch.Tensor  # [W], multiplied by the capture's bias_scale
    bias_fixed: torch.Tensor  # [W]


@dataclass
class LayerCapture:
    """What the hooks record of one layer during a forward pass, at the tokens the pooling
    reads (T_r of them) unless said otherwise."""

    o: torch.Tensor | None = None  # [B, T_r, H, d_h] each head's attention-weighted value
    o_scale: torch.Tensor | None = None  # [B, T_r] (sub-LN, post-norm) or None
    bias_scale: torch.Tensor | None = None  # [B, T_r] (post-norm) or None
    mlp: torch.Tensor | None = None  # [B, T_r, W] the MLP branch's term
    rows: torch.Tensor | None = None  # [B, H, T_r, T] attention rows of the read tokens
    inputs: torch.Tensor | None = None  # [B, T, W] the attention's input (every token)
    # Filled by the decomposer when the layer ends, from `rows` (then dropped):
    class_rows: torch.Tensor | None = None  # [B, H, T_r] the rows' class-token column
    class_input: torch.Tensor | None = None  # [B, W] the class token's attention input
    weights: torch.Tensor | None = None  # [B, G, H, T] rows reduced by the pooling weights


@dataclass
class Pooling:
    """How the representation reads the final stream, for one batch (see the module doc).

    weights [B, G, T_r] (P, with every 1/σ folded in); value [G, W, E] or None (then G = 1
    and the stream goes straight to `out`); out [G, E, D]; constant [B, D] (every bias and
    norm offset past the residual stream); extra [B, D] or None: the pooler's MLP term.
    """

    weights: torch.Tensor
    value: torch.Tensor | None
    out: torch.Tensor
    constant: torch.Tensor
    extra: torch.Tensor | None = None

    def read(self, u: torch.Tensor) -> torch.Tensor:
        """Stream vectors already weighted per group, [B, G, ..., W] → [B, ..., D]."""
        if self.value is not None:
            u = torch.einsum("bg...w,gwe->bg...e", u, self.value)
        return torch.einsum("bg...e,ged->b...d", u, self.out)

    def read_group(self, u: torch.Tensor, g: int) -> torch.Tensor:
        """Stream vectors [..., W] already weighted for group g alone → [..., D]."""
        if self.value is not None:
            u = u @ self.value[g]
        return u @ self.out[g]

    def directions(self, d: torch.Tensor) -> torch.Tensor:
        """What each group reads of K directions [K, D], as stream vectors → [G, W, K]."""
        read = self.out @ d.T
        return read if self.value is None else self.value @ read

    def pool(self, terms: torch.Tensor) -> torch.Tensor:
        """A term at every read token [B, T_r, W] → its contribution [B, D]."""
        return self.read(torch.einsum("bgj,bjw->bgw", self.weights, terms))


def norm_pooling(
    y: torch.Tensor,
    norm: nn.Module | None,
    reads: str,
    head: torch.Tensor,
    head_bias: torch.Tensor,
    centre: bool,
) -> Pooling:
    """The pooling of a class token or an average of the read tokens y [B, T_r, W] through a
    LayerNorm (or none) and a linear head [W, D] with its bias [D].

    reads: "token" (the first read token, normed), "norm-then-mean" (each token normed, then
    averaged) or "mean-then-norm" (the average normed); without a norm, the average.
    `centre`: the norm's mean subtracted from each term (textspan), or left to be shared
    (the paper's convention)."""
    b, t, w = y.shape
    if norm is None:
        weights = torch.full((b, 1, t), 1.0 / t, device=y.device, dtype=y.dtype)
        return Pooling(weights, None, head[None], head_bias.expand(b, -1))
    gamma, beta = norm_parts(norm, w, y.device, y.dtype)
    read = gamma[:, None] * head
    if centre:
        read = centred(read)
    if reads == "token":
        weights = inverse_sigma(y[:, 0], norm)[:, None, None]
    elif reads == "mean-then-norm":
        weights = (inverse_sigma(y.mean(1), norm)[:, None] / t).expand(-1, t)[:, None]
    else:
        weights = (inverse_sigma(y, norm) / t)[:, None]
    constant = (beta @ head + head_bias).expand(b, -1)
    return Pooling(weights=weights, value=None, out=read[None], constant=constant)


def attention_pooling(
    p: torch.Tensor,
    y: torch.Tensor,
    norm: nn.Module | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    *,
    read: torch.Tensor,
    after: torch.Tensor | None = None,
    image_scale: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> Pooling:
    """An attention pooler's query reading the read tokens y [B, T_r, W]: each token through
    a LayerNorm (or none), the pooler's attention p [B, G, T_r], its values (value_weight
    [G, E, W], value_bias [G, E]) and output map (out_weight [W_out, G·E], out_bias), then
    `read` [W_out, D], a linear map already holding any norm after the pooler, whose 1/σ is
    `image_scale` [B]. `after` [D]: the constant past `read` (a norm's β, a head's bias);
    `extra` [B, D]: the pooler's MLP term."""
    g, e, w = value_weight.shape
    b = y.shape[0]
    weights = p
    value = value_weight.transpose(1, 2)  # [G, W, E]
    beta = torch.zeros(w, device=y.device, dtype=y.dtype)
    if norm is not None:
        gamma, beta = norm_parts(norm, w, y.device, y.dtype)
        weights = p * inverse_sigma(y, norm)[:, None]
        value = centred(gamma[:, None, None] * value.transpose(0, 1)).transpose(0, 1)
    # The constants: the norm's β through the values (each row of p sums to one), the value
    # bias and the output bias, read out like the rest.
    pooled = (torch.einsum("w,gew->ge", beta, value_weight) + value_bias).reshape(-1)
    pooled = pooled @ out_weight.T
    if out_bias is not None:
        pooled = pooled + out_bias
    constant = (pooled @ read).expand(b, -1)
    if image_scale is not None:
        weights = weights * image_scale[:, None, None]
        constant = constant * image_scale[:, None]
    if after is not None:
        constant = constant + after
    out = (out_weight.T @ read).view(g, e, -1)
    return Pooling(weights=weights, value=value, out=out, constant=constant, extra=extra)


@dataclass
class PoolCapture:
    """What an attention pooler's hooks record for the pooling: the normed tokens its keys
    are made from [B, T_r, W], its MLP's output at the query read [B, W] (a pooler MLP's
    term), and the input of the norm after it at that query [B, W]."""

    tokens: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    post: torch.Tensor | None = None

    def needed(self, *names: str) -> tuple[torch.Tensor, ...]:
        """The named records; a hook that never fired is a bug, said here."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise RuntimeError(f"the pooler's hooks never fired (no {', '.join(missing)})")
        return tuple(getattr(self, n) for n in names)


@dataclass
class Capture:
    """Everything one forward pass records: the embedding and final stream at the read
    tokens, one `LayerCapture` per layer, and what the pooling needs (`pool`)."""

    layers: list[LayerCapture]
    embedding: torch.Tensor | None = None  # [B, T_r, W]
    final: torch.Tensor | None = None  # [B, T_r, W]
    pool: PoolCapture = field(default_factory=PoolCapture)


def token_count(tower: Tower) -> int:
    """T: the prefix tokens (class token, registers) and the patches."""
    return tower.grid_size[0] * tower.grid_size[1] + tower.prefix_tokens


def term_names(tower: Tower) -> tuple[str, ...]:
    """The names of a decomposition's `mlps` entries: the embedding, each layer's MLP, then any
    term past the layers (an attention pooler's MLP)."""
    layers = (f"layer {i} MLP" for i in range(tower.layers))
    return ("embedding", *layers, *tower.extra_terms)


class Adapter:
    """What every family's adapter shares: its blocks in order, the working precision, and
    a forward that needs nothing around it (timm's overrides `forward_context`)."""

    blocks: list[nn.Module]
    module: nn.Module

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return work_dtype(self.module)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def forward_context(self) -> Any:
        return contextlib.nullcontext()


class Tower(Protocol):
    """An image tower as the decomposition sees it."""

    model: nn.Module  # what the user passed (a CLIP model or its tower)
    module: nn.Module  # the image tower; its parameters key the cached maps
    family: str  # e.g. "open_clip ViT", "timm Eva"
    pooling_type: str  # "token", "average", "attention"
    layers: int
    heads: int
    dim: int  # D, the width of the joint space
    grid_size: tuple[int, int]
    image_size: tuple[int, int]
    prefix_tokens: int  # tokens before the patches (class token, registers)
    has_class_token: bool
    dtype: torch.dtype  # the maths' working precision (`work_dtype`)
    read_tokens: slice  # the tokens the pooling reads
    extra_terms: tuple[str, ...]  # names of terms past the layers' MLPs ("pooler MLP")

    def block(self, layer: int) -> nn.Module: ...  # its input at layer 0 is the embedding
    def attach(self, capture: Any) -> list[Any]: ...  # hooks; capture() → Capture | None
    def layer_maps(self, layer: int, device: torch.device) -> LayerMaps: ...
    def pooling(self, cap: Capture, centre: bool) -> Pooling: ...
    def pattern(self) -> torch.Tensor | None: ...  # [1, G, T_r] P up to a per-image factor
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # the representation
    def forward_context(self) -> Any: ...  # a context manager around the hooked forward
