"""Every tower family and pooling type: the decomposition identity (float32 and float64), the
token terms, and per-head terms against direct implementations written here.

Small random-weight instances of each tower class, with biases, norm parameters, LayerScale
and pooler probes perturbed away from their defaults so that every shared constant is
exercised. Full-size open_clip models of each family are in the slow tests at the end.
"""

from __future__ import annotations

import csv
import json
import logging

import open_clip
import pytest
import timm
import torch
import transformers
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from textspan import Decomposer, UnsupportedModelError
from textspan.models.tower import token_count

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32, "patch_size": 8}
HF_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
HF_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
HF_TEXT = {**HF_TEXT, "num_attention_heads": 2, "vocab_size": 49408}


def _open_clip_vit(**options) -> torch.nn.Module:
    args = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 4}
    return VisionTransformer(mlp_ratio=2.0, output_dim=24, **{**args, **options})


def _timm(name: str, **options) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=24, **{**SMALL, **options})


def _hf(model: str, config: str, **options) -> torch.nn.Module:
    cls, cfg = getattr(transformers, model), getattr(transformers, config)
    if "vision_config" in options or config.endswith("VisionConfig"):
        return cls(cfg(**options))
    return cls(cfg(vision_config=HF_VISION, text_config=HF_TEXT, **options))


