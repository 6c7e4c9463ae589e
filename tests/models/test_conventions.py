"""convention="paper": every place a convention enters gives the numbers of the paper's own
code, checked against the direct implementations in tests/support/paper.py and
tests/support/published.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from extraction import extract_options
from paper import paper_ablations, paper_segmentation, paper_terms
from published import published_text_span
from test_decompose import images, make_model

import textspan
from textspan import Contributions, Decomposer, InputError, StoreError, ablation
from textspan.cli import main


@pytest.fixture(scope="module")
def b32():
    """A random ViT-B/32 with biases and LayerNorm affines perturbed away from their
    defaults, and a batch of images."""
    return make_model("ViT-B-32", 64), images(64, batch=8)


@pytest.fixture(scope="module")
def toy():
    """The embedded toy CLIP and toy-world images, preprocessed."""
    from textspan.toy import world as tw
    from textspan.toy.model import load_toy, to_tensor

    model, _, _ = load_toy()
    return model, to_tensor(tw.generate(8, seed=3, size=int(model.visual.image_size[0])).images)


@pytest.mark.parametrize("which", ["b32", "toy"])
def test_paper_terms_equal_the_direct_implementation(which, request):
    model, x = request.getfixturevalue(which)
    tokens, mlps, normalised = paper_terms(model, x)
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(x, spatial=True, convention="paper")
    assert parts.convention == "paper"
    np.testing.assert_allclose(parts.representation.numpy(), normalised, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(parts.mlps.numpy(), mlps, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(parts.heads.numpy(), tokens.sum(2), rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(parts.spatial.numpy(), tokens, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(parts.class_token.numpy(), tokens[:, :, 0].sum(2), atol=2e-6)
    d = torch.randn(5, parts.heads.shape[-1], generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(
        parts.token_scores(d).numpy(), tokens.sum((1, 3)) @ d.numpy().T, atol=2e-5
    )
    np.testing.assert_allclose(parts.scores(d).numpy(), tokens @ d.numpy().T, atol=2e-6)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1)
    np.testing.assert_allclose(total.numpy(), normalised, atol=2e-6)


def test_the_conventions_differ_where_the_issue_says(b32):
    """Same weights and images: the heads barely move, the embedding term a lot."""
    model, x = b32
    with Decomposer(model) as decomposer:
        ours = decomposer.decompose(x)
        paper = decomposer.decompose(x, convention="paper")
    norm = ours.representation.norm(dim=-1)

    def cosine(a, b):
        return float(
            torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2)).mean()
        )

    heads = cosine(ours.heads / norm[:, None, None, None], paper.heads)
    embedding = cosine(ours.mlps[:, 0], paper.mlps[:, 0])
    assert heads > embedding
    assert not torch.allclose(ours.mlps[:, 0] / norm[:, None], paper.mlps[:, 0], atol=1e-4)


def test_an_unknown_convention_is_named():
    model = make_model("tiny", 32)
    with Decomposer(model) as decomposer, pytest.raises(InputError, match="'paper'"):
        decomposer.decompose(images(32), convention="Paper")


@pytest.mark.parametrize("which", ["b32", "toy"])
def test_paper_ablation_equals_the_papers_on_its_own_arrays(which):
    """Every condition, including the two whose definition differs (the embedding term)."""
    if which == "b32":
        model, x = make_model("ViT-B-32", 64), images(64, batch=64)
    else:
        from textspan.toy import world as tw
        from textspan.toy.model import load_toy, to_tensor

        model, _, _ = load_toy()
        x = to_tensor(tw.generate(64, seed=4, size=int(model.visual.image_size[0])).images)
    tokens, mlps, _ = paper_terms(model, x)
    with Decomposer(model) as decomposer:
        parts = decomposer.decompose(x, convention="paper")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(mlps.shape[-1], 6)).astype(np.float32)
    # Labels the model gets right about half of the time, so that ablations move accuracy.
    predicted = (parts.representation.numpy() @ w).argmax(-1)
    labels = np.where(rng.random(len(x)) < 0.5, predicted, rng.integers(0, 6, len(x)))
    expected, curve = paper_ablations(tokens.sum(2), mlps, tokens[:, :, 0].sum(2), w, labels)
    source = Contributions.from_decomposition(parts, labels=labels)
    result = ablation(source, w, progress=False)
    assert result.convention == "paper"
    assert "embedding" in result.definitions["MLPs mean-ablated"]
    assert result.conditions == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(result.layers, curve)
    # textspan's convention keeps the embedding term: a different condition.
    with Decomposer(model) as decomposer:
        ours = Contributions.from_decomposition(decomposer.decompose(x), labels=labels)
    assert "kept" in ablation(ours, w, progress=False).definitions["MLPs mean-ablated"]
    with pytest.raises(InputError, match="convention"):
        ablation(source, w, means=ours, progress=False)


def test_a_store_records_its_convention_and_refuses_the_other(tiny, image_folder, tmp_path):
    store = textspan.extract(
        image_folder, tmp_path / "s", **extract_options(tiny, convention="paper")
    )
    assert store.convention == "paper"
    assert textspan.open_store(tmp_path / "s").convention == "paper"
    total = store.heads[:].sum((1, 2)) + store.mlps[:].sum(1)
    np.testing.assert_allclose(np.linalg.norm(total, axis=-1), 1.0, atol=1e-4)  # r / ‖r‖
    with pytest.raises(StoreError, match="convention: 'paper' there, 'textspan' now"):
        textspan.extract(image_folder, tmp_path / "s", **extract_options(tiny))


def _low_rank_head(seed: int, n=400, d=64, r=40):
    """Outputs of numerical rank r + 1 (r directions and a mean) and a pool."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, r)) * np.linspace(3, 0.2, r)) @ rng.normal(size=(r, d))
    x = (x + 0.5 * rng.normal(size=d)).astype(np.float32)
    return x, rng.normal(size=(300, d)).astype(np.float32)


