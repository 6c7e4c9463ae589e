"""Where the pieces of an open_clip `VisionTransformer` are, for the decomposition.

Class-token pooling (OpenAI, LAION, DFN, MetaCLIP …), average pooling (CLIPA: the final norm
after the mean, or one per token before it) and CoCa's attentional pooler. Each block's
attention is a packed `nn.MultiheadAttention` that runs as one fused function, so its rows
are recomputed from the block's LayerNorm output — only the rows of the tokens the pooling
reads. The maths is in `decompose.py`, shared by every family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .tower import (
    Adapter,
    Capture,
    LayerMaps,
    Pooling,
    attention_pooling,
    centred,
    exact,
    inverse_sigma,
    norm_parts,
    norm_pooling,
    take,
)

__all__ = ["OpenClipTower", "mha_parts"]


def _refusal(model: nn.Module, visual: nn.Module) -> Any:
    name = type(model).__name__ if visual is model else f"{type(model).__name__}.visual"

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{name} ({type(visual).__name__}) cannot be decomposed exactly: {what}."
        )

    return refuse


def mha_parts(attn: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key and value weights [3, H, d_h, W_in] — or a list when the widths differ —,
    biases [3, H, d_h]) of an `nn.MultiheadAttention`, float32, detached."""
    e, h = attn.embed_dim, attn.num_heads
    dh = e // h
    if attn._qkv_same_embed_dim:
        weights = [w.view(h, dh, -1) for w in exact(attn.in_proj_weight.detach()).chunk(3)]
    else:
        weights = [
            exact(w.detach()).view(h, dh, -1)
            for w in (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
        ]
    bias = attn.in_proj_bias
    device = weights[0].device
    biases = (
        torch.zeros(3, h, dh, device=device, dtype=weights[0].dtype)
        if bias is None
        else exact(bias.detach()).view(3, h, dh)
    )
    return weights, biases


def is_open_clip_tower(model: nn.Module) -> bool:
    """An open_clip VisionTransformer, or a CLIP holding one as `visual`."""
    from open_clip.transformer import VisionTransformer

    return isinstance(getattr(model, "visual", model), VisionTransformer)


class OpenClipTower(Adapter):
    """An open_clip `VisionTransformer` with standard residual attention blocks (a packed
    `nn.MultiheadAttention`, optional LayerScale) and class-token, average or attentional
    pooling."""

    family = "open_clip VisionTransformer"
    prefix_tokens = 1
    has_class_token = True
    extra_terms: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", model)
        refuse = _refusal(model, visual)
        if not isinstance(visual, VisionTransformer):
            raise refuse("it is not an open_clip VisionTransformer")
        if not getattr(visual.transformer, "batch_first", True):
            raise refuse("its transformer is sequence-first (open_clip < 2.24): upgrade open_clip")
        self.attn_pool = getattr(visual, "attn_pool", None)
        pool_type = getattr(visual, "pool_type", "tok")
        if self.attn_pool is not None:
            if getattr(visual, "attn_pool_contrastive", None) is not None:
                raise refuse("the two-pooler (contrastive attentional pool) setup is unsupported")
            if pool_type != "tok":
                raise refuse(f"attentional pooling with pool_type {pool_type!r}")
            self.pooling_type = "attention"
            self.read_tokens = slice(0, None)
        elif pool_type == "tok":
            self.pooling_type = "token"
            self.read_tokens = slice(0, 1)
        elif pool_type == "avg":
            self.pooling_type = "average"
            self.read_tokens = slice(1, None)
        else:
            raise refuse(f"pool_type {pool_type!r} returns every token, not one representation")
        self.after_pool = bool(getattr(visual, "final_ln_after_pool", False))
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
        for norm in (visual.ln_post, *(b.ln_1 for b in visual.transformer.resblocks)):
            if not isinstance(norm, nn.LayerNorm):
                raise refuse(f"a norm is a {type(norm).__name__}, not a LayerNorm")
        self.model = model
        self.module = visual
        self.blocks = list(visual.transformer.resblocks)

    # shapes ---------------------------------------------------------------------------------

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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The representation the parts add up to (before normalisation)."""
        if hasattr(self.model, "encode_image"):
            return self.model.encode_image(images, normalize=False)
        out = self.module(images)
        return out[0] if isinstance(out, tuple) else out  # CoCa's tower: (pooled, tokens)

    # hooks ----------------------------------------------------------------------------------

    def attach(self, capture: Any) -> list[Any]:
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.ln_1.register_forward_hook(self._attention_hook(i, capture)))
            handles.append(block.ls_2.register_forward_hook(self._mlp_hook(i, capture)))
        if self.attn_pool is not None:

            def on_keys(module, args, output) -> None:
                if (cap := capture()) is not None:
                    cap.pool.tokens = exact(output)

            def on_post(module, args) -> None:
                if (cap := capture()) is not None:
                    cap.pool.post = exact(args[0][:, 0])

            handles.append(self.attn_pool.ln_k.register_forward_hook(on_keys))
            handles.append(self.module.ln_post.register_forward_pre_hook(on_post))
        return handles

    def _mlp_hook(self, i: int, capture: Any):
        def hook(module, args, output) -> None:
            if (cap := capture()) is not None:
                cap.layers[i].mlp = take(output, self.read_tokens)

        return hook

    def _attention_hook(self, i: int, capture: Any):
        def hook(module, args, output) -> None:
            cap = capture()
            if cap is None:
                return
            x = exact(output)  # [B, T, W], the attention's input
            weights, bias = mha_parts(self.blocks[i].attn)
            wq, wk, wv = weights
            dh = wq.shape[1]
            read = x[:, self.read_tokens]
            q = torch.einsum("bjw,hew->bhje", read, wq) + bias[0][:, None]
            if read.shape[1] == 1:
                # One query row: q·(W_K x_i + b_K) = (W_Kᵀ q)·x_i + q·b_K, and the weighted
                # value is W_V (Σ_i a_i x_i) + b_V since the row sums to one. O(B·H·T·W).
                keyed = torch.einsum("bhje,hew->bhjw", q, wk)
                logits = torch.einsum("bhjw,btw->bhjt", keyed, x)
                logits = logits + (q * bias[1][:, None]).sum(-1)[..., None]
                rows = torch.softmax(logits * dh**-0.5, dim=-1)  # [B, H, 1, T]
                pooled = torch.einsum("bhjt,btw->bjhw", rows, x)
                o = torch.einsum("bjhw,hew->bjhe", pooled, wv) + bias[2]
            else:
                k = torch.einsum("btw,hew->bhte", x, wk) + bias[1][:, None]
                v = torch.einsum("btw,hew->bhte", x, wv) + bias[2][:, None]
                rows = torch.softmax(torch.einsum("bhje,bhte->bhjt", q, k) * dh**-0.5, dim=-1)
                o = torch.einsum("bhjt,bhte->bjhe", rows, v)
            layer = cap.layers[i]
            layer.rows, layer.o, layer.inputs = rows, o, x

        return hook

    # maps -----------------------------------------------------------------------------------

    def layer_maps(self, layer: int, device: torch.device) -> LayerMaps:
        block = self.blocks[layer]
        attn: nn.MultiheadAttention = block.attn
        weights, bias = mha_parts(attn)
        h, dh = weights[0].shape[:2]
        w = attn.embed_dim
        gamma = getattr(block.ls_1, "gamma", None)
        scale = (
            torch.ones(w, device=device, dtype=self.dtype)
            if gamma is None
            else exact(gamma.detach())
        )
        out_weight = exact(attn.out_proj.weight.detach())  # [W, H·d_h]
        out_bias = attn.out_proj.bias
        return LayerMaps(
            value_weight=weights[2],
            value_bias=bias[2],
            head_map=(out_weight.T * scale).view(h, dh, w),
            bias_scaled=torch.zeros(w, device=device, dtype=self.dtype),
            bias_fixed=torch.zeros(w, device=device, dtype=self.dtype)
            if out_bias is None
            else exact(out_bias.detach()) * scale,
        )

    def _projection(self, device: torch.device) -> torch.Tensor:
        proj = self.module.proj
        width = self.module.ln_post.normalized_shape[0]
        return (
            torch.eye(width, device=device, dtype=self.dtype)
            if proj is None
            else exact(proj.detach())
        )

    def pattern(self) -> torch.Tensor | None:
        if self.pooling_type == "token":
            return torch.ones(1, 1, 1)
        if self.pooling_type == "average" and self.after_pool:
            t = self.grid_size[0] * self.grid_size[1]
            return torch.full((1, 1, t), 1.0 / t)
        return None

    def pooling(self, cap: Capture, centre: bool) -> Pooling:
        y = cap.final  # [B, T_r, W]
        proj = self._projection(y.device)
        if self.pooling_type == "attention":
            return self._attention_pooling(cap, proj)
        if self.pooling_type == "token":
            reads = "token"
        else:
            reads = "mean-then-norm" if self.after_pool else "norm-then-mean"
        no_bias = torch.zeros(proj.shape[1], device=y.device, dtype=y.dtype)
        return norm_pooling(y, self.module.ln_post, reads, proj, no_bias, centre)

    def _attention_pooling(self, cap: Capture, proj: torch.Tensor) -> Pooling:
        """CoCa: `ln_k` per token, query 0 of the pooler, its output map, `ln_post` on that
        query's output (the representation reads query 0 only)."""
        pool = self.attn_pool
        tokens, before_post = cap.pool.needed("tokens", "post")
        attn: nn.MultiheadAttention = pool.attn
        (wq, wk, wv), bias = mha_parts(attn)
        e = wq.shape[1]
        query = exact(pool.ln_q(pool.query[:1]))[0]  # [W_q]
        q = torch.einsum("w,gew->ge", query, wq) + bias[0]
        k = torch.einsum("btw,gew->bgte", tokens, wk) + bias[1][:, None]
        p = torch.softmax(torch.einsum("ge,bgte->bgt", q, k) * e**-0.5, dim=-1)
        post = self.module.ln_post
        gamma, beta = norm_parts(post, proj.shape[0], proj.device, self.dtype)
        out_bias = attn.out_proj.bias
        return attention_pooling(
            p,
            cap.final,
            pool.ln_k,
            wv,
            bias[2],
            exact(attn.out_proj.weight.detach()),
            None if out_bias is None else exact(out_bias.detach()),
            read=centred(gamma[:, None] * proj),  # ln_post on the pooler's output, then proj
            after=beta @ proj,
            image_scale=inverse_sigma(before_post, post),
        )