# id → (builder, pooling type, has a pooler MLP term)
TOWERS = {
    "open_clip class token": (lambda: _open_clip_vit(ls_init_value=0.5), "token", False),
    "open_clip average, norm per token": (
        lambda: _open_clip_vit(pool_type="avg"),
        "average",
        False,
    ),
    "open_clip CLIPA": (
        lambda: _open_clip_vit(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
        "average",
        False,
    ),
    "open_clip CoCa attentional pool": (
        lambda: _open_clip_vit(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2),
        "attention",
        False,
    ),
    "timm ViT token, LayerScale, q/k norm": (
        lambda: _timm("vit_base_patch16_clip_224", init_values=0.5, qk_norm=True),
        "token",
        False,
    ),
    "timm ViT average + fc_norm": (
        lambda: _timm("vit_base_patch16_clip_224", global_pool="avg", fc_norm=True),
        "average",
        False,
    ),
    "timm ViT average, norm per token": (
        lambda: _timm("vit_base_patch16_clip_224", global_pool="avg", fc_norm=False),
        "average",
        False,
    ),
    "timm SigLIP map pool": (lambda: _timm("vit_base_patch16_siglip_224"), "attention", True),
    "timm map pool, registers, LayerScale, q/k norm": (
        lambda: _timm(
            "vit_base_patch16_224", reg_tokens=2, init_values=0.5, qk_norm=True, global_pool="map"
        ),
        "attention",
        True,
    ),
    "timm EVA02 (RoPE, sub-LN, SwiGLU)": (
        lambda: _timm("eva02_base_patch14_224", img_size=28, patch_size=14),
        "average",
        False,
    ),
    "timm EVA02-E post-norm blocks": (
        lambda: _timm("eva02_enormous_patch14_clip_224", img_size=28, patch_size=14),
        "token",
        False,
    ),
    "timm EVA01 token": (
        lambda: _timm("eva_giant_patch14_clip_224", img_size=28, patch_size=14),
        "token",
        False,
    ),
    "timm PE-Core (RoPE, map over every token)": (
        lambda: _timm("vit_pe_core_base_patch16_224"),
        "attention",
        True,
    ),
    "open_clip TimmModel, token + linear projection": (
        lambda: TimmModel(
            "test_vit", embed_dim=24, image_size=160, pool="token", proj="linear", proj_bias=True
        ),
        "token",
        False,
    ),
    "open_clip TimmModel, map pool, no projection": (
        lambda: TimmModel("test_vit3", embed_dim=96, image_size=160, pool="map", proj="none"),
        "attention",
        True,
    ),
    "HF CLIPModel": (lambda: _hf("CLIPModel", "CLIPConfig", projection_dim=24), "token", False),
    "HF CLIPVisionModelWithProjection": (
        lambda: _hf(
            "CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=24, **HF_VISION
        ),
        "token",
        False,
    ),
    "HF MetaClip2Model": (
        lambda: _hf("MetaClip2Model", "MetaClip2Config", projection_dim=24),
        "token",
        False,
    ),
    "HF SiglipModel": (lambda: _hf("SiglipModel", "SiglipConfig"), "attention", True),
    "HF SiglipVisionModel": (
        lambda: _hf("SiglipVisionModel", "SiglipVisionConfig", **HF_VISION),
        "attention",
        True,
    ),
}

_PERTURBED = ("bias", "norm", "ln_", "gamma", "ls", "layernorm", "latent", "probe", "query")


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Biases, norm affines, LayerScale and pooler probes moved away from their defaults."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in _PERTURBED):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def build(key: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    try:
        return perturbed(TOWERS[key][0]()).to(dtype)
    finally:
        logging.disable(logging.NOTSET)


def images_for(decomposer: Decomposer, n: int = 3, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, *decomposer.tower.image_size, dtype=dtype)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("key", list(TOWERS))
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_the_parts_sum_to_the_representation(key, dtype, tolerance):
    model = build(key, dtype)
    _, pooling, pooler_mlp = TOWERS[key]
    with Decomposer(model) as decomposer:
        assert decomposer.tower.pooling_type == pooling
        parts = decomposer.decompose(images_for(decomposer, dtype=dtype))
    assert parts.heads.dtype == dtype
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    assert relative(total, parts.representation) < tolerance
    assert len(parts.terms) == parts.mlps.shape[1] == decomposer.tower.layers + 1 + pooler_mlp
    assert (parts.terms[-1] == "pooler MLP") == pooler_mlp
    # The representation is the model's own output, not a re-derivation.
    with torch.no_grad():
        own = decomposer.tower.encode(images_for(decomposer, dtype=dtype))
    torch.testing.assert_close(parts.representation, own.to(dtype))


@pytest.mark.parametrize("key", list(TOWERS))
def test_token_terms_sum_to_the_head_terms(key):
    model = build(key, torch.float64)
    with Decomposer(model) as decomposer:
        x = images_for(decomposer, dtype=torch.float64)
        plain = decomposer.decompose(x)
        parts = decomposer.decompose(x, spatial=True)
        tower = decomposer.tower
    spatial = parts.spatial  # [B, L, T, H, D]
    tokens = token_count(tower)
    assert spatial.shape[2] == tokens
    torch.testing.assert_close(parts.heads, plain.heads)
    torch.testing.assert_close(spatial.sum(2), parts.heads)
    if tower.has_class_token:
        torch.testing.assert_close(spatial[:, :, 0].sum(2), parts.class_token)
    else:
        assert not parts.class_token.any()
    directions = torch.randn(5, parts.heads.shape[-1], dtype=torch.float64)
    scores = parts.scores(directions)
    torch.testing.assert_close(scores, spatial @ directions.T)
    torch.testing.assert_close(parts.token_scores(directions), scores.sum((1, 3)))
    attention = parts.class_attention(-1)
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention[..., 0]))


