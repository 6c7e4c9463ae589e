"""Exact decomposition of an open_clip ViT's image representation into direct contributions.

With pre-LayerNorm residual blocks, the class token entering `ln_post` is

    z = x0 + Σ_l attn_l + Σ_l mlp_l,

and `ln_post` is linearised per image with that image's own mean and standard deviation σ
of z, so the representation `ln_post(z) @ proj` is a sum of terms `((t − mean(t)) ⊙ γ/σ) @ proj`,
one per term t, plus `β @ proj`. The attention term of layer l splits exactly over heads h
and source tokens j: `attn_l = Σ_h Σ_j a^{l,h}_{0j} W_O^h v^{l,h}_j + b_O`.

Conventions for what is shared (they decide which term a constant lands in; the parts always
sum to `encode_image`):

- the LayerNorm mean: each term is centred by its own mean over the width (exact, since the
  mean is linear);
- `ln_post`'s bias β: it goes to the embedding term, `mlps[:, 0]`;
- the attention output bias b_O of layer l: split equally among the H heads, and within a
  head equally among the T source tokens (so `spatial.sum(2) == heads`);
- the value bias b_V is part of every token's value, so it is weighted by that token's
  attention like the rest of the value;
- LayerScale multiplies every term of its branch.

Only the class-token row of each attention map is computed, from the block's LayerNorm
output, so no [B, T, T, H, D] tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Decomposer", "Decomposition", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model's image tower cannot be decomposed exactly by this library."""


