"""The toy CLIP: its tokenizer and training command, and the paper's claims checked against the
toy world's ground truth on the committed checkpoint (the embedded default model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import textspan
from textspan.cli import main as cli
from textspan.toy import model as toyclip
from textspan.toy import study as toystudy
from textspan.toy import train as toytrain
from textspan.toy import world as tw


def test_tokenizer_ends_every_text_with_the_largest_id_and_names_unknown_words():
    tok = toyclip.WordTokenizer(toyclip.vocabulary(), context_length=12)
    tokens = tok(["a small red circle", "an object"])
    for row, words in zip(tokens, (4, 2), strict=True):
        assert row[0] == 1 and row[words + 1] == tok.vocab_size - 1
        assert (row[words + 2 :] == 0).all() and row.max() == tok.vocab_size - 1
    with pytest.raises(ValueError, match="'dog'"):
        tok(["a red dog"])


def test_every_caption_and_pool_text_is_in_the_vocabulary():
    tok = toyclip.WordTokenizer(toyclip.vocabulary())
    texts, named = toystudy.description_pool()
    world = tw.generate(50, seed=1)
    tok(texts + world.captions + world.full_captions)
    assert len(texts) == len(named) == 19 and {len(n) for n in named} == {1}


def _tiny(**kw) -> toyclip.ToyConfig:
    base = dict(steps=4, images=200, batch_size=16, image_size=24, patch_size=6, layers=2)
    return toyclip.ToyConfig(**(base | kw))


def test_training_writes_a_loadable_model_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    meta = toytrain.train(tmp_path / "a", _tiny(), progress=False, checkpoint_every=2)
    assert set(meta["zero_shot"]) == set(tw.FACTORS) and meta["steps_done"] == 4
    model, preprocess, tok = textspan.load("toy", pretrained=tmp_path / "a", device="cpu")
    assert model.encode_text(tok(["a red object"])).shape == (1, 64)
    from PIL import Image

    image = tw.generate(1, seed=3, size=24).images
    torch.testing.assert_close(
        preprocess(Image.fromarray(image[0]))[None], toyclip.to_tensor(image), atol=1e-5, rtol=0
    )
    reference = torch.load(tmp_path / "a" / "toy.pt")

    calls = {"n": 0}
    step = toytrain._step

    def crash_after_three(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(toytrain, "_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        toytrain.train(tmp_path / "b", _tiny(), progress=False, checkpoint_every=2)
    assert (tmp_path / "b" / "resume.pt").exists() and not (tmp_path / "b" / "toy.pt").exists()
    monkeypatch.setattr(toytrain, "_step", step)
    toytrain.train(tmp_path / "b", _tiny(), progress=False, checkpoint_every=2)
    resumed = torch.load(tmp_path / "b" / "toy.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not (tmp_path / "b" / "resume.pt").exists()


# Ground truth on the committed checkpoint -----------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    model, _, tokenizer = textspan.load("toy", device="cpu")
    world = tw.generate(1500, seed=20_000, size=int(model.visual.image_size[0]))
    contributions = toystudy.decompose(model, world)
    texts, named = toystudy.description_pool()
    embeddings = textspan.encode_texts(model, tokenizer, texts, progress=False)
    spans = toystudy.spans_for(contributions, embeddings, texts)
    return model, tokenizer, world, contributions, spans, named


@pytest.mark.parametrize("name", ["toy", "toy-spurious"])
def test_the_embedded_models_are_the_committed_checkpoints(name):
    model, _, tokenizer = textspan.load(name, device="cpu")
    folder = {"toy": toyclip.TOY_DIR, "toy-spurious": toyclip.SPURIOUS_DIR}[name]
    meta = toyclip.toy_meta(folder)
    assert (folder / "toy.pt").stat().st_size < 20e6
    held_out = tw.generate(1000, seed=meta["train"]["seed"] + 10_000, size=48)
    accuracy = toyclip.zero_shot(model, tokenizer, held_out)
    assert accuracy == pytest.approx(meta["zero_shot"], abs=1e-6)


def test_the_embedded_model_knows_every_factor():
    accuracy = toyclip.toy_meta()["zero_shot"]
    assert set(accuracy) == set(tw.FACTORS) and min(accuracy.values()) >= 0.8, accuracy


def test_the_decomposition_identity_holds_on_the_toy_model(toy):
    model, _, world, contributions, *_ = toy
    with torch.no_grad():
        expected = model.encode_image(toyclip.to_tensor(world.images[:300])).numpy()
    summed = contributions.heads[:300].sum((1, 2)) + contributions.mlps[:300].sum(1)
    np.testing.assert_allclose(summed, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_text_span_finds_heads_specific_to_at_least_three_factors(toy):
    *_, spans, named = toy
    heads = toystudy.head_factors(spans, named)
    specific = [h for h in heads if h.purity >= 0.8]
    assert len(specific) >= 3, [(h.head, h.factor, h.purity) for h in heads]
    assert len({h.factor for h in specific}) >= 3, [(h.head, h.factor) for h in specific]
    assert toystudy.chance_purity(named) < 0.5


def test_segmentation_by_the_decomposition_beats_raw_attention():
    model, _, tokenizer = textspan.load("toy", device="cpu")
    held_out = tw.generate(500, seed=30_000, size=48)
    checks = toystudy.segmentation_check(model, tokenizer, held_out)
    scores = {m: c.scores for m, c in checks.items()}
    ours, baseline = scores["decomposition"], scores["attention"]
    assert ours["miou"] > baseline["miou"] and ours["pixel_accuracy"] > baseline["pixel_accuracy"]


def test_ablating_the_background_heads_repairs_the_model_that_leans_on_the_background():
    check = toystudy.spurious_study()
    res = check.result
    assert check.trained["train"]["spurious_strength"] > toyclip.SPURIOUS.strength
    order = [k for k, _ in check.ranked]
    assert res.heads == order[: len(res.heads)], "the ablated heads are the most background ones"
    assert max(res.before.groups.values()) - res.before.worst >= 0.2, res.table()
    assert res.after.worst - res.before.worst >= 0.10, res.table()
    assert res.after.worst > res.random_best.worst, res.table()


@pytest.mark.parametrize("factor", ["colour", "shape"])
def test_retrieval_by_a_factor_head_finds_images_alike_in_that_factor(toy, factor):
    _, _, world, contributions, spans, named = toy
    heads = [h for h in toystudy.head_factors(spans, named) if h.factor == factor]
    best = max(heads, key=lambda h: h.purity)
    found = toystudy.retrieval_check(contributions, world, best.head, factor, spans[best.head])
    lift = {f: found.by_head[f] / found.chance[f] for f in tw.FACTORS}
    assert lift[factor] > 2 and max(lift, key=lift.get) == factor, lift


def test_the_demo_writes_a_self_contained_report(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path), "--images", "400"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "src='http" not in page
    for name in ("world", "heads", "ablation", "segmentation", "repair", "retrieval"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out


class _RunsCode:
    """A pickle that, when loaded without restriction, creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resume_file_planted_in_the_output_folder_runs_no_code(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "ran"
    torch.save({"config": _RunsCode(str(marker))}, out / "resume.pt")
    with pytest.raises(textspan.InputError, match=r"resume.pt is not a checkpoint toy-train"):
        toytrain.train(out, _tiny(), progress=False, checkpoint_every=2)
    assert not marker.exists()