def test_spatial_decompositions_are_chunked_alike(monkeypatch):
    """Chunks of a batch (the attention maps' memory bound) give the batch's terms."""
    import textspan.models.decompose as decompose

    model = build("timm SigLIP map pool", torch.float64)
    with Decomposer(model) as decomposer:
        x = images_for(decomposer, 5, torch.float64)
        whole = decomposer.decompose(x, spatial=True)
        tower = decomposer.tower
        tokens = token_count(tower)
        monkeypatch.setattr(decompose, "_ATTENTION_FLOATS", 2 * tower.heads * tokens**2)
        chunked = decomposer.decompose(x, spatial=True)
    d = torch.randn(3, whole.heads.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(chunked.scores(d), whole.scores(d))
    torch.testing.assert_close(chunked.spatial, whole.spatial)


def test_the_paper_convention_is_refused_for_other_poolings():
    model = build("timm SigLIP map pool")
    with Decomposer(model) as decomposer, pytest.raises(UnsupportedModelError, match="paper"):
        decomposer.decompose(images_for(decomposer), convention="paper")


# Direct implementations ------------------------------------------------------------------------
# Written from the models' definitions, block by block in float64: each head's term at every
# token, its bias share b_O/H included, then the final norm linearised with the actual σ of
# each token and the pooling applied to that term alone.


def _softmax_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _linear_norm(c: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm without its β, linearised at y: (c − mean c) γ / σ(y), per token."""
    sigma = torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return (c - c.mean(-1, keepdim=True)) * norm.weight / sigma


def timm_head_terms(trunk, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A timm ViT's final stream [B, T, W] and each layer's head terms [B, H, T, W]."""
    h = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))
    layers = []
    for block in trunk.blocks:
        attn = block.attn
        b, t, w = h.shape
        z = block.norm1(h)
        qkv = (z @ attn.qkv.weight.T + attn.qkv.bias).view(b, t, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = _softmax_rows(attn.q_norm(q), attn.k_norm(k))
        o = a @ v  # [B, H, T, d_h]
        out = attn.proj.weight.view(w, attn.num_heads, -1)
        terms = torch.einsum("bhte,whe->bhtw", o, out) + attn.proj.bias / attn.num_heads
        terms = terms * getattr(block.ls1, "gamma", 1.0)
        layers.append(terms)
        h = h + terms.sum(1)
        h = h + block.ls2(block.mlp(block.norm2(h)))
    torch.testing.assert_close(trunk.norm(h), trunk.forward_features(x))  # the oracle's own check
    return h, layers


def timm_pooled(trunk, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A term c [B, H, T, W] through the trunk's linearised pooling and head → [B, H, D]."""
    y = y[:, None]
    if trunk.global_pool == "token":
        pooled = _linear_norm(c[:, :, 0], y[:, :, 0], trunk.norm)
    elif trunk.global_pool == "avg":
        start = trunk.num_prefix_tokens
        pooled = _linear_norm(c[:, :, start:].mean(2), y[:, :, start:].mean(2), trunk.fc_norm)
    else:
        pool = trunk.attn_pool
        start = trunk.num_prefix_tokens
        c, y = c[:, :, start:], y[:, :, start:]
        normed = trunk.norm(y)  # the tokens the pooler reads
        g, e = pool.num_heads, pool.head_dim
        q = (pool.latent[0, 0] @ pool.q.weight.T + pool.q.bias).view(g, e)
        k = (normed @ pool.kv.weight[: g * e].T + pool.kv.bias[: g * e]).view(
            *normed.shape[:3], g, e
        )
        p = torch.softmax(torch.einsum("ge,bxtge->bxgt", q, k) / e**0.5, dim=-1)
        values = _linear_norm(c, y, trunk.norm) @ pool.kv.weight[g * e :].T  # no bias: a constant
        values = values.view(*values.shape[:3], g, e)
        pooled = torch.einsum("bxgt,bxtge->bxge", p, values).flatten(2) @ pool.proj.weight.T
    return trunk.head(pooled) - (0 if trunk.head.bias is None else trunk.head.bias)


@pytest.mark.parametrize(
    "key",
    ["timm ViT token, LayerScale, q/k norm", "timm ViT average + fc_norm", "timm SigLIP map pool"],
)
def test_timm_head_terms_equal_a_direct_implementation(key):
    model = build(key, torch.float64)
    with Decomposer(model) as decomposer:
        x = images_for(decomposer, dtype=torch.float64)
        parts = decomposer.decompose(x)
    with torch.no_grad():
        y, layers = timm_head_terms(model, x)
        expected = torch.stack([timm_pooled(model, y, terms) for terms in layers], 1)
    torch.testing.assert_close(parts.heads, expected, rtol=1e-9, atol=1e-12)


def hf_head_terms(tower, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A Hugging Face CLIP/SigLIP tower's final stream and each layer's head terms."""
    h = tower.embeddings(x)
    if hasattr(tower, "pre_layrnorm"):
        h = tower.pre_layrnorm(h)
    layers = []
    for layer in tower.encoder.layers:
        attn = layer.self_attn
        b, t, w = h.shape
        heads = attn.num_heads
        z = layer.layer_norm1(h)
        q, k, v = (
            (z @ p.weight.T + p.bias).view(b, t, heads, -1).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        o = _softmax_rows(q, k) @ v
        out = attn.out_proj.weight.view(w, heads, -1)
        terms = torch.einsum("bhte,whe->bhtw", o, out) + attn.out_proj.bias / heads
        layers.append(terms)
        h = h + terms.sum(1)
        h = h + layer.mlp(layer.layer_norm2(h))
    return h, layers


def hf_pooled(model, tower, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    y = y[:, None]
    norm = tower.post_layernorm
    if not hasattr(tower, "head"):  # CLIP: the class token, then the projection
        return _linear_norm(c[:, :, 0], y[:, :, 0], norm) @ model.visual_projection.weight.T
    attn = tower.head.attention
    w, g = attn.embed_dim, attn.num_heads
    e = w // g
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, _ = attn.in_proj_bias.chunk(3)
    q = (tower.head.probe[0, 0] @ wq.T + bq).view(g, e)
    k = (norm(y) @ wk.T + bk).view(*y.shape[:3], g, e)
    p = torch.softmax(torch.einsum("ge,bxtge->bxgt", q, k) / e**0.5, dim=-1)
    values = (_linear_norm(c, y, norm) @ wv.T).view(*c.shape[:3], g, e)
    return torch.einsum("bxgt,bxtge->bxge", p, values).flatten(2) @ attn.out_proj.weight.T


@pytest.mark.parametrize("key", ["HF CLIPModel", "HF SiglipModel"])
def test_hugging_face_head_terms_equal_a_direct_implementation(key):
    model = build(key, torch.float64)
    with Decomposer(model) as decomposer:
        x = images_for(decomposer, dtype=torch.float64)
        parts = decomposer.decompose(x)
        tower = decomposer.tower.module
    with torch.no_grad():
        y, layers = hf_head_terms(tower, x)
        expected = torch.stack([hf_pooled(model, tower, y, terms) for terms in layers], 1)
    torch.testing.assert_close(parts.heads, expected, rtol=1e-9, atol=1e-12)


# Refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_model", "message"),
    [
        (lambda: timm.create_model("test_convnext"), "is a ConvNeXt"),
        (lambda: timm.create_model("test_vit_relpos"), "only timm VisionTransformer and Eva"),
        (lambda: _timm("vit_base_patch16_clip_224", global_pool="max"), "global_pool 'max'"),
        (
            lambda: TimmModel("test_vit", embed_dim=24, image_size=160, proj="mlp"),
            "nonlinear head",
        ),
        (lambda: _open_clip_vit(pool_type="none"), "returns every token"),
        (lambda: torch.nn.Linear(3, 3), "not a tower textspan knows"),
    ],
)
def test_towers_that_are_not_sums_of_heads_are_refused_with_the_reason(build_model, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Decomposer(build_model())


# One full-size model of each family (random weights) ---------------------------------------

FULL_SIZE = [
    "ViT-B-32",  # class token
    "ViT-L-14-CLIPA",  # average pooling, norm after the pool
    "coca_ViT-B-32",  # attentional pool
    "ViT-B-16-SigLIP",  # timm map pool
    "ViT-B-16-SigLIP2",
    "EVA02-B-16",  # timm Eva: RoPE, sub-LN
    "PE-Core-B-16",  # timm Eva map pool over every token
    "MobileCLIP-B",  # timm ViT token pool, conv stem
    "ViTamin-S",  # timm ViT, MbConv stem, average + fc_norm
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_models_of_every_family_decompose_exactly(name):
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    try:
        model = perturbed(open_clip.create_model(name, pretrained=None))
    finally:
        logging.disable(logging.NOTSET)
    with Decomposer(model) as decomposer:
        x = images_for(decomposer, 2)
        parts = decomposer.decompose(x)
        tokens = decomposer.decompose(x[:1], spatial=True)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    assert relative(total, parts.representation) < 1e-4
    d = torch.randn(2, parts.heads.shape[-1])
    assert relative(tokens.token_scores(d).sum(1), tokens.heads[:1].sum((1, 2)) @ d.T) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "build_model",
    [
        lambda: transformers.CLIPModel(
            transformers.CLIPConfig(vision_config={"patch_size": 16}, projection_dim=512)
        ),
        lambda: transformers.SiglipModel(transformers.SiglipConfig()),
    ],
    ids=["HF CLIP ViT-B/16", "HF SigLIP base/16"],
)
def test_full_size_hugging_face_models_decompose_exactly(build_model):
    torch.manual_seed(0)
    model = perturbed(build_model())
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(images_for(decomposer, 2))
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    assert relative(total, parts.representation) < 1e-4


# `textspan models` -------------------------------------------------------------------------


def test_models_lists_every_pretrained_tag_with_its_family(tmp_path, capsys):
    from textspan.cli import main

    out = tmp_path / "models.csv"
    assert main(["models", "--csv", str(out)]) == 0
    with open(out) as f:
        rows = {(r["model"], r["tag"]): r for r in csv.DictReader(f)}
    assert set(rows) == set(open_clip.list_pretrained())
    siglip = rows[("ViT-B-16-SigLIP", "webli")]
    assert (siglip["decomposes"], siglip["tower"], siglip["pooling"]) == (
        "True",
        "timm VisionTransformer",
        "attention",
    )
    assert rows[("RN50", "openai")]["decomposes"] == "False"
    assert "ResNet" in rows[("RN50", "openai")]["why_not"]
    assert "ConvNeXt" in rows[("convnext_base", "laion400m_s13b_b51k")]["why_not"]
    refused = [r for r in rows.values() if r["decomposes"] == "False"]
    assert all(r["why_not"] for r in refused)
    exact = len(rows) - len(refused)
    assert f"{exact} of {len(rows)} pretrained tags" in capsys.readouterr().out


def test_models_check_builds_and_checks_the_identity(capsys, tmp_path):
    from textspan.cli import main

    assert main(["models", "--check", "ViT-B-16-SigLIP", "EVA02-B-16"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert lines["ViT-B-16-SigLIP"][1:4] == ["timm", "VisionTransformer", "attention"]
    assert float(lines["EVA02-B-16"][5]) < 1e-4
    # Every name is checked, whatever came before it: an unknown or unsupported one is a
    # failed row, and names that `load` takes (toy, a config .json) are checked too.
    config = tmp_path / "small-vit.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2,
        "width": 64, "patch_size": 8, "head_width": 16}, "text_cfg": {"context_length": 16,
        "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}))  # fmt: skip
    assert main(["models", "--check", "no-such-model", "RN50", "toy", str(config)]) == 1
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:5]}
    assert "cannot be checked" in rows["no-such-model"] and "ResNet" in rows["RN50"]
    assert float(rows["toy"].split()[5]) < 1e-4 and float(rows[str(config)].split()[5]) < 1e-4


# Loading offline ----------------------------------------------------------------------------


def test_what_the_hub_would_supply_is_one_clear_error_offline(tmp_path):
    """A SigLIP tokenizer (open_clip fetches it from the hub) and a Hugging Face model that is
    neither cached nor a folder: one line each, naming what is missing and how to supply it."""
    import subprocess
    import sys

    names = ["ViT-B-16-SigLIP", "hf:someone/no-such-clip", f"hf:{tmp_path}"]
    code = (
        "import textspan\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        textspan.load(name, device='cpu')\n"
        "    except textspan.MissingFileError as e:\n"
        "        print('MISSING', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("MISSING")]
    assert len(lines) == 3, out.stdout + out.stderr
    assert "tokenizer of ViT-B-16-SigLIP" in lines[0] and "timm/ViT-B-16-SigLIP" in lines[0]
    assert "HF_HOME" in lines[0]
    assert "hf:someone/no-such-clip" in lines[1] and "save_pretrained" in lines[1]
    assert "config.json" in lines[2]
