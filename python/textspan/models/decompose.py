"""Exact decomposition of a ViT's image representation into direct contributions: the maths,
shared by every tower family (each family is an adapter, `tower.Tower`).

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

`convention="paper"` gives the terms of Gandelsman et al.'s own code instead: the final
norm's mean μ and bias β (of the whole stream) are shared equally among the K = 2L + 1
additive blocks (the embedding, L attention layers, L MLPs), an attention layer's share
equally among its H heads and, for token terms, among its T source tokens; every term is then
divided by the image's ‖r‖, so the terms sum to the normalised representation r/‖r‖.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checks import check_convention
from ..errors import InputError, InputTypeError, UnsupportedModelError
from .families import tower_of
from .tower import Tower

__all__ = ["Decomposer", "Decomposition"]

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


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

    `heads.sum((1, 2)) + mlps.sum(1)` equals `representation` up to float rounding: what
    `model.encode_image(images, normalize=False)` returns, or (convention "paper") that
    divided by its norm. See the module docstring for how biases and LayerNorm means are
    shared under each convention.

    Attributes:
        heads: [B, L, H, D], each attention head's contribution at the class token.
        mlps: [B, L+1, D], the embedding term (index 0: class embedding, positional
            embedding and `ln_pre`, plus, in textspan's convention, `ln_post`'s bias) then
            each layer's MLP.
        representation: [B, D].
        class_token: [B, L, D], the part of each layer's attention term (all heads) that
            flows from the class token's own position: `spatial[:, :, 0].sum(2)`.
        convention: "textspan" or "paper".
    """

    heads: torch.Tensor
    mlps: torch.Tensor
    representation: torch.Tensor
    class_token: torch.Tensor
    convention: str = "textspan"
    _attention: list[torch.Tensor] = field(default_factory=list, repr=False)  # [B, H, T] per layer
    # Each layer's attention input (ln_1 output) [B, T, W].
    _inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    _readouts: list[_Readout] = field(default_factory=list, repr=False)
    # [B]: what every term is multiplied by at the end: 1/σ, or 1/(σ‖r‖) (paper).
    _scale: torch.Tensor | None = field(default=None, repr=False)
    # [B, D] (paper only): each additive block's share of −μ and β, before `_scale`; a head
    # takes 1/H of its layer's, a token term 1/(H·T).
    _shared: torch.Tensor | None = field(default=None, repr=False)

    def _share(self, d: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block's share [B, D], or scored against directions d [K, D] → [B, K]."""
        if self._shared is None:
            return None
        return self._shared if d is None else self._shared @ d.T

    def _need_tokens(self) -> None:
        if not self._attention:
            raise InputError(
                "this decomposition has no token terms: call decompose(images, spatial=True)"
            )

    def class_attention(self, layer: int) -> torch.Tensor:
        """[B, H, T]: layer `layer`'s attention from the class token to every token (the
        raw-attention baseline of segmentation reads the last layer's)."""
        self._need_tokens()
        return self._attention[layer]

    @property
    def spatial(self) -> torch.Tensor:
        """[B, L, T, H, D]: the contribution of each source token through each head.

        Materialised on each access (B·L·T·H·D floats); `scores` avoids that."""
        self._need_tokens()
        layers = []
        share = self._share()
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            h, t = a.shape[1:]
            layer = torch.einsum("bhj,bjhe,hed->bjhd", a, r.values(x), r.heads) + r.bias / t
            if share is not None:
                layer = layer + share[:, None, None] / (h * t)
            layers.append(layer)
        return torch.stack(layers, 1) * self._scale[:, None, None, None, None]

    def _directions(self, directions: Any) -> torch.Tensor:
        d = torch.as_tensor(directions, dtype=torch.float32, device=self.heads.device)
        if d.ndim != 2 or d.shape[1] != self.heads.shape[-1]:
            raise InputError(
                f"directions: expected shape [K, {self.heads.shape[-1]}], got {list(d.shape)}"
            )
        return d

    def token_scores(self, directions: Any) -> torch.Tensor:
        """Each token's contribution, summed over layers and heads, scored against K
        directions [K, D] → [B, T, K] (token 0 is the class token). Equals
        `scores(directions).sum((1, 3))` without its O(B·L·T·H·K) memory."""
        self._need_tokens()
        d = self._directions(directions)
        share = self._share(d)
        total = None
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            b, t, _ = x.shape
            read = r.heads @ d.T  # [H, d_h, K]
            through_values = torch.einsum("hew,hek->hwk", r.value_weight, read)
            weighted = torch.einsum("btw,bht->bthw", x, a).reshape(b, t, -1)
            layer = weighted @ through_values.reshape(-1, d.shape[0])
            layer = layer + a.transpose(1, 2) @ torch.einsum("he,hek->hk", r.value_bias, read)
            layer = layer + (r.bias @ d.T).sum(0) / t
            if share is not None:  # the layer's H heads' shares at each token
                layer = layer + share[:, None] / t
            total = layer if total is None else total + layer
        return total * self._scale[:, None, None]

    def scores(self, directions: Any) -> torch.Tensor:
        """Token-by-head contributions scored against K directions [K, D] → [B, L, T, H, K].

        Contracted in each head's value space, so memory is O(B·L·T·H·K), never
        O(B·L·T·H·D)."""
        self._need_tokens()
        d = self._directions(directions)
        share = self._share(d)
        layers = []
        for a, x, r in zip(self._attention, self._inputs, self._readouts, strict=True):
            h, t = a.shape[1:]
            read = r.heads @ d.T  # [H, d_h, K]
            # Fold the value projection into the read-out: tokens meet K columns per head.
            through_values = torch.einsum("hew,hek->hwk", r.value_weight, read)
            per_token = torch.einsum("btw,hwk->bthk", x, through_values)
            per_token = per_token + torch.einsum("he,hek->hk", r.value_bias, read)
            scored = per_token * a.transpose(1, 2)[..., None] + (r.bias @ d.T) / t
            if share is not None:
                scored = scored + share[:, None, None] / (h * t)
            layers.append(scored)
        return torch.stack(layers, 1) * self._scale[:, None, None, None, None]


@dataclass
class _Capture:
    """What the hooks record during one forward pass (one slot per layer)."""

    layers: int
    spatial: bool
    embedding: torch.Tensor | None = None  # [B, W] the class token after the embedding
    final: torch.Tensor | None = None  # [B, W] the stream entering the final norm
    mlp: list[torch.Tensor | None] = field(default_factory=list)  # [B, W] per layer
    pooled: list[torch.Tensor | None] = field(default_factory=list)  # [B, H, W] Σ_j a_j x_j
    own: list[tuple[torch.Tensor, torch.Tensor, int] | None] = field(default_factory=list)
    attention: list[torch.Tensor | None] = field(default_factory=list)  # [B, H, T]
    inputs: list[torch.Tensor | None] = field(default_factory=list)  # [B, T, W]

    def __post_init__(self) -> None:
        for name in ("mlp", "pooled", "own", "attention", "inputs"):
            setattr(self, name, [None] * self.layers)


class Decomposer:
    """Decomposes a CLIP-like ViT with forward hooks on the stock model.

    Use as a context manager (or call `close()`): the hooks are removed on exit.

        with Decomposer(model) as decomposer:
            parts = decomposer.decompose(images)

    Raises `UnsupportedModelError` for towers it cannot decompose exactly (timm and ResNet
    towers, attentional or average pooling, custom blocks).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tower: Tower = tower_of(model)
        self._capture: _Capture | None = None
        self._handles: list[Any] = []
        self._cached: tuple[tuple[int, ...], Any] | None = None
        self._attach()

    @property
    def visual(self) -> nn.Module:
        """The image tower."""
        return self.tower.module

    # hooks ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        t = self.tower
        # Module paths for the error when a hook never fires, taken before any forward.
        self._names = {id(m): name for name, m in t.module.named_modules()}
        self._handles.append(t.embedding.register_forward_hook(self._on_embedding))
        self._handles.append(t.final_norm.register_forward_pre_hook(self._on_final_norm))
        for i in range(t.layers):
            self._handles.append(
                t.attention_input(i).register_forward_hook(self._attention_hook(i))
            )
            self._handles.append(t.mlp_output(i).register_forward_hook(self._mlp_hook(i)))

    def close(self) -> None:
        """Removes every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Decomposer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_embedding(self, module, inputs, output) -> None:
        if self._capture is not None:
            self._capture.embedding = self.tower.tokens(output)[:, 0].float()

    def _on_final_norm(self, module, inputs) -> None:
        if self._capture is not None:
            z = inputs[0]
            self._capture.final = (z[:, 0] if z.ndim == 3 else z).float()

    def _mlp_hook(self, i: int):
        def hook(module, inputs, output) -> None:
            if self._capture is not None:
                self._capture.mlp[i] = self.tower.tokens(output)[:, 0].float()

        return hook

    def _attention_hook(self, i: int):
        def hook(module, inputs, output) -> None:
            cap = self._capture
            if cap is None:
                return
            x = self.tower.tokens(output).float()  # [B, T, W], the attention's input
            weights = self.tower.layer_weights(i, x.device)
            weight, bias = weights.qkv_weight, weights.qkv_bias
            dh = weight.shape[2]
            # Only the class token's query row is needed, and neither keys nor values of every
            # token: q·(W_K x_j + b_K) = (W_Kᵀ q)·x_j + q·b_K, and Σ_j a_j (W_V x_j + b_V) =
            # W_V (Σ_j a_j x_j) + b_V since the row sums to one; the value projection of the
            # pooled input is the read-out's (`_assemble`). O(B·H·T·W) per layer.
            q = torch.einsum("bw,hew->bhe", x[:, 0], weight[0]) + bias[0]
            keyed = torch.einsum("bhe,hew->bhw", q, weight[1])
            logits = torch.einsum("bhw,btw->bht", keyed, x) + (q * bias[1]).sum(-1)[..., None]
            a = torch.softmax(logits * dh**-0.5, dim=-1)  # [B, H, T]
            cap.pooled[i] = torch.einsum("bht,btw->bhw", a, x)
            cap.own[i] = (a[:, :, 0], x[:, 0], x.shape[1])
            if cap.spatial:
                cap.attention[i] = a
                cap.inputs[i] = x

        return hook

    # readout -------------------------------------------------------------------------------

    def _post(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's γ folded into the projection [W, D], and β @ projection [D]."""
        norm = self.tower.final_norm
        width = norm.normalized_shape[0]
        device = next(self.tower.module.parameters()).device
        proj = self.tower.projection()
        if proj is None:
            proj = torch.eye(width, device=device)
        gamma = norm.weight.detach().float() if norm.weight is not None else None
        scaled = proj if gamma is None else gamma[:, None] * proj
        beta = norm.bias
        offset = (
            beta.detach().float() @ proj
            if beta is not None
            else torch.zeros(proj.shape[1], device=device)
        )
        return scaled, offset

    def _readouts(self, read: torch.Tensor) -> list[_Readout]:
        readouts = []
        for i in range(self.tower.layers):
            lw = self.tower.layer_weights(i, read.device)
            _, h, dh, _ = lw.qkv_weight.shape
            layer = lw.scale[:, None] * read  # [W, D]
            heads = torch.stack(
                [lw.out_weight[:, j * dh : (j + 1) * dh].T @ layer for j in range(h)]
            )
            readouts.append(
                _Readout(
                    heads=heads,
                    bias=((lw.out_bias / h) @ layer).expand(h, -1),
                    value_weight=lw.qkv_weight[2],
                    value_bias=lw.qkv_bias[2],
                )
            )
        return readouts

    # decomposition -------------------------------------------------------------------------

    @contextmanager
    def _capturing(self, spatial: bool) -> Iterator[_Capture]:
        if not self._handles:
            raise RuntimeError("this Decomposer is closed: its hooks were removed")
        self._capture = _Capture(self.tower.layers, spatial)
        try:
            yield self._capture
        finally:
            self._capture = None

    def _check_fired(self, cap: _Capture) -> None:
        t = self.tower
        expected = [(t.embedding, cap.embedding), (t.final_norm, cap.final)]
        expected += [(t.attention_input(i), x) for i, x in enumerate(cap.pooled)]
        expected += [(t.mlp_output(i), x) for i, x in enumerate(cap.mlp)]
        missing = [self._names.get(id(m), type(m).__name__) for m, x in expected if x is None]
        if missing:
            raise RuntimeError(
                "hooks never fired on " + ", ".join(missing) + ": the model's forward did "
                "not run through these modules, so the decomposition would be wrong"
            )

    @torch.no_grad()
    def decompose(
        self, images: torch.Tensor, spatial: bool = False, convention: str = "textspan"
    ) -> Decomposition:
        """Runs the image tower on `images` [B, 3, H, W] and splits its output.

        With `spatial=True` the result also holds the per-token terms (`spatial`, `scores`).
        `convention`: "textspan" (each term centred by its own mean, β in the embedding term,
        the unnormalised representation) or "paper" (the shares and ‖r‖ of Gandelsman et
        al.'s code; see the module docstring).
        """
        check_convention(convention)
        self._check_images(images)
        self._refuse_active_dropout()
        with self._capturing(spatial) as cap:
            representation = self.tower.encode(images)
            self._check_fired(cap)
            return self._assemble(cap, representation.float(), convention)

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
            elif type(m).__name__ == "PatchDropout":
                p = getattr(m, "prob", 0.0)
            if p:
                raise UnsupportedModelError(
                    f"{type(self.tower.module).__name__}.{name or 'itself'} has active dropout "
                    f"(p = {p}) in training mode, so the parts would not add up to the output: "
                    "call model.eval()"
                )

    def _readout_weights(
        self, convention: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[_Readout]]:
        """(read-out of a width vector [W, D], γ @ projection [D], β @ projection [D], the
        heads' read-outs), recomputed only when a parameter of the tower changed.

        textspan's convention reads through the projection centred over the width (each term
        centred by its own mean); the paper's through the plain one (μ is shared instead)."""
        params = list(self.tower.module.parameters())
        key = (convention, *(p._version for p in params), *(p.data_ptr() for p in params))
        if self._cached is None or self._cached[0] != key:
            scaled, offset = self._post()
            read = scaled - scaled.mean(0, keepdim=True) if convention == "textspan" else scaled
            self._cached = (key, (read, scaled.sum(0), offset, self._readouts(read)))
        return self._cached[1]

    def _assemble(
        self, cap: _Capture, representation: torch.Tensor, convention: str
    ) -> Decomposition:
        read, gamma_p, offset, readouts = self._readout_weights(convention)
        z = cap.final
        eps = self.tower.final_norm.eps
        sigma = torch.sqrt(z.var(dim=-1, unbiased=False) + eps)  # [B]
        heads = torch.stack(
            [
                torch.einsum("bhe,hed->bhd", r.pooled_values(pooled), r.heads) + r.bias
                for pooled, r in zip(cap.pooled, readouts, strict=True)
            ],
            1,
        )
        # The class token's own share of each attention term: its attention weight times
        # its value, plus its 1/T share of the output bias.
        tokens = cap.own[0][2]
        class_token = torch.stack(
            [
                torch.einsum("bh,bhe,hed->bd", weight, r.values(x0[:, None])[:, 0], r.heads)
                + r.bias.sum(0) / t
                for (weight, x0, t), r in zip(cap.own, readouts, strict=True)
            ],
            1,
        )
        mlps = torch.stack([cap.embedding, *cap.mlp], 1) @ read
        shared = None
        if convention == "textspan":
            mlps[:, 0] += offset * sigma[:, None]
            scale = 1.0 / sigma
        else:
            # −μ and β shared equally among the 2L + 1 additive blocks, per image.
            blocks = 2 * self.tower.layers + 1
            shared = (sigma[:, None] * offset - z.mean(-1, keepdim=True) * gamma_p) / blocks
            heads = heads + shared[:, None, None] / heads.shape[2]
            class_token = class_token + shared[:, None] / tokens
            mlps = mlps + shared[:, None]
            norm = representation.norm(dim=-1)
            scale = 1.0 / (sigma * norm)
            representation = representation / norm[:, None]
        return Decomposition(
            heads=heads * scale[:, None, None, None],
            mlps=mlps * scale[:, None, None],
            representation=representation,
            class_token=class_token * scale[:, None, None],
            convention=convention,
            _attention=[a for a in cap.attention if a is not None],
            _inputs=[x for x in cap.inputs if x is not None],
            _readouts=readouts if cap.spatial else [],
            _scale=scale,
            _shared=shared,
        )
