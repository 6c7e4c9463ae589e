"""Exact decomposition of a ViT's image representation into direct contributions: the maths,
shared by every tower family (each family is an adapter, `tower.Tower`).

The residual stream entering the final norm is, at every token,

    y = x0 + Σ_l attn_l + Σ_l mlp_l,

and with every norm on the way to the representation linearised per token with that token's
own σ (and a pooler's attention weights taken from the forward pass), the representation is
linear in y: `Σ_g Σ_j P[g, j] · y_j @ value_g @ out_g + constant`, j over the tokens the
pooling reads (the class token; every patch; the tokens an attention pooler attends to) and g
over the pooler's heads (`tower.Pooling`). So every term maps exactly. The attention term of
layer l splits over heads h and source tokens i: `attn_l[j] = Σ_h Σ_i A^{l,h}_{ji} v^{l,h}_i
@ head_map_h + bias` (a sub-LN or post-norm inside the branch adds a per-token scale).

Conventions for what is shared (they decide which term a constant lands in; the parts always
sum to the representation):

- a norm's mean: each term is centred by its own mean (exact, since the mean is linear);
- every bias and norm offset past the residual stream (the final norm's β, a pooler's
  biases, a linear head's bias) goes to the embedding term, `mlps[:, 0]`;
- an attention layer's output bias (and a branch norm's offset): split equally among its H
  heads, and within a head equally among the T source tokens (so `spatial.sum(2) == heads`);
- the value bias is part of every token's value, so it is weighted by that token's attention;
- LayerScale multiplies every term of its branch;
- an attention pooler's MLP (SigLIP, PE-Core) is nonlinear in everything: its own term, the
  last entry of `mlps` (`Decomposition.terms` names them all).

Only the attention rows of the tokens the pooling reads are used, reduced as soon as a layer
finishes, so no [B, T, T, H, D] tensor is ever built.

`convention="paper"` (class-token pooling only) gives the terms of Gandelsman et al.'s own
code instead: the final norm's mean μ and bias β (of the whole stream) are shared equally
among the K = 2L + 1 additive blocks (the embedding, L attention layers, L MLPs), an attention
layer's share equally among its H heads and, for token terms, among its T source tokens;
every term is then divided by the image's ‖r‖, so the terms sum to r/‖r‖.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checks import Convention, check_convention
from ..errors import InputError, InputTypeError, UnsupportedModelError
from .families import tower_of
from .tower import (
    Capture,
    LayerCapture,
    LayerMaps,
    Pooling,
    Tower,
    exact,
    take,
    term_names,
    token_count,
)

__all__ = ["Decomposer", "Decomposition"]

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

# Spatial decompositions run in chunks of images whose transient attention maps
# [chunk, H, T, T] stay under this many floats.
_ATTENTION_FLOATS = 2**27


@dataclass
class _TokenLayer:
    """One layer's token terms: what `spatial` and `scores` need."""

    weights: torch.Tensor  # [B, G, H, T]: Σ_j P[g, j] · s_j · A^h_{j, i}
    inputs: torch.Tensor  # [B, T, W] the attention's input
    maps: LayerMaps
    bias: torch.Tensor  # [B, D]: the layer's biases (all heads, all tokens), read out

    def values(self) -> torch.Tensor:
        """Every token's value [B, T, H, d_h]."""
        return torch.einsum("btw,hew->bthe", self.inputs, self.maps.value_weight) + (
            self.maps.value_bias
        )