def _vision_tower(model: nn.Module) -> nn.Module:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", model)
    name = type(model).__name__ if visual is model else f"{type(model).__name__}.visual"

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{name} ({type(visual).__name__}) cannot be decomposed exactly: {what}. "
            "Supported: open_clip VisionTransformer towers with class-token pooling and "
            "standard residual attention blocks."
        )

    if not isinstance(visual, VisionTransformer):
        raise refuse(
            "only open_clip's own VisionTransformer is supported (timm and ResNet towers are not)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise refuse("attentional pooling is not supported")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise refuse(f"pool_type {visual.pool_type!r} is not supported, only 'tok'")
    if not isinstance(visual.patch_dropout, nn.Identity) and visual.training:
        raise refuse("patch dropout is active (call model.eval())")
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
    return visual


def _scale(module: nn.Module, width: int, device: torch.device) -> torch.Tensor:
    """LayerScale's gamma, or ones."""
    gamma = getattr(module, "gamma", None)
    return torch.ones(width, device=device) if gamma is None else gamma.detach().float()


@dataclass
class _Readout:
    """Per layer: maps a head's weighted value sum [d_h] into the joint space, before 1/σ."""

    heads: torch.Tensor  # [H, d_h, D]
    bias: torch.Tensor  # [H, D]
    value_weight: torch.Tensor  # [H, d_h, W]: v^h = value_weight[h] @ x + value_bias[h]
    value_bias: torch.Tensor  # [H, d_h]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Every token's value [B, T, H, d_h] from the block's LayerNorm output x [B, T, W]."""
        return torch.einsum("btw,hew->bthe", x, self.value_weight) + self.value_bias

    def pooled_values(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each head's attention-weighted value [B, H, d_h] from its attention-weighted input
        [B, H, W] (the weights sum to one, so the bias enters once)."""
        return torch.einsum("bhw,hew->bhe", pooled, self.value_weight) + self.value_bias


@dataclass
class Decomposition:
    """Direct contributions to the image representation, in the joint image–text space.

    `heads.sum((1, 2)) + mlps.sum(1)` equals `representation` (what
    `model.encode_image(images, normalize=False)` returns) up to float rounding.
    See the module docstring for how biases and LayerNorm means are shared.

    Attributes:
        heads: [B, L, H, D], each attention head's contribution at the class token.
        mlps: [B, L+1, D], the embedding term (index 0: class embedding, positional
            embedding and `ln_pre`, plus `ln_post`'s bias) then each layer's MLP.
        representation: [B, D].
        class_token: [B, L, D], the part of each layer's attention term (all heads) that
            flows from the class token's own position: `spatial[:, :, 0].sum(2)`.
    """

    heads: torch.Tensor
    mlps: torch.Tensor
    representation: torch.Tensor
    class_token: torch.Tensor
    _attention: list[torch.Tensor] = field(default_factory=list, repr=False)  # [B, H, T] per layer
    # Each layer's attention input (ln_1 output) [B, T, W].
    _inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    _readouts: list[_Readout] = field(default_factory=list, repr=False)
    _sigma: torch.Tensor | None = field(default=None, repr=False)  # [B]

    def _need_tokens(self) -> None:
        if not self._attention:
            raise ValueError(
                "this decomposition has no token terms: call decompose(images, spatial=True)"
            )

    @property
    def spatial(self) -> torch.Tensor:
        """[B, L, T, H, D]: the contribution of each source token through each head.

        Materialised on each access (B·L·T·H·D floats); `scores` avoids that."""
        self._need_tokens()
        layers = []
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            t = a.shape[-1]
            layers.append(torch.einsum("bhj,bjhe,hed->bjhd", a, r.values(x), r.heads) + r.bias / t)
        return torch.stack(layers, 1) / self._sigma[:, None, None, None, None]

    def _directions(self, directions: Any) -> torch.Tensor:
        d = torch.as_tensor(directions, dtype=torch.float32, device=self.heads.device)
        if d.ndim != 2 or d.shape[1] != self.heads.shape[-1]:
            raise ValueError(
                f"directions: expected shape [K, {self.heads.shape[-1]}], got {list(d.shape)}"
            )
        return d

    def token_scores(self, directions: Any) -> torch.Tensor:
        """Each token's contribution, summed over layers and heads, scored against K
        directions [K, D] → [B, T, K] (token 0 is the class token). Equals
        `scores(directions).sum((1, 3))` without its O(B·L·T·H·K) memory."""
        self._need_tokens()
        d = self._directions(directions)
        total = None
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            b, t, _ = x.shape
            read = r.heads @ d.T  # [H, d_h, K]
            through_values = torch.einsum("hew,hek->hwk", r.value_weight, read)
            weighted = torch.einsum("btw,bht->bthw", x, a).reshape(b, t, -1)
            layer = weighted @ through_values.reshape(-1, d.shape[0])
            layer = layer + a.transpose(1, 2) @ torch.einsum("he,hek->hk", r.value_bias, read)
            layer = layer + (r.bias @ d.T).sum(0) / t
            total = layer if total is None else total + layer
        return total / self._sigma[:, None, None]

    def scores(self, directions: Any) -> torch.Tensor:
        """Token-by-head contributions scored against K directions [K, D] → [B, L, T, H, K].

        Contracted in each head's value space, so memory is O(B·L·T·H·K), never
        O(B·L·T·H·D)."""
        self._need_tokens()
        d = self._directions(directions)
        layers = []
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            t = a.shape[-1]
            read = r.heads @ d.T  # [H, d_h, K]
            # Fold the value projection into the read-out: tokens meet K columns per head.
            through_values = torch.einsum("hew,hek->hwk", r.value_weight, read)
            per_token = torch.einsum("btw,hwk->bthk", x, through_values)
            per_token = per_token + torch.einsum("he,hek->hk", r.value_bias, read)
            scored = per_token * a.transpose(1, 2)[..., None]
            layers.append(scored + (r.bias @ d.T) / t)
        return torch.stack(layers, 1) / self._sigma[:, None, None, None, None]


class Decomposer:
    """Decomposes an open_clip ViT with forward hooks on the stock model.

    Use as a context manager (or call `close()`): the hooks are removed on exit.

        with Decomposer(model) as decomposer:
            parts = decomposer.decompose(images)

    Raises `UnsupportedModelError` for towers it cannot decompose exactly (timm and ResNet
    towers, attentional or average pooling, custom blocks).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.visual = _vision_tower(model)
        self.blocks = list(self.visual.transformer.resblocks)
        self._batch_first = getattr(self.visual.transformer, "batch_first", True)
        self._capture: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._cached: tuple[tuple[int, ...], Any] | None = None
        self._attach()

    # hooks ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        v = self.visual
        self._handles.append(v.ln_pre.register_forward_hook(self._on_embedding))
        self._handles.append(v.ln_post.register_forward_pre_hook(self._on_ln_post))
        for i, block in enumerate(self.blocks):
            self._handles.append(block.ln_1.register_forward_hook(self._attention_hook(i)))
            self._handles.append(block.ls_2.register_forward_hook(self._mlp_hook(i)))

    def close(self) -> None:
        """Removes every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Decomposer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._batch_first else x.transpose(0, 1)

    def _on_embedding(self, module, inputs, output) -> None:
        if self._capture is not None:
            self._capture["embedding"] = self._tokens(output)[:, 0].float()

    def _on_ln_post(self, module, inputs) -> None:
        if self._capture is not None:
            z = inputs[0]
            self._capture["final"] = (z[:, 0] if z.ndim == 3 else z).float()

    def _mlp_hook(self, i: int):
        def hook(module, inputs, output) -> None:
            if self._capture is not None:
                self._capture["mlp"][i] = self._tokens(output)[:, 0].float()

        return hook

    def _attention_hook(self, i: int):
        attn: nn.MultiheadAttention = self.blocks[i].attn

        def hook(module, inputs, output) -> None:
            if self._capture is None:
                return
            x = self._tokens(output).float()  # [B, T, W], the attention's input
            w = x.shape[-1]
            h = attn.num_heads
            dh = w // h
            weight = attn.in_proj_weight.float().view(3, h, dh, w)
            bias = attn.in_proj_bias
            if bias is None:
                bias = torch.zeros(3, h, dh, device=x.device)
            else:
                bias = bias.float().view(3, h, dh)
            # Only the class token's query row is needed, and neither keys nor values of every
            # token: q·(W_K x_j + b_K) = (W_Kᵀ q)·x_j + q·b_K, and Σ_j a_j (W_V x_j + b_V) =
            # W_V (Σ_j a_j x_j) + b_V since the row sums to one; the value projection of the
            # pooled input is the read-out's (`_assemble`). O(B·H·T·W) per layer.
            q = torch.einsum("bw,hew->bhe", x[:, 0], weight[0]) + bias[0]
            keyed = torch.einsum("bhe,hew->bhw", q, weight[1])
            logits = torch.einsum("bhw,btw->bht", keyed, x) + (q * bias[1]).sum(-1)[..., None]
            a = torch.softmax(logits * dh**-0.5, dim=-1)  # [B, H, T]
            self._capture["pooled"][i] = torch.einsum("bht,btw->bhw", a, x)
            self._capture["own"][i] = (a[:, :, 0], x[:, 0], x.shape[1])
            if self._capture["spatial"]:
                self._capture["attention"][i] = a
                self._capture["inputs"][i] = x

        return hook

    # readout -------------------------------------------------------------------------------

    def _post(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ln_post's γ folded into proj and centred over the width, and β @ proj."""
        v = self.visual
        width = v.ln_post.normalized_shape[0]
        device = (
            v.ln_post.weight.device if v.ln_post.weight is not None else v.class_embedding.device
        )
        proj = v.proj.detach().float() if v.proj is not None else torch.eye(width, device=device)
        gamma = v.ln_post.weight.detach().float() if v.ln_post.weight is not None else None
        scaled = proj if gamma is None else gamma[:, None] * proj
        centred = scaled - scaled.mean(0, keepdim=True)
        beta = v.ln_post.bias
        offset = (
            beta.detach().float() @ proj
            if beta is not None
            else torch.zeros(proj.shape[1], device=device)
        )
        return centred, offset

    def _readouts(self, centred: torch.Tensor) -> list[_Readout]:
        readouts = []
        for block in self.blocks:
            attn = block.attn
            w = attn.embed_dim
            h, dh = attn.num_heads, w // attn.num_heads
            layer = _scale(block.ls_1, w, centred.device)[:, None] * centred  # [W, D]
            out_w = attn.out_proj.weight.detach().float()  # [W, W]: out = x @ out_wᵀ + b
            heads = torch.stack([out_w[:, i * dh : (i + 1) * dh].T @ layer for i in range(h)])
            b = attn.out_proj.bias
            bias_w = (
                b.detach().float() / h if b is not None else torch.zeros(w, device=centred.device)
            )
            in_w = attn.in_proj_weight.detach().float()[2 * w :].view(h, dh, w)
            in_b = attn.in_proj_bias
            if in_b is None:
                value_bias = torch.zeros(h, dh, device=centred.device)
            else:
                value_bias = in_b.detach().float()[2 * w :].view(h, dh)
            readouts.append(
                _Readout(
                    heads=heads,
                    bias=(bias_w @ layer).expand(h, -1),
                    value_weight=in_w,
                    value_bias=value_bias,
                )
            )
        return readouts

    # decomposition -------------------------------------------------------------------------

    @contextmanager
    def _capturing(self, spatial: bool) -> Iterator[dict[str, Any]]:
        if not self._handles:
            raise RuntimeError("this Decomposer is closed: its hooks were removed")
        n = len(self.blocks)
        self._capture = {
            "spatial": spatial,
            "mlp": [None] * n,
            "pooled": [None] * n,
            "own": [None] * n,
            "attention": [None] * n,
            "inputs": [None] * n,
        }
        try:
            yield self._capture
        finally:
            self._capture = None

    @torch.no_grad()
    def decompose(self, images: torch.Tensor, spatial: bool = False) -> Decomposition:
        """Runs `encode_image` on `images` [B, 3, H, W] and splits its output.

        With `spatial=True` the result also holds the per-token terms (`spatial`, `scores`).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images: expected a tensor [B, 3, H, W], got {shape}")
        with self._capturing(spatial) as cap:
            encode = getattr(self.model, "encode_image", self.visual)
            representation = encode(images)
            missing = [
                name
                for name, got in [("ln_pre", "embedding" in cap), ("ln_post", "final" in cap)]
                + [(f"resblocks[{i}].ln_1", x is not None) for i, x in enumerate(cap["pooled"])]
                + [(f"resblocks[{i}].ls_2", x is not None) for i, x in enumerate(cap["mlp"])]
                if not got
            ]
            if missing:
                raise RuntimeError(
                    "hooks never fired on " + ", ".join(missing) + ": the model's forward did "
                    "not run through these modules, so the decomposition would be wrong"
                )
            return self._assemble(cap, representation.float())

    def _readout_weights(self) -> tuple[torch.Tensor, torch.Tensor, list[_Readout]]:
        """The read-out maps, recomputed only when a parameter of the tower changed."""
        key = tuple(p._version for p in self.visual.parameters()) + tuple(
            p.data_ptr() for p in self.visual.parameters()
        )
        if self._cached is None or self._cached[0] != key:
            centred, offset = self._post()
            self._cached = (key, (centred, offset, self._readouts(centred)))
        return self._cached[1]

    def _assemble(self, cap: dict[str, Any], representation: torch.Tensor) -> Decomposition:
        centred, offset, readouts = self._readout_weights()
        z = cap["final"]
        eps = self.visual.ln_post.eps
        sigma = torch.sqrt(z.var(dim=-1, unbiased=False) + eps)  # [B]
        heads = torch.stack(
            [
                torch.einsum("bhe,hed->bhd", r.pooled_values(pooled), r.heads) + r.bias
                for pooled, r in zip(cap["pooled"], readouts, strict=True)
            ],
            1,
        )
        # The class token's own share of each attention term: its attention weight times
        # its value, plus its 1/T share of the output bias.
        class_token = torch.stack(
            [
                torch.einsum("bh,bhe,hed->bd", weight, r.values(x0[:, None])[:, 0], r.heads)
                + r.bias.sum(0) / t
                for (weight, x0, t), r in zip(cap["own"], readouts, strict=True)
            ],
            1,
        )
        mlps = torch.stack([cap["embedding"], *cap["mlp"]], 1) @ centred
        mlps[:, 0] += offset * sigma[:, None]
        inv = 1.0 / sigma
        return Decomposition(
            heads=heads * inv[:, None, None, None],
            mlps=mlps * inv[:, None, None],
            representation=representation,
            class_token=class_token * inv[:, None, None],
            _attention=[a for a in cap["attention"] if a is not None],
            _inputs=[x for x in cap["inputs"] if x is not None],
            _readouts=readouts if cap["spatial"] else [],
            _sigma=sigma,
        )