def _prefix(a, b) -> int:
    return next((i for i, (u, v) in enumerate(zip(a, b, strict=False)) if u != v), len(a))


@pytest.mark.parametrize("seed", range(4))
def test_paper_textspan_is_the_published_algorithm_without_a_null_space(seed):
    x, pool = _low_rank_head(seed)
    for rank in (30, 41):  # at most the outputs' rank of 41: no null-space directions
        found = textspan.text_span(
            x, pool, n_texts=30, rank=rank, convention="paper", stability=True
        )
        expected, _, _ = published_text_span(x, pool, 30, rank)
        np.testing.assert_array_equal(found.indices, expected)
        assert found.rank == rank and found.stable == 30
    full = np.random.default_rng(seed).normal(size=(300, 24)).astype(np.float16)
    found = textspan.text_span(full, pool[:, :24], n_texts=15, rank=24, convention="paper")
    np.testing.assert_array_equal(found.indices, published_text_span(full, pool[:, :24], 15, 24)[0])


def test_paper_textspan_past_the_rank_depends_on_rounding_and_says_so():
    x, pool = _low_rank_head(0)
    with pytest.warns(textspan.RoundingWarning, match="rounding noise"):
        paper = textspan.text_span(x, pool, n_texts=30, rank=50, convention="paper", stability=True)
    assert paper.rank == 50 and paper.stable < 30
    assert "(rounding)" in paper.table().splitlines()[paper.stable]
    # The published algorithm itself: the outputs times 1.0000001 change its list.
    a, _, _ = published_text_span(x, pool, 30, 50)
    b, _, _ = published_text_span(x * np.float32(1.0000001), pool, 30, 50)
    assert _prefix(a, b) < 30
    # textspan's convention drops the null space: the same list under any rescaling or
    # reordering of the outputs, equal to the published one at the numerical rank.
    ours = textspan.text_span(x, pool, n_texts=30, rank=50, stability=True)
    assert ours.rank == 41 and ours.stable == 30
    again = textspan.text_span(x[::-1] * np.float32(1.0000001), pool, n_texts=30, rank=50)
    np.testing.assert_array_equal(ours.indices, again.indices)
    np.testing.assert_array_equal(ours.indices, published_text_span(x, pool, 30, 41)[0])
    # Without the stability runs: no `stable`, the same list, and still the warning.
    with pytest.warns(
        textspan.RoundingWarning, match="numerical rank below rank=50 \\(as low as 41\\)"
    ):
        quick = textspan.text_span(x, pool, n_texts=30, rank=50, convention="paper")
    assert quick.stable is None
    np.testing.assert_array_equal(quick.indices, paper.indices)