@dataclass
class Decomposition:
    """Direct contributions to the image representation, in the joint image–text space.

    `heads.sum((1, 2)) + mlps.sum(1)` equals `representation` up to float rounding: what
    the model's image encoder returns (unnormalised), or (convention "paper") that divided by
    its norm. See the module docstring for how biases and norm means are shared.

    Attributes:
        heads: [B, L, H, D], each attention head's contribution.
        mlps: [B, len(terms), D], the embedding term (index 0: everything before the first
            block plus the constants past the stream), each layer's MLP, then any pooler MLP.
        representation: [B, D].
        class_token: [B, L, D], the part of each layer's attention term (all heads) that
            flows from the class token's own position, `spatial[:, :, 0].sum(2)`; zeros for a
            tower without a class token.
        convention: "textspan" or "paper".
        terms: the names of the `mlps` entries.
        prefix_tokens: how many tokens precede the patches (class token, registers).
    """

    heads: torch.Tensor
    mlps: torch.Tensor
    representation: torch.Tensor
    class_token: torch.Tensor
    convention: Convention = "textspan"
    terms: tuple[str, ...] = ()
    prefix_tokens: int = 1
    _layers: list[_TokenLayer] = field(default_factory=list, repr=False)
    _pooling: Pooling | None = field(default=None, repr=False)
    # [B]: 1/‖r‖ (paper) or ones: every token term is multiplied by it at the end.
    _scale: torch.Tensor | None = field(default=None, repr=False)
    # [B, D] (paper only): each additive block's share of −μ and β; a head takes 1/H of its
    # layer's, a token term 1/(H·T).
    _shared: torch.Tensor | None = field(default=None, repr=False)

    def _need_tokens(self) -> None:
        if not self._layers:
            raise InputError(
                "this decomposition has no token terms: call decompose(images, spatial=True)"
            )

    def _share(self, d: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block's share [B, D], or scored against directions d [K, D] → [B, K]."""
        if self._shared is None:
            return None
        return self._shared if d is None else self._shared @ d.T

    def class_attention(self, layer: int) -> torch.Tensor:
        """[B, H, T]: how layer `layer`'s heads weigh every source token for the pooled
        representation, each row summing to one (with class-token pooling: the attention from
        the class token; the raw-attention baseline of segmentation reads the last layer's)."""
        self._need_tokens()
        w = self._layers[layer].weights.sum(1)
        return w / w.sum(-1, keepdim=True)

    @property
    def spatial(self) -> torch.Tensor:
        """[B, L, T, H, D]: the contribution of each source token through each head.

        Materialised on each access (B·L·T·H·D floats); `scores` avoids that."""
        self._need_tokens()
        pooling = self._pooling
        share = self._share()
        layers = []
        for layer in self._layers:
            h, t = layer.weights.shape[2:]
            through = torch.einsum("bthe,hew->bthw", layer.values(), layer.maps.head_map)
            weights = layer.weights.transpose(2, 3)[..., None]  # [B, G, T, H, 1]
            out = sum(
                pooling.read_group(weights[:, g] * through, g)
                for g in range(layer.weights.shape[1])
            )
            out = out + layer.bias[:, None, None] / (h * t)
            if share is not None:
                out = out + share[:, None, None] / (h * t)
            layers.append(out)
        return torch.stack(layers, 1) * self._scale[:, None, None, None, None]

    def _directions(self, directions: Any) -> torch.Tensor:
        d = torch.as_tensor(directions, dtype=self.heads.dtype, device=self.heads.device)
        if d.ndim != 2 or d.shape[1] != self.heads.shape[-1]:
            raise InputError(
                f"directions: expected shape [K, {self.heads.shape[-1]}], got {list(d.shape)}"
            )
        return d

    def _layer_scores(self, layer: _TokenLayer, d: torch.Tensor) -> torch.Tensor:
        """[B, T, H, K], before `_scale` and the paper's share."""
        h, t = layer.weights.shape[2:]
        read = self._pooling.directions(d)  # [G, W, K]
        by_head = torch.einsum("hew,gwk->ghek", layer.maps.head_map, read)
        if by_head.shape[0] == 1:
            # One group: fold the value projection into the read-out, so the tokens meet K
            # columns per head instead of being projected to values first.
            through_values = torch.einsum("hew,hek->hwk", layer.maps.value_weight, by_head[0])
            per_token = torch.einsum("btw,hwk->bthk", layer.inputs, through_values)
            per_token = per_token + torch.einsum("he,hek->hk", layer.maps.value_bias, by_head[0])
            scored = per_token * layer.weights[:, 0].transpose(1, 2)[..., None]
        else:
            scored = torch.einsum("bthe,ghek,bght->bthk", layer.values(), by_head, layer.weights)
        return scored + (layer.bias @ d.T)[:, None, None] / (h * t)

    def scores(self, directions: Any) -> torch.Tensor:
        """Token-by-head contributions scored against K directions [K, D] → [B, L, T, H, K].

        Contracted in each head's value space, so memory is O(B·L·T·H·K), never
        O(B·L·T·H·D)."""
        self._need_tokens()
        d = self._directions(directions)
        share = self._share(d)
        layers = []
        for layer in self._layers:
            scored = self._layer_scores(layer, d)
            if share is not None:
                h, t = layer.weights.shape[2:]
                scored = scored + share[:, None, None] / (h * t)
            layers.append(scored)
        return torch.stack(layers, 1) * self._scale[:, None, None, None, None]

    def token_scores(self, directions: Any) -> torch.Tensor:
        """Each token's contribution, summed over layers and heads, scored against K
        directions [K, D] → [B, T, K] (the first `prefix_tokens` are the class token and
        registers). Equals `scores(directions).sum((1, 3))` without its memory."""
        self._need_tokens()
        d = self._directions(directions)
        share = self._share(d)
        total = None
        for layer in self._layers:
            summed = self._layer_scores(layer, d).sum(2)
            if share is not None:
                summed = summed + share[:, None] / layer.weights.shape[3]
            total = summed if total is None else total + summed
        return total * self._scale[:, None, None]

    @staticmethod
    def concat(parts: list[Decomposition]) -> Decomposition:
        """The decompositions of consecutive chunks of one batch, as one."""
        first = parts[0]
        if len(parts) == 1:
            return first

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        layers = [
            _TokenLayer(
                weights=torch.cat([p._layers[i].weights for p in parts]),
                inputs=torch.cat([p._layers[i].inputs for p in parts]),
                maps=first._layers[i].maps,
                bias=torch.cat([p._layers[i].bias for p in parts]),
            )
            for i in range(len(first._layers))
        ]
        pooling = None
        if first._pooling is not None:
            pooling = Pooling(
                weights=torch.cat([p._pooling.weights for p in parts]),
                value=first._pooling.value,
                out=first._pooling.out,
                constant=torch.cat([p._pooling.constant for p in parts]),
            )
        return Decomposition(
            heads=cat("heads"),
            mlps=cat("mlps"),
            representation=cat("representation"),
            class_token=cat("class_token"),
            convention=first.convention,
            terms=first.terms,
            prefix_tokens=first.prefix_tokens,
            _layers=layers,
            _pooling=pooling,
            _scale=cat("_scale"),
            _shared=cat("_shared"),
        )


class Decomposer:
    """Decomposes a CLIP-like ViT with forward hooks on the stock model.

    Use as a context manager (or call `close()`): the hooks are removed on exit.

        with Decomposer(model) as decomposer:
            parts = decomposer.decompose(images)

    Raises `UnsupportedModelError` for towers it cannot decompose exactly (ResNets,
    ConvNeXt, a nonlinear projection head, custom blocks), naming why.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tower: Tower = tower_of(model)
        self._capture: Capture | None = None
        # During a spatial pass: [B or 1, G, T_r], the pooling weights (up to a per-image
        # factor) each layer's attention rows are reduced with as soon as the layer ends.
        self._reduce: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._cached: tuple[tuple[int, ...], list[LayerMaps]] | None = None
        self._attach()

    @property
    def visual(self) -> nn.Module:
        """The image tower."""
        return self.tower.module

    @property
    def terms(self) -> tuple[str, ...]:
        """The names of a decomposition's `mlps` entries."""
        return term_names(self.tower)

    # hooks ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        t = self.tower
        # Module paths for the error when a hook never fires, taken before any forward.
        self._names = {id(m): name for name, m in t.module.named_modules()}
        self._handles.append(t.block(0).register_forward_pre_hook(self._on_embedding))
        self._handles.append(t.block(t.layers - 1).register_forward_hook(self._on_final))
        for i in range(t.layers):
            self._handles.append(t.block(i).register_forward_hook(self._layer_done(i)))
        self._handles.extend(t.attach(lambda: self._capture))

    def close(self) -> None:
        """Removes every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Decomposer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_embedding(self, module, args) -> None:
        if self._capture is not None:
            self._capture.embedding = take(args[0], self.tower.read_tokens)

    def _on_final(self, module, args, output) -> None:
        if self._capture is not None:
            out = output[0] if isinstance(output, tuple) else output
            self._capture.final = take(out, self.tower.read_tokens)

    def _layer_done(self, i: int):
        """Reduces the layer's attention rows once every hook of the block has fired: what
        the class-token term needs, and in a spatial pass every source token's weight."""

        def hook(module, args, output) -> None:
            cap = self._capture
            if cap is None:
                return
            layer = cap.layers[i]
            if layer.rows is None or layer.inputs is None:
                return  # reported by _check_fired
            scale = None if layer.o_scale is None else layer.o_scale[:, None, :, None]
            rows = layer.rows if scale is None else layer.rows * scale
            if self.tower.has_class_token:
                # Copies, so that neither keeps the layer's whole attention map alive.
                layer.class_rows = rows[..., 0].clone()  # [B, H, T_r]
                layer.class_input = layer.inputs[:, 0].clone()
            if self._reduce is not None:
                reduce = self._reduce.expand(rows.shape[0], -1, -1)
                layer.weights = torch.einsum("bgj,bhji->bghi", reduce, rows)
            else:
                layer.inputs = None
            layer.rows = None

        return hook

    # decomposition -------------------------------------------------------------------------

    @contextmanager
    def _capturing(self, reduce: torch.Tensor | None) -> Iterator[Capture]:
        if not self._handles:
            raise RuntimeError("this Decomposer is closed: its hooks were removed")
        self._capture = Capture([LayerCapture() for _ in range(self.tower.layers)])
        self._reduce = reduce
        try:
            with self.tower.forward_context():
                yield self._capture
        finally:
            self._capture = None
            self._reduce = None

    def _forward(self, images: torch.Tensor, reduce: torch.Tensor | None):
        with self._capturing(reduce) as cap:
            representation = self.tower.encode(images)
            self._check_fired(cap)
            return cap, exact(representation)

    def _check_fired(self, cap: Capture) -> None:
        t = self.tower
        missing = []
        if cap.embedding is None:
            missing.append(f"the input of {self._names.get(id(t.block(0)), 'block 0')}")
        if cap.final is None:
            missing.append(f"the output of {self._names.get(id(t.block(t.layers - 1)))}")
        wanted = {"o": "heads' outputs", "mlp": "MLP term"}
        if t.has_class_token:
            wanted["class_input"] = "attention input"
        if self._reduce is not None:
            wanted["weights"] = "attention weights"
        for i, layer in enumerate(cap.layers):
            missing += [
                f"layer {i}'s {what}"
                for name, what in wanted.items()
                if getattr(layer, name) is None
            ]
        if missing:
            raise RuntimeError(
                "hooks never fired for " + ", ".join(missing) + ": the model's forward did "
                "not run through the modules the decomposition hooks, so it would be wrong"
            )

    @torch.no_grad()
    def decompose(
        self, images: torch.Tensor, *, spatial: bool = False, convention: Convention = "textspan"
    ) -> Decomposition:
        """Runs the image tower on `images` [B, 3, H, W] and splits its output.

        With `spatial=True` the result also holds the per-token terms (`spatial`, `scores`).
        `convention`: "textspan" (each term centred by its own mean, constants in the
        embedding term, the unnormalised representation) or "paper" (the shares and ‖r‖ of
        Gandelsman et al.'s code, for class-token pooling; see the module docstring).
        """
        check_convention(convention)
        if convention == "paper" and self.tower.pooling_type != "token":
            raise UnsupportedModelError(
                f"convention 'paper' is defined for class-token pooling; {self.tower.family} "
                f"pools by {self.tower.pooling_type}: use convention 'textspan'"
            )
        self._check_images(images)
        self._refuse_active_dropout()
        if not spatial:
            cap, representation = self._forward(images, None)
            return self._assemble(cap, representation, convention, None)
        t = self.tower
        tokens = token_count(t)
        chunk = max(1, _ATTENTION_FLOATS // (t.heads * tokens * tokens))
        return Decomposition.concat(
            [
                self._decompose_tokens(images[i : i + chunk], convention)
                for i in range(0, images.shape[0], chunk)
            ]
        )

    def _decompose_tokens(self, images: torch.Tensor, convention: Convention) -> Decomposition:
        pattern = self.tower.pattern()
        if pattern is None:
            # The pooling weights depend on the image (an attention pooler, a norm per
            # token): a first pass finds them, so the second reduces each layer at once.
            reduce = self._pooling_weights(images, convention)
        else:
            reduce = pattern.to(images.device, self.tower.dtype)
        cap, representation = self._forward(images, reduce)
        return self._assemble(cap, representation, convention, reduce)

    def _pooling_weights(self, images: torch.Tensor, convention: Convention) -> torch.Tensor:
        """P [B, G, T_r] of a plain pass (its capture freed before the next pass)."""
        cap, _ = self._forward(images, None)
        return self.tower.pooling(cap, centre=convention == "textspan").weights

    def _check_images(self, images: Any) -> None:
        h, w = self.tower.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise InputError(f"images: expected a tensor [B, 3, {h}, {w}], got {shape}")
        if not images.is_floating_point():
            raise InputTypeError(
                f"images: expected preprocessed float images, got dtype {images.dtype} (use the "
                "model's preprocess)"
            )
        if images.shape[0] == 0 or tuple(images.shape[1:]) != (3, h, w):
            raise InputError(
                f"images: expected a tensor [B >= 1, 3, {h}, {w}] (the model's input size), got "
                f"{list(images.shape)}"
            )

    def _refuse_active_dropout(self) -> None:
        """Dropout changes the forward at random, so the parts would not add up to it."""
        for name, m in self.tower.module.named_modules():
            if not m.training:
                continue
            p = getattr(m, "p", None) if isinstance(m, _DROPOUTS) else None
            if isinstance(m, nn.MultiheadAttention):
                p = m.dropout
            elif type(m).__name__ in ("PatchDropout", "PatchDropoutWithIndices"):
                p = getattr(m, "prob", 0.0)
            elif type(m).__name__ == "DropPath":
                p = getattr(m, "drop_prob", 0.0)
            if p:
                raise UnsupportedModelError(
                    f"{type(self.tower.module).__name__}.{name or 'itself'} has active dropout "
                    f"(p = {p}) in training mode, so the parts would not add up to the output: "
                    "call model.eval()"
                )

    def _layer_maps(self, device: torch.device) -> list[LayerMaps]:
        """Every layer's maps, recomputed only when a parameter of the tower changed."""
        params = list(self.tower.module.parameters())
        key = (*(p._version for p in params), *(p.data_ptr() for p in params))
        if self._cached is None or self._cached[0] != key:
            maps = [self.tower.layer_maps(i, device) for i in range(self.tower.layers)]
            self._cached = (key, maps)
        return self._cached[1]

    def _assemble(
        self,
        cap: Capture,
        representation: torch.Tensor,
        convention: Convention,
        reduce: torch.Tensor | None,
    ) -> Decomposition:
        t = self.tower
        pooling = t.pooling(cap, centre=convention == "textspan")
        maps = self._layer_maps(representation.device)
        p = pooling.weights  # [B, G, T_r]
        n = representation.shape[0]
        tokens = token_count(t)
        heads, biases, class_token = [], [], []
        for layer, m in zip(cap.layers, maps, strict=True):
            scaled = p if layer.o_scale is None else p * layer.o_scale[:, None]
            pooled = torch.einsum("bgj,bjhe->bghe", scaled, layer.o)
            through = torch.einsum("bghe,hew->bghw", pooled, m.head_map)
            # The branch's constants at every read token (a post-norm scales a part per token).
            bias = m.bias_fixed + (
                m.bias_scaled
                if layer.bias_scale is None
                else layer.bias_scale[..., None] * m.bias_scaled
            )
            bias = pooling.pool(bias.expand(n, p.shape[2], -1))
            biases.append(bias)
            heads.append(pooling.read(through) + bias[:, None] / t.heads)
            if t.has_class_token:
                weight = torch.einsum("bgj,bhj->bgh", p, layer.class_rows)
                value = torch.einsum("bw,hew->bhe", layer.class_input, m.value_weight)
                value = value + m.value_bias
                flow = torch.einsum("bgh,bhe,hew->bgw", weight, value, m.head_map)
                class_token.append(pooling.read(flow) + bias / tokens)
            else:
                class_token.append(torch.zeros_like(bias))
        heads = torch.stack(heads, 1)
        class_token = torch.stack(class_token, 1)
        mlps = [pooling.pool(cap.embedding), *(pooling.pool(layer.mlp) for layer in cap.layers)]
        if pooling.extra is not None:
            mlps.append(pooling.extra)
        mlps = torch.stack(mlps, 1)
        scale = torch.ones(n, device=representation.device, dtype=representation.dtype)
        shared = None
        if convention == "textspan":
            mlps[:, 0] += pooling.constant
        else:
            # −μ and β shared equally among the 2L + 1 additive blocks, per image (P already
            # holds the final norm's 1/σ).
            blocks = 2 * t.layers + 1
            mu = cap.final[:, 0].mean(-1)
            shared = (
                pooling.constant - (mu * p[:, 0, 0])[:, None] * pooling.out[0].sum(0)
            ) / blocks
            heads = heads + shared[:, None, None] / t.heads
            class_token = class_token + shared[:, None] / tokens
            mlps = mlps + shared[:, None]
            norm = representation.norm(dim=-1)
            scale = 1.0 / norm
            representation = representation / norm[:, None]
        token_layers = []
        if reduce is not None:
            # The rows were reduced with P up to a per-image factor (exact P in a second pass).
            factor = (p.flatten(1)[:, 0] / reduce.flatten(1)[:, 0]).reshape(-1, 1, 1, 1)
            token_layers = [
                _TokenLayer(layer.weights * factor, layer.inputs, m, bias)
                for layer, m, bias in zip(cap.layers, maps, biases, strict=True)
            ]
        return Decomposition(
            heads=heads * scale[:, None, None, None],
            mlps=mlps * scale[:, None, None],
            representation=representation,
            class_token=class_token * scale[:, None, None],
            convention=convention,
            terms=self.terms,
            prefix_tokens=t.prefix_tokens,
            _layers=token_layers,
            _pooling=pooling if reduce is not None else None,
            _scale=scale,
            _shared=shared,
        )
