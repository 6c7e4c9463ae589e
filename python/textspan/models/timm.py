"""Where the pieces of a timm vision transformer are, for the decomposition: open_clip's
`TimmModel` towers (SigLIP, SigLIP2, SO400M, EVA01/02, PE-Core, MobileCLIP-B/L, ViTamin) or a
bare timm `VisionTransformer` / `Eva`.

The attention runs unfused during the decomposition so that a hook on `attn_drop` sees the
model's own attention probabilities (RoPE and q/k norms included); the heads' outputs are
read at the input of `attn.norm` (EVA02's sub-LN, an Identity elsewhere), the MLP term at the
input of `drop_path2` (after LayerScale or a post-norm). Pooling: class token, average (with
`fc_norm` or a norm per token) or an `AttentionPoolLatent` (map), whose MLP is its own term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    token_count,
)

__all__ = ["TimmTower", "is_timm_tower"]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


def _trunk_of(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the timm trunk, open_clip's TimmModel around it or None)."""
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(visual, "head"):
        return trunk, visual
    return visual, None


def is_timm_tower(model: nn.Module) -> bool:
    trunk, _ = _trunk_of(model)
    return type(trunk).__module__.startswith("timm.")


def _linear(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a Linear, None for an Identity; anything else refused."""
    if isinstance(m, nn.Identity):
        return None
    if isinstance(m, nn.Linear):
        return exact(m.weight.detach()), None if m.bias is None else exact(m.bias.detach())
    raise TypeError(type(m).__name__)


class TimmTower(Adapter):
    """A timm `VisionTransformer` or `Eva` trunk (inside open_clip's `TimmModel` or alone)."""

    def __init__(self, model: nn.Module) -> None:
        from timm.layers import Attention, AttentionPoolLatent, AttentionRope
        from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
        from timm.models.vision_transformer import Block, VisionTransformer

        trunk, wrapper = _trunk_of(model)
        name = type(model).__name__ + (".visual.trunk" if wrapper is not None else "")

        def refuse(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(
                f"{name} ({type(trunk).__name__}) cannot be decomposed exactly: {what}."
            )

        if not isinstance(trunk, (VisionTransformer, Eva)):
            raise refuse("only timm VisionTransformer and Eva trunks are sums of attention heads")
        self.eva = isinstance(trunk, Eva)
        self.family = f"timm {type(trunk).__name__}"
        # The maps after the trunk: its own head, then open_clip's (Dropout + Linear).
        self._heads: list[nn.Module] = [trunk.head]
        if wrapper is not None:
            for key, layer in wrapper.head.named_children():
                if isinstance(layer, nn.Dropout):
                    continue
                if key != "proj" or not isinstance(layer, nn.Linear):
                    raise refuse(
                        f"its projection head has a {type(layer).__name__} ({key}): a nonlinear "
                        "head mixes every term"
                    )
                self._heads.append(layer)
        for m in self._heads:
            if not isinstance(m, (nn.Identity, nn.Linear)):
                raise refuse(f"its head is a {type(m).__name__}, not a linear map")
        self.attn_pool = getattr(trunk, "attn_pool", None)
        prefix = int(getattr(trunk, "num_prefix_tokens", 1))
        include_prefix = bool(getattr(trunk, "pool_include_prefix", False))
        for norm_name in ("norm", "fc_norm"):
            norm = getattr(trunk, norm_name)
            if not isinstance(norm, nn.Identity) and not _is_norm(norm):
                raise refuse(f"its {norm_name} is a {type(norm).__name__}, not a LayerNorm")
        if self.attn_pool is not None:
            if not isinstance(self.attn_pool, AttentionPoolLatent):
                raise refuse(f"its pooler is a {type(self.attn_pool).__name__}")
            pool = self.attn_pool
            if pool.pos_embed is not None:
                raise refuse("its attention pooler adds a position embedding")
            if pool.pool not in ("token", "avg") or (pool.latent_len > 1 and pool.pool != "token"):
                raise refuse(
                    f"its attention pooler returns {pool.latent_len} latents pooled by "
                    f"{pool.pool!r}, not one"
                )
            if not isinstance(trunk.fc_norm, nn.Identity):
                raise refuse("a norm after the attention pooler is unsupported")
            if pool.mlp is not None and not isinstance(pool.norm, (nn.Identity, nn.LayerNorm)):
                raise refuse(f"its pooler's norm is a {type(pool.norm).__name__}")
            self.pooling_type = "attention"
            # timm's ViT drops the prefix tokens before the pooler; Eva pools over all tokens.
            skip = 0 if self.eva or include_prefix else prefix
            self.read_tokens = slice(skip, None)
        elif trunk.global_pool == "token":
            self.pooling_type = "token"
            self.read_tokens = slice(0, 1)
        elif trunk.global_pool == "avg":
            if _is_norm(trunk.norm) and _is_norm(trunk.fc_norm):
                raise refuse("a norm both before and after the average is unsupported")
            self.pooling_type = "average"
            self.read_tokens = slice(0 if include_prefix else prefix, None)
        else:
            raise refuse(f"global_pool {trunk.global_pool!r} is not linear in the tokens")
        if prefix and self.pooling_type == "token" and getattr(trunk, "cls_token", None) is None:
            raise refuse("token pooling without a class token")
        blocks = list(trunk.blocks)
        for i, block in enumerate(blocks):
            if type(block) not in (Block, EvaBlock, EvaBlockPostNorm):
                raise refuse(f"block {i} is a {type(block).__name__}")
            attn = block.attn
            if type(attn) not in (Attention, AttentionRope, EvaAttention):
                raise refuse(f"block {i}'s attention is a {type(attn).__name__}")
            if getattr(attn, "gate", None) is not None:
                raise refuse(f"block {i}'s attention is gated (a per-token nonlinear scale)")
            if not isinstance(attn.norm, nn.Identity) and not _is_norm(attn.norm):
                raise refuse(f"block {i}'s attention norm is a {type(attn.norm).__name__}")
            if isinstance(block, EvaBlockPostNorm) and not _is_norm(block.norm1):
                raise refuse(f"block {i}'s post-norm is a {type(block.norm1).__name__}")
        self.model = model
        self.wrapper = wrapper
        self.module = wrapper if wrapper is not None else trunk
        self.trunk = trunk
        self.blocks = blocks
        self.prefix_tokens = prefix
        self.has_class_token = getattr(trunk, "cls_token", None) is not None
        self.extra_terms = (
            ("pooler MLP",) if self.attn_pool is not None and self.attn_pool.mlp is not None else ()
        )

    # shapes ---------------------------------------------------------------------------------

    @property
    def heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def dim(self) -> int:
        linear = [m for m in self._heads if isinstance(m, nn.Linear)]
        return int(linear[-1].out_features if linear else self.trunk.embed_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.trunk.patch_embed.img_size)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Unfused attention, so `attn_drop` sees the probabilities (the same maths)."""
        fused = [b.attn.fused_attn for b in self.blocks]
        try:
            for b in self.blocks:
                b.attn.fused_attn = False
            yield
        finally:
            for b, f in zip(self.blocks, fused, strict=True):
                b.attn.fused_attn = f

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.wrapper is not None and hasattr(self.model, "encode_image"):
            return self.model.encode_image(images, normalize=False)
        return self.module(images)

    # hooks ----------------------------------------------------------------------------------

    def attach(self, capture: Any) -> list[Any]:
        handles = []
        read = self.read_tokens
        for i, block in enumerate(self.blocks):
            attn = block.attn

            def on_input(module, args, i=i) -> None:
                if (cap := capture()) is not None:
                    cap.layers[i].inputs = exact(args[0])

            def on_probabilities(module, args, output, i=i) -> None:
                if (cap := capture()) is not None:
                    cap.layers[i].rows = take(output, read, axis=2)

            def on_heads(module, args, output, i=i, attn=attn) -> None:
                if (cap := capture()) is None:
                    return
                o = take(args[0], read)  # [B, T_r, H·d_h]
                layer = cap.layers[i]
                layer.o = o.view(*o.shape[:2], attn.num_heads, -1)
                if _is_norm(module):  # sub-LN: its σ per token scales the heads' outputs
                    layer.o_scale = inverse_sigma(o, module)

            def on_post_norm(module, args, output, i=i) -> None:
                if (cap := capture()) is None:
                    return
                layer = cap.layers[i]
                s = inverse_sigma(args[0][:, read], module)
                layer.bias_scale = s
                layer.o_scale = s if layer.o_scale is None else layer.o_scale * s

            def on_mlp(module, args, i=i) -> None:
                if (cap := capture()) is not None:
                    cap.layers[i].mlp = take(args[0], read)

            handles.append(attn.register_forward_pre_hook(on_input))
            handles.append(attn.attn_drop.register_forward_hook(on_probabilities))
            handles.append(attn.norm.register_forward_hook(on_heads))
            if self._post_norm(block):
                handles.append(block.norm1.register_forward_hook(on_post_norm))
            handles.append(block.drop_path2.register_forward_pre_hook(on_mlp))
        if self.attn_pool is not None:

            def on_pool(module, args) -> None:
                if (cap := capture()) is not None:
                    cap.pool.tokens = exact(args[0])

            handles.append(self.attn_pool.register_forward_pre_hook(on_pool))
            if self.attn_pool.mlp is not None:

                def on_pool_mlp(module, args, output) -> None:
                    if (cap := capture()) is not None:
                        cap.pool.mlp = exact(output[:, 0])

                handles.append(self.attn_pool.mlp.register_forward_hook(on_pool_mlp))
        return handles

    @staticmethod
    def _post_norm(block: nn.Module) -> bool:
        from timm.models.eva import EvaBlockPostNorm

        return isinstance(block, EvaBlockPostNorm)

    # maps -----------------------------------------------------------------------------------

    def _values(self, attn: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The value projection: weight [H, d_h, W], bias [H, d_h]."""
        h = attn.num_heads
        qkv = getattr(attn, "qkv", None)
        if qkv is not None:
            n = qkv.weight.shape[0] // 3
            weight = exact(qkv.weight.detach())[2 * n :]
            bias = torch.zeros(n, device=device, dtype=self.dtype)
            if qkv.bias is not None:
                bias = bias + exact(qkv.bias.detach())[2 * n :]
            if getattr(attn, "v_bias", None) is not None:  # Eva's separate q/v biases
                bias = bias + exact(attn.v_bias.detach())
        else:
            weight = exact(attn.v_proj.weight.detach())
            n = weight.shape[0]
            b = attn.v_proj.bias
            bias = (
                torch.zeros(n, device=device, dtype=self.dtype) if b is None else exact(b.detach())
            )
        dh = attn.head_dim if hasattr(attn, "head_dim") else n // h
        weight, bias = weight.view(n // dh, dh, -1), bias.view(n // dh, dh)
        if n // dh != h:  # grouped-query attention: head i reads key/value head i // groups
            weight = weight.repeat_interleave(h // (n // dh), 0)
            bias = bias.repeat_interleave(h // (n // dh), 0)
        return weight, bias

    def layer_maps(self, layer: int, device: torch.device) -> LayerMaps:
        block = self.blocks[layer]
        attn = block.attn
        value_weight, value_bias = self._values(attn, device)
        h, dh, w = value_weight.shape
        out_weight = exact(attn.proj.weight.detach())  # [W, H·d_h]
        out_bias = attn.proj.bias
        heads = out_weight.T  # [H·d_h, W]
        fixed = (
            torch.zeros(w, device=device, dtype=self.dtype)
            if out_bias is None
            else exact(out_bias.detach())
        )
        if _is_norm(attn.norm):  # sub-LN: centred and scaled over the concatenated heads
            gamma, beta = norm_parts(attn.norm, h * dh, device, self.dtype)
            heads = centred(gamma[:, None] * heads)
            fixed = fixed + beta @ out_weight.T
        scaled = torch.zeros(w, device=device, dtype=self.dtype)
        if self._post_norm(block):  # x + norm1(attn(x)): centred, γ, its β unscaled
            gamma, beta = norm_parts(block.norm1, w, device, self.dtype)
            heads = (heads - heads.mean(1, keepdim=True)) * gamma
            scaled = (fixed - fixed.mean()) * gamma
            fixed = beta
        ls = getattr(block, "ls1", None)
        gamma_ls = getattr(ls, "gamma", None)
        if gamma_ls is None:
            gamma_ls = getattr(block, "gamma_1", None)
        if gamma_ls is not None:
            g = exact(gamma_ls.detach())
            heads, scaled, fixed = heads * g, scaled * g, fixed * g
        return LayerMaps(
            value_weight=value_weight,
            value_bias=value_bias,
            head_map=heads.reshape(h, dh, w),
            bias_scaled=scaled,
            bias_fixed=fixed,
        )

    def _head(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The linear maps after the pooling, composed: ([W, D] or None, bias [D] or None)."""
        weight, bias = None, None
        for m in self._heads:
            parts = _linear(m)
            if parts is None:
                continue
            w, b = parts
            weight = w.T if weight is None else weight @ w.T
            bias = None if bias is None else bias @ w.T
            if b is not None:
                bias = b if bias is None else bias + b
        return weight, bias

    def _pooled_map(self, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head [W, D], its bias [D]) with identities and zeros filled in."""
        weight, bias = self._head(device)
        if weight is None:
            weight = torch.eye(width, device=device, dtype=self.dtype)
        if bias is None:
            bias = torch.zeros(weight.shape[1], device=device, dtype=self.dtype)
        return weight, bias

    def pattern(self) -> torch.Tensor | None:
        if self.pooling_type == "token":
            return torch.ones(1, 1, 1)
        if self.pooling_type == "average" and not _is_norm(self.trunk.norm):
            t = token_count(self) - self.read_tokens.start
            return torch.full((1, 1, t), 1.0 / t)
        return None

    def pooling(self, cap: Capture, centre: bool) -> Pooling:
        if self.pooling_type == "attention":
            return self._attention_pooling(cap)
        y = cap.final  # [B, T_r, W]
        head, head_bias = self._pooled_map(y.shape[-1], y.device)
        trunk = self.trunk
        norm = next((n for n in (trunk.norm, trunk.fc_norm) if _is_norm(n)), None)
        if self.pooling_type == "token":
            reads = "token"
        else:
            reads = "mean-then-norm" if norm is trunk.fc_norm else "norm-then-mean"
        return norm_pooling(y, norm, reads, head, head_bias, centre)

    def _attention_pooling(self, cap: Capture) -> Pooling:
        """`AttentionPoolLatent`: the trunk's norm per token, the latent query's attention,
        the value and output maps, then the head; the pooler's MLP is its own term."""
        pool = self.attn_pool
        (tokens,) = cap.pool.needed("tokens")  # [B, T_r, W]: the normed tokens it reads
        b, t, w = tokens.shape
        g, e = pool.num_heads, pool.head_dim
        kv = exact(pool.kv.weight.detach())  # [2·G·E, W]
        kv_bias = pool.kv.bias
        kv_bias = (
            torch.zeros(kv.shape[0], device=kv.device, dtype=self.dtype)
            if kv_bias is None
            else exact(kv_bias.detach())
        )
        query = exact(pool.q(pool.latent[:, :1])).view(g, e)
        query = pool.q_norm(query.view(1, g, 1, e)).view(g, e)
        keys = (tokens @ kv[: g * e].T + kv_bias[: g * e]).view(b, t, g, e)
        keys = pool.k_norm(keys.transpose(1, 2))  # [B, G, T, E]
        p = torch.softmax(torch.einsum("ge,bgte->bgt", query, keys) * pool.scale, dim=-1)
        head, head_bias = self._pooled_map(pool.proj.weight.shape[0], kv.device)
        extra = None
        if pool.mlp is not None:
            (mlp,) = cap.pool.needed("mlp")
            extra = mlp @ head
        out_bias = pool.proj.bias
        return attention_pooling(
            p,
            cap.final,
            self.trunk.norm if _is_norm(self.trunk.norm) else None,
            kv[g * e :].view(g, e, w),
            kv_bias[g * e :].view(g, e),
            exact(pool.proj.weight.detach()),
            None if out_bias is None else exact(out_bias.detach()),
            read=head,
            after=head_bias,
            extra=extra,
        )