@pytest.mark.parametrize("which", ["b32", "toy"])
def test_paper_segmentation_equals_the_papers_at_batch_1_and_8(which, request):
    model, x = request.getfixturevalue(which)
    dim = model.visual.output_dim
    w = np.random.default_rng(3).normal(size=(dim, 5)).astype(np.float32)
    batched = textspan.segment(model, x, w, progress=False, convention="paper")
    single = [
        textspan.segment(model, x[i : i + 1], w, progress=False, convention="paper")
        for i in range(len(x))
    ]
    normalised = batched.normalised()
    for i, one in enumerate(single):
        expected, mask = paper_segmentation(model, x[i : i + 1], w)
        # The oracle's terms are float64, ours float32: equal to that rounding.
        np.testing.assert_allclose(normalised[i], expected, atol=5e-5)
        np.testing.assert_allclose(one.normalised()[0], normalised[i], atol=1e-5)
        np.testing.assert_array_equal(one.masks()[0], mask)
        np.testing.assert_array_equal(batched.masks()[i], mask)
    ours = textspan.segment(model, x, w, progress=False)
    assert not np.allclose(ours.heatmaps, batched.heatmaps)


def test_the_papers_upsampling_arithmetic_and_its_degenerate_maps():
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(3, 16, 16))  # as for L/14 at 224: a factor of 14
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(maps[:, None]).float(), scale_factor=14, mode="bilinear"
    )[:, 0]
    expected = torch.clip(expected, 0, None)
    lo, hi = expected.amin((1, 2), keepdim=True), expected.amax((1, 2), keepdim=True)
    expected = ((expected - lo) / (hi - lo)).numpy()
    found = textspan.normalised_heatmaps(maps, (224, 224), convention="paper")
    np.testing.assert_allclose(found, expected, atol=1e-6)
    # A map that is all <= 0, and a constant one: the paper's 0/0 case scores AP = 0.5;
    # textspan scores the zero map they become.
    degenerate = np.stack([-np.abs(maps[0]), np.full((16, 16), 2.0)])
    masks = np.zeros((2, 224, 224), dtype=bool)
    masks[:, 50:150, 30:120] = True
    paper = textspan.segmentation_scores(degenerate, masks, convention="paper")
    ours = textspan.segmentation_scores(degenerate, masks)
    assert paper["map"] == 0.5
    assert ours["map"] != 0.5
    assert paper["pixel_accuracy"] == ours["pixel_accuracy"]  # both all background
    with pytest.raises(InputError, match="multiple"):
        textspan.normalised_heatmaps(maps, (225, 224), convention="paper")


def test_span_on_a_paper_store_marks_the_picks_rounding_decided(tiny, image_folder, tmp_path):
    """The tiny model's heads span 16 of 32 dimensions: rank 32 as published fills the rest
    with rounding noise, and the report says which picks that decided."""

    store = textspan.extract(
        image_folder, tmp_path / "s", **extract_options(tiny, convention="paper")
    )
    out = tmp_path / "span"
    arguments = ["span", str(store.path), "--out", str(out), "--layers", "1", "--texts", "8"]
    assert main([*arguments, "--rank", "32", "--no-replacement", "--device", "cpu"]) == 0
    heads = json.loads((out / "span.json").read_text())["heads"]
    assert {h["convention"] for h in heads} == {"paper"}
    assert all(h["rank"] == 32 for h in heads)
    unstable = [h for h in heads if h["stable"] < len(h["texts"])]
    assert unstable
    markdown = (out / "span.md").read_text()
    assert markdown.count("| *rounding* |") == sum(len(h["texts"]) - h["stable"] for h in heads)
    assert "class=rounding" in (out / "span.html").read_text()
