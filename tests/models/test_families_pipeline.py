"""The whole pipeline on the new tower families, random weights: `extract` → `span` → `ablate`
→ `repair` → `retrieve`, and `segment`, as a user runs them — an open_clip config with a timm
tower pooled by a SigLIP-style attention pooler, a Hugging Face CLIP folder written by
`save_pretrained` (loaded as `hf:FOLDER`) and, in the slow tests, an EVA02 timm tower — and
the store, statistics and TextSpan results equal to those computed from the decomposition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import textspan
from textspan.cli import main

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TIMM_MAP = {
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "test_vit3",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "linear",
        "image_size": 160,
    },
    "text_cfg": TEXT_CFG,
}
EVA02 = {
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "eva02_tiny_patch14_224",
        "timm_model_pretrained": False,
        "timm_pool": "token",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": TEXT_CFG,
}
WORDS = "a photo of the red green blue circle square triangle cat dog fish big small".split()


def write_hf_clip(folder) -> None:
    """A tiny Hugging Face CLIP with a word-level tokenizer and CLIP's image processor, as
    `save_pretrained` writes them (what a user passes offline)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    fast.model_max_length = 16
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
    vision |= {"num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": len(vocab), "max_position_embeddings": 16}
    text |= {"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 2}
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    size = {"shortest_edge": 32}
    transformers.CLIPImageProcessor(
        size=size, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)


@pytest.fixture(scope="module", params=["timm map pool", "hf CLIP"])
def family(request, tmp_path_factory):
    """(model argument, its pooling type) of one family."""
    folder = tmp_path_factory.mktemp("family")
    if request.param == "hf CLIP":
        write_hf_clip(folder / "clip")
        return f"hf:{folder / 'clip'}", "token"
    config = folder / "textspan-test-timm-map.json"
    config.write_text(json.dumps(TIMM_MAP))
    return str(config), "attention"


@pytest.fixture(scope="module")
def store(family, image_folder, tmp_path_factory):
    model, _ = family
    out = tmp_path_factory.mktemp("store") / "store"
    argv = ["extract", str(image_folder), str(out), "--model", model, "--batch-size", "8"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--dtype", "float32"]) == 0
    return textspan.open_store(out, verify=True)


def test_the_store_holds_the_decomposition_and_its_statistics(family, store, image_folder):
    model_name, pooling = family
    model, preprocess, _ = textspan.load(model_name, device="cpu")
    batch = torch.stack([preprocess(Image.open(image_folder / f)) for f in store.files])
    with textspan.Decomposer(model) as d:
        parts = d.decompose(batch)
        assert d.tower.pooling_type == pooling
        assert store.terms == list(d.terms)
    for name in ("heads", "mlps", "class_token", "representation"):
        expected = getattr(parts, name).numpy()
        np.testing.assert_allclose(getattr(store, name), expected, rtol=1e-5, atol=1e-6)
    stats = textspan.HeadStats.from_outputs(parts.heads.numpy().astype(np.float64))
    np.testing.assert_allclose(store.stats.covariance, stats.covariance, rtol=1e-6, atol=1e-9)
    # TextSpan from the store's statistics picks what it picks from the outputs themselves.
    pool = np.random.default_rng(0).standard_normal((40, store.heads.shape[-1]))
    layer = store.heads.shape[1] - 1
    heads = [store.stats[layer, 0], store.stats[layer, 1]]
    from_store = textspan.text_span_heads(heads, pool, n_texts=4, rank=8, progress=False)
    for head, result in zip((0, 1), from_store, strict=True):
        direct = textspan.text_span(parts.heads[:, layer, head].numpy(), pool, n_texts=4, rank=8)
        assert result.indices.tolist() == direct.indices.tolist()


# Random weights: repair's chosen heads may have no keyword among their texts, and it says so.
@pytest.mark.filterwarnings("ignore:.*scored 0:textspan.errors.AnalysisWarning")
def test_every_command_runs_on_the_family(family, store, image_folder, tmp_path, capsys):
    model, _ = family
    common = ["--templates", "simple", "--device", "cpu"]
    layers = str(store.heads.shape[1])
    span = ["span", str(store.path), "--out", str(tmp_path / "span"), "--layers", "1"]
    assert main([*span, "--texts", "3", "--max-texts", "4", "--rank", "8", *common]) == 0
    assert json.loads((tmp_path / "span" / "span.json").read_text())
    ablate = ["ablate", str(store.path), "--out", str(tmp_path / "ablation"), *common]
    assert main(ablate) == 0
    curve = (tmp_path / "ablation" / "ablation_layers.csv").read_text().splitlines()
    assert len(curve) == int(layers) + 2  # header, k = 0..L
    attribute = tmp_path / "attribute.txt"
    attribute.write_text("\n".join(str(i % 2) for i in range(len(store))))
    repair = ["repair", str(store.path), "--out", str(tmp_path / "repair")]
    repair += ["--attribute", str(attribute), "--keywords", "red,blue", "--top", "2"]
    assert main([*repair, "--layers", "1", "--draws", "2", *common]) == 0
    retrieve = ["retrieve", str(store.path), "--out", str(tmp_path / "retrieval")]
    assert main([*retrieve, "--head", f"{int(layers) - 1}.1", "--image", "0", "--k", "3"]) == 0
    assert len(json.loads((tmp_path / "retrieval" / "retrieval.json").read_text())["results"])
    segment = ["segment", str(image_folder), "--out", str(tmp_path / "seg"), "--model", model]
    assert main([*segment, "--overlays", "2", *common]) == 0
    heatmaps = np.load(tmp_path / "seg" / "heatmaps.npy")
    tower = textspan.Decomposer(textspan.load(model, device="cpu")[0]).tower
    assert heatmaps.shape == (len(store), *tower.grid_size)
    assert np.isfinite(heatmaps).all()


@pytest.mark.slow
def test_the_pipeline_runs_on_an_eva02_tower(image_folder, tmp_path):
    config = tmp_path / "textspan-test-eva02.json"
    config.write_text(json.dumps(EVA02))
    out = tmp_path / "store"
    argv = ["extract", str(image_folder), str(out), "--model", str(config), "--batch-size", "10"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--dtype", "float32"]) == 0
    store = textspan.open_store(out, verify=True)
    total = np.asarray(store.heads).sum((1, 2)) + np.asarray(store.mlps).sum(1)
    np.testing.assert_allclose(total, store.representation, rtol=1e-4, atol=1e-5)
    common = ["--templates", "simple", "--device", "cpu"]
    assert main(["ablate", str(out), "--out", str(tmp_path / "ablation"), *common]) == 0
    span = ["span", str(out), "--out", str(tmp_path / "span"), "--layers", "1", "--texts", "2"]
    assert main([*span, "--max-texts", "4", "--rank", "8", *common]) == 0
    seg = ["segment", str(image_folder), "--out", str(tmp_path / "seg"), "--model", str(config)]
    assert main([*seg, "--overlays", "0", *common]) == 0
