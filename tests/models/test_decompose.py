"""The decomposition identity on randomly initialised open_clip models (any weights will do)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from textspan import Decomposer, UnsupportedModelError

# (config, image size): small images keep the stock configs fast on a CPU.
CONFIGS = [
    ("ViT-B-32", 64),
    ("ViT-B-16", 48),
    ("ViT-B-32-quickgelu", 64),
    ("ViT-S-16", 48),
    ("ViT-M-16-alt", 48),  # LayerScale
]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def make_model(name: str, image_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        model = open_clip.CLIP(**TINY)
    else:
        model = open_clip.create_model(name, force_image_size=image_size)
    model.eval()
    # Random weights with larger biases and LayerNorm affines than the defaults, so that every
    # convention (bias sharing, γ, β, LayerScale) is exercised.
    with torch.no_grad():
        for n, p in model.visual.named_parameters():
            if n.endswith("bias") or "ln" in n or "gamma" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(size: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("name", "size"), [*CONFIGS, ("tiny", 32)])
def test_parts_sum_to_the_representation(name, size):
    model = make_model(name, size)
    x = images(size)
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(x, spatial=True)
    with torch.no_grad():
        expected = model.encode_image(x, normalize=False)
    b, layers = x.shape[0], len(model.visual.transformer.resblocks)
    heads = model.visual.transformer.resblocks[0].attn.num_heads
    assert parts.heads.shape == (b, layers, heads, expected.shape[-1])
    assert parts.mlps.shape == (b, layers + 1, expected.shape[-1])
    torch.testing.assert_close(parts.representation, expected)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    assert relative(total, expected) < 1e-4
    spatial = parts.spatial
    tokens = (size // model.visual.patch_size[0]) ** 2 + 1
    assert spatial.shape == (b, layers, tokens, heads, expected.shape[-1])
    assert relative(spatial.sum(2), parts.heads) < 1e-4
    directions = torch.randn(4, expected.shape[-1])
    torch.testing.assert_close(
        parts.scores(directions), spatial @ directions.T, rtol=1e-4, atol=1e-5
    )


def test_bfloat16_autocast_within_a_looser_tolerance():
    model = make_model("ViT-B-32", 64)
    x = images(64)
    with Decomposer(model) as decomposer, torch.autocast("cpu", dtype=torch.bfloat16):
        parts = decomposer.decompose(x)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    # bfloat16 keeps 8 bits of mantissa: the parts (float32, from bfloat16 activations) sum to
    # the bfloat16 representation within about 1% (0.4% to 0.8% measured on these configs).
    assert relative(total, parts.representation) < 2e-2


def test_hooks_are_removed_on_exit_and_close():
    model = make_model("tiny", 32)
    blocks = list(model.visual.transformer.resblocks)
    modules = [*blocks, *(m for b in blocks for m in (b.ln_1, b.ls_2))]

    def hooked() -> list[torch.nn.Module]:
        return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]

    with Decomposer(model) as decomposer:
        assert all(any(m is h for h in hooked()) for m in modules)
        decomposer.decompose(images(32))
    assert not hooked()
    decomposer = Decomposer(model)
    decomposer.close()
    with pytest.raises(RuntimeError, match="closed"):
        decomposer.decompose(images(32))


def test_a_hook_that_never_fired_is_an_error():
    model = make_model("tiny", 32)
    with Decomposer(model) as decomposer:
        # A forward that skips the last block: its hooks never fire.
        blocks = model.visual.transformer.resblocks
        model.visual.transformer.resblocks = blocks[:-1]
        try:
            with pytest.raises(
                RuntimeError,
                match=r"never fired for the output of transformer\.resblocks\.2, layer 2's",
            ):
                decomposer.decompose(images(32))
        finally:
            model.visual.transformer.resblocks = blocks


def test_non_spatial_decomposition_cannot_score_tokens():
    model = make_model("tiny", 32)
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(images(32))
    with pytest.raises(ValueError, match="spatial=True"):
        parts.scores(torch.randn(2, 32))


@pytest.mark.parametrize(
    ("name", "message"),
    [("RN50", "is a ResNet"), ("convnext_base", "is a ConvNeXt")],
)
def test_unsupported_towers_are_refused_by_name(name, message):
    model = open_clip.create_model(name)
    with pytest.raises(UnsupportedModelError, match=message):
        Decomposer(model)


def test_a_tower_returning_every_token_is_refused():
    cfg = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "pool_type": "none"}}
    with pytest.raises(UnsupportedModelError, match="pool_type 'none' returns every token"):
        Decomposer(open_clip.CLIP(**cfg))


def test_weights_changed_while_attached_are_picked_up():
    model = make_model("tiny", 32)
    x = images(32)
    with Decomposer(model) as decomposer:
        decomposer.decompose(x)  # read-out maps cached here
        with torch.no_grad():
            model.visual.proj.mul_(2.0)
            model.visual.transformer.resblocks[1].attn.out_proj.weight.add_(0.5)
        parts = decomposer.decompose(x)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    assert relative(total, parts.representation) < 1e-4


@pytest.mark.parametrize(("name", "size"), [("ViT-B-32", 64), ("tiny", 32)])
def test_class_token_and_token_scores_agree_with_the_spatial_terms(name, size):
    model = make_model(name, size)
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(images(size), spatial=True)
    spatial = parts.spatial
    assert relative(parts.class_token, spatial[:, :, 0].sum(2)) < 1e-5
    directions = torch.randn(5, spatial.shape[-1], generator=torch.Generator().manual_seed(2))
    expected = parts.scores(directions).sum((1, 3))
    assert relative(parts.token_scores(directions), expected) < 1e-5
    with pytest.raises(ValueError, match=r"directions: expected shape \[K, "):
        parts.token_scores(directions[:, :3])
