"""Where the pieces of a Hugging Face `transformers` CLIP or SigLIP image tower are, for the
decomposition: `CLIPModel`, `CLIPVisionModel(WithProjection)`, `MetaClip2Model` (CLIP's
names) and `SiglipModel`, `SiglipVisionModel`.

The tower is found by its parts (embeddings, `encoder.layers`, `post_layernorm`), so both the
4.x layout (nested under `.vision_model`) and the 5.x one (flattened) work. Each layer's
heads' outputs are read at the input of `out_proj`; the attention rows are taken from the
layer's own output when it returns them (eager attention) and otherwise recomputed from
`layer_norm1`'s output (these models have no RoPE or q/k norms). CLIP pools the class token
(`post_layernorm`, then `visual_projection`); SigLIP's head is an attention pooler over every
token (`post_layernorm` per token, a packed `nn.MultiheadAttention` with a learned probe) whose
MLP is its own term.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .openclip import mha_parts
from .tower import (
    Adapter,
    Capture,
    LayerMaps,
    Pooling,
    attention_pooling,
    exact,
    norm_pooling,
    take,
)

__all__ = [
    "HF_PREFIX",
    "HfTower",
    "is_hf_model",
    "is_transformers_name",
    "load_transformers",
    "text_features",
]


def is_hf_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _tower_of(model: nn.Module) -> nn.Module | None:
    """The module holding embeddings, encoder.layers and post_layernorm."""
    seen = [model]
    inner = getattr(model, "vision_model", None)
    if inner is not None:
        seen += [inner, getattr(inner, "vision_model", None)]
    for m in seen:
        if m is None:
            continue
        encoder = getattr(m, "encoder", None)
        if hasattr(m, "embeddings") and hasattr(m, "post_layernorm") and hasattr(encoder, "layers"):
            return m
    return None


class HfTower(Adapter):
    """A Hugging Face CLIP (class token) or SigLIP (attention pooler) image tower."""

    def __init__(self, model: nn.Module) -> None:
        tower = _tower_of(model)
        name = type(model).__name__

        def refuse(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(f"{name} cannot be decomposed exactly: {what}.")

        if tower is None:
            raise refuse(
                "no image tower with embeddings, encoder.layers and post_layernorm was found "
                "(supported: CLIPModel, CLIPVisionModel(WithProjection), MetaClip2Model, "
                "SiglipModel, SiglipVisionModel)"
            )
        self.siglip = "siglip" in type(tower).__module__.lower()
        layers = list(tower.encoder.layers)
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            parts = ("layer_norm1", "layer_norm2", "mlp")
            if attn is None or not all(hasattr(layer, p) for p in parts):
                raise refuse(f"layer {i} is not a pre-norm attention block")
            if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
                raise refuse(f"layer {i}'s attention has no q/k/v/out projections")
        if self.siglip:
            head = getattr(tower, "head", None)
            if head is None or not isinstance(
                getattr(head, "attention", None), nn.MultiheadAttention
            ):
                raise refuse("its vision tower has no attention-pooling head (vision_use_head)")
            self.head = head
            self.pooling_type = "attention"
            self.read_tokens = slice(0, None)
            self.prefix_tokens = 0
            self.has_class_token = False
            self.extra_terms: tuple[str, ...] = ("pooler MLP",)
        else:
            self.head = None
            self.pooling_type = "token"
            self.read_tokens = slice(0, 1)
            self.prefix_tokens = 1
            self.has_class_token = True
            self.extra_terms = ()
        self.projection_layer = getattr(model, "visual_projection", None)
        self.family = f"Hugging Face {type(tower).__name__}"
        self.model = model
        self.module = tower
        self.blocks = layers
        config = getattr(tower, "config", None) or model.config
        config = getattr(config, "vision_config", config)
        self.config = config

    # shapes ---------------------------------------------------------------------------------

    @property
    def heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def dim(self) -> int:
        if self.projection_layer is not None:
            return int(self.projection_layer.out_features)
        return int(self.config.hidden_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.config.image_size),) * 2

    @property
    def grid_size(self) -> tuple[int, int]:
        return (int(self.config.image_size) // int(self.config.patch_size),) * 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """`get_image_features` (a tensor in 4.x, an output object in 5.x), or the vision
        model's `image_embeds` / `pooler_output`."""
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=images)
        else:
            out = self.model(pixel_values=images)
            embeds = getattr(out, "image_embeds", None)
            out = embeds if embeds is not None else out
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    # hooks ----------------------------------------------------------------------------------

    def attach(self, capture: Any) -> list[Any]:
        handles = []
        read = self.read_tokens
        for i, layer in enumerate(self.blocks):
            attn = layer.self_attn

            def on_input(module, args, output, i=i) -> None:
                if (cap := capture()) is not None:
                    cap.layers[i].inputs = exact(output)

            def on_attention(module, args, output, i=i, attn=attn) -> None:
                if (cap := capture()) is None:
                    return
                layer = cap.layers[i]
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is not None:
                    layer.rows = take(weights, read, axis=2)
                elif layer.inputs is not None:
                    layer.rows = self._rows(attn, layer.inputs)

            def on_heads(module, args, i=i, attn=attn) -> None:
                if (cap := capture()) is not None:
                    o = take(args[0], read)
                    cap.layers[i].o = o.view(*o.shape[:2], self.heads, -1)

            def on_mlp(module, args, output, i=i) -> None:
                if (cap := capture()) is not None:
                    cap.layers[i].mlp = take(output, read)

            handles.append(layer.layer_norm1.register_forward_hook(on_input))
            handles.append(attn.register_forward_hook(on_attention))
            handles.append(attn.out_proj.register_forward_pre_hook(on_heads))
            handles.append(layer.mlp.register_forward_hook(on_mlp))
        if self.head is not None:

            def on_tokens(module, args, output) -> None:
                if (cap := capture()) is not None:
                    cap.pool.tokens = exact(output)

            def on_pool_mlp(module, args, output) -> None:
                if (cap := capture()) is not None:
                    cap.pool.mlp = exact(output[:, 0])

            handles.append(self.module.post_layernorm.register_forward_hook(on_tokens))
            handles.append(self.head.mlp.register_forward_hook(on_pool_mlp))
        return handles

    def _rows(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The attention rows of the read tokens [B, H, T_r, T], from the layer's input."""
        h = self.heads
        b, t, w = x.shape
        read = x[:, self.read_tokens]
        q = exact(attn.q_proj(read.to(attn.q_proj.weight.dtype)))
        q = q.view(b, read.shape[1], h, -1).transpose(1, 2)  # [B, H, T_r, d_h]
        dh = q.shape[-1]
        if read.shape[1] == 1:
            # One query row: q·(W_K x_i + b_K) = (W_Kᵀ q)·x_i + q·b_K, without every key.
            wk = exact(attn.k_proj.weight.detach()).view(h, dh, w)
            logits = torch.einsum("bhje,hew,btw->bhjt", q, wk, x)
            if attn.k_proj.bias is not None:
                bias = exact(attn.k_proj.bias.detach()).view(h, dh)
                logits = logits + torch.einsum("bhje,he->bhj", q, bias)[..., None]
        else:
            k = exact(attn.k_proj(x.to(attn.k_proj.weight.dtype)))
            logits = q @ k.view(b, t, h, dh).permute(0, 2, 3, 1)
        return torch.softmax(logits * dh**-0.5, dim=-1)

    # maps -----------------------------------------------------------------------------------

    def layer_maps(self, layer: int, device: torch.device) -> LayerMaps:
        attn = self.blocks[layer].self_attn
        h = self.heads
        v = attn.v_proj
        w = v.weight.shape[1]
        dh = v.weight.shape[0] // h
        value_bias = (
            torch.zeros(h * dh, device=device, dtype=self.dtype)
            if v.bias is None
            else exact(v.bias)
        )
        out = attn.out_proj
        return LayerMaps(
            value_weight=exact(v.weight.detach()).view(h, dh, w),
            value_bias=value_bias.detach().view(h, dh),
            head_map=exact(out.weight.detach()).T.reshape(h, dh, -1),
            bias_scaled=torch.zeros(w, device=device, dtype=self.dtype),
            bias_fixed=torch.zeros(w, device=device, dtype=self.dtype)
            if out.bias is None
            else exact(out.bias.detach()),
        )

    def pattern(self) -> torch.Tensor | None:
        return torch.ones(1, 1, 1) if self.pooling_type == "token" else None

    def pooling(self, cap: Capture, centre: bool) -> Pooling:
        y = cap.final
        w = y.shape[-1]
        norm = self.module.post_layernorm
        if self.head is None:  # CLIP: the class token, then the projection
            layer = self.projection_layer
            proj = torch.eye(w, device=y.device, dtype=y.dtype)
            bias = torch.zeros(w, device=y.device, dtype=y.dtype)
            if layer is not None:
                proj = exact(layer.weight.detach()).T
                bias = torch.zeros(proj.shape[1], device=y.device, dtype=y.dtype)
                if layer.bias is not None:
                    bias = exact(layer.bias.detach())
            return norm_pooling(y, norm, "token", proj, bias, centre)
        tokens, mlp = cap.pool.needed("tokens", "mlp")
        attn: nn.MultiheadAttention = self.head.attention
        (wq, wk, wv), bias = mha_parts(attn)
        e = wq.shape[1]
        probe = exact(self.head.probe.detach())[0, 0]
        q = torch.einsum("w,gew->ge", probe, wq) + bias[0]
        keys = torch.einsum("btw,gew->bgte", tokens, wk) + bias[1][:, None]
        p = torch.softmax(torch.einsum("ge,bgte->bgt", q, keys) * e**-0.5, dim=-1)
        out_bias = attn.out_proj.bias
        return attention_pooling(
            p,
            y,
            norm,
            wv,
            bias[2],
            exact(attn.out_proj.weight.detach()),
            None if out_bias is None else exact(out_bias.detach()),
            read=torch.eye(w, device=y.device, dtype=y.dtype),  # the head's output is r
            extra=mlp,
        )


# Loading ---------------------------------------------------------------------------------------

HF_PREFIX = "hf:"
_MODEL_TYPES = ("clip", "siglip", "metaclip_2")


def is_transformers_name(name: Any) -> bool:
    """ "hf:<hub id or folder>", or a folder written by `save_pretrained` of a CLIP-like model."""
    text = str(name)
    if text.startswith(HF_PREFIX):
        return True
    config = Path(text) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in _MODEL_TYPES
    except (OSError, ValueError):
        return False


class ImagePreprocess:
    """The model's own image processor as a PIL image → tensor [3, H, W] callable (picklable,
    for loader workers)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class Tokenizer:
    """Texts → the tokenizer's batch (input ids and, where the model uses one, a mask), padded
    as the model was trained: CLIP to the longest text, SigLIP to its fixed length."""

    def __init__(self, tokenizer: Any, fixed_length: bool) -> None:
        self.tokenizer = tokenizer
        self.fixed_length = fixed_length

    def __call__(self, texts: Any) -> Any:
        texts = [texts] if isinstance(texts, str) else list(texts)
        padding = "max_length" if self.fixed_length else True
        return self.tokenizer(texts, padding=padding, truncation=True, return_tensors="pt")


def text_features(model: nn.Module, tokens: Any) -> torch.Tensor:
    """The text embeddings [M, D] of a Hugging Face CLIP/SigLIP model (a tensor in 4.x, an
    output object in 5.x), unnormalised."""
    # CLIP and SigLIP text towers take ids and (CLIP) a mask, not token type ids, which
    # generic tokenizers add and 4.x refuses.
    out = model.get_text_features(**{k: v for k, v in tokens.items() if k != "token_type_ids"})
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_transformers(name: Any, device: str, precision: str) -> tuple[nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) of a Hugging Face CLIP-like model by hub id or folder."""
    from ..errors import MissingFileError

    source = str(name)[len(HF_PREFIX) :] if str(name).startswith(HF_PREFIX) else str(name)
    try:
        import transformers
    except ImportError:
        raise MissingFileError(
            f"{name}: Hugging Face models need `transformers` (pip install 'textspan[hf]')"
        ) from None
    try:
        model = transformers.AutoModel.from_pretrained(source)
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise MissingFileError(
            f"{name}: the Hugging Face model could not be read ({first}). Offline, pass a "
            "folder written by save_pretrained that holds config.json, the weights "
            "(model.safetensors), the tokenizer files and preprocessor_config.json"
        ) from None
    if not hasattr(model, "get_text_features"):
        raise MissingFileError(
            f"{name}: {type(model).__name__} has no text tower (get_text_features); textspan "
            "needs an image–text model such as CLIPModel or SiglipModel"
        )
    dtype = {"fp16": torch.float16, "pure_fp16": torch.float16}.get(precision)
    dtype = dtype or {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}.get(precision)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    fixed = getattr(model.config, "model_type", "") == "siglip"
    return model.eval(), ImagePreprocess(processor), Tokenizer(tokenizer, fixed)
