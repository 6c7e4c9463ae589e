"""The experiments' analyses against direct computations written out here."""

from __future__ import annotations

import numpy as np
import pytest

import textspan
from textspan import Contributions, SpanResult, text_span_heads

N, L, H, D, C = 240, 4, 3, 16, 5


def world(seed: int = 0, n: int = N) -> tuple[Contributions, np.ndarray]:
    """Random contributions in which the later layers carry the class, and a classifier."""
    rng = np.random.default_rng(seed)
    classifier = rng.standard_normal((D, C))
    labels = rng.integers(0, C, n)
    signal = classifier[:, labels].T  # [n, D]
    heads = rng.standard_normal((n, L, H, D)) * 0.8
    heads[:, 2:] += 0.6 * signal[:, None, None] * rng.uniform(0.2, 1.0, (1, 2, H, 1))
    mlps = rng.standard_normal((n, L + 1, D)) * 0.5 + 0.3 * signal[:, None]
    class_token = 0.3 * heads.sum(2) + rng.standard_normal((n, L, D)) * 0.2
    return Contributions(heads, mlps, class_token, labels), classifier.astype(np.float32)


def accuracy(rep: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
    return float(((rep @ classifier).argmax(-1) == labels).mean())


def test_ablation_equals_the_representations_written_out():
    src, w = world()
    result = textspan.ablation(src, w, progress=False)
    rep = src.heads.sum((1, 2)) + src.mlps.sum(1)
    mlp_ablated = rep - src.mlps[:, 1:].sum(1) + src.mlps[:, 1:].mean(0).sum(0)
    cls_ablated = rep - src.class_token.sum(1) + src.class_token.mean(0).sum(0)
    both = mlp_ablated - src.class_token.sum(1) + src.class_token.mean(0).sum(0)
    expected = [accuracy(r, w, src.labels) for r in (rep, mlp_ablated, cls_ablated, both)]
    assert list(result.conditions.values()) == pytest.approx(expected, abs=1e-12)
    attn = src.heads.sum(2)
    for k in range(L + 1):
        ablated = attn[:, :k].mean(0).sum(0) + attn[:, k:].sum(1) + src.mlps.sum(1)
        assert result.layers[k] == pytest.approx(accuracy(ablated, w, src.labels), abs=1e-12)
    assert 0.3 < result.conditions["baseline"] < 1.0  # the world is neither trivial nor noise


def test_ablation_means_from_another_set():
    src, w = world(0)
    other, _ = world(1, n=100)
    result = textspan.ablation(src, w, means=other, progress=False)
    mlp_ablated = src.heads.sum((1, 2)) + src.mlps[:, 0] + other.mlps[:, 1:].mean(0).sum(0)
    assert result.conditions["MLPs mean-ablated"] == pytest.approx(
        accuracy(mlp_ablated, w, src.labels), abs=1e-12
    )


def spans_for(src: Contributions, layers: list[int], n_texts: int = 8, seed: int = 3):
    pool = np.random.default_rng(seed).standard_normal((60, D))
    keys = [(layer, h) for layer in layers for h in range(H)]
    texts = [f"text {i}" for i in range(60)]
    found = text_span_heads(
        [src.heads[:, k[0], k[1]] for k in keys],
        pool,
        n_texts=n_texts,
        rank=D,
        texts=texts,
        progress=False,
    )
    return dict(zip(keys, found, strict=True))


def test_replacement_equals_reconstructing_each_head():
    src, w = world()
    spans = spans_for(src, [2, 3])
    result = textspan.replacement(src, w, spans, progress=False)
    assert list(result.n_texts) == list(range(9))
    rep = src.heads.sum((1, 2)) + src.mlps.sum(1)
    assert result.baseline == pytest.approx(accuracy(rep, w, src.labels), abs=1e-12)
    for n in (0, 1, 4, 8):
        parts = src.heads[:, :2].sum(2).mean(0).sum(0) + src.mlps.sum(1)
        for (layer, head), span in spans.items():
            parts = parts + span.reconstruct(src.heads[:, layer, head], n_texts=n)
        assert result.accuracy[n] == pytest.approx(accuracy(parts, w, src.labels), abs=1e-12), n
    with pytest.raises(ValueError, match=r"max_texts: expected 1..8"):
        textspan.replacement(src, w, spans, max_texts=9, progress=False)


def test_repair_ablates_the_chosen_heads_and_draws_random_ones():
    src, w = world()
    rng = np.random.default_rng(9)
    attribute = rng.integers(0, 2, N)
    chosen = [(3, 0), (2, 2)]
    result = textspan.repair(src, w, attribute, chosen, random_draws=4, progress=False)
    means = src.heads.mean(0)

    def groups(rep):
        correct = (rep @ w).argmax(-1) == src.labels
        accs = {}
        for y in range(C):
            for a in range(2):
                members = (src.labels == y) & (attribute == a)
                if members.any():
                    accs[(y, a)] = correct[members].mean()
        return accs, min(accs.values()), correct.mean()

    rep = src.heads.sum((1, 2)) + src.mlps.sum(1)

    def ablated(heads):
        return rep - sum(src.heads[:, a, b] - means[a, b] for a, b in heads)

    for got, r in [(result.before, rep), (result.after, ablated(chosen))]:
        accs, worst, average = groups(r)
        assert got.groups == pytest.approx(accs) and got.worst == pytest.approx(worst)
        assert got.average == pytest.approx(average)
    assert len(result.random_draws) == 4
    for heads, g in result.random_draws:
        assert len(heads) == 2 and all(layer in (2, 3) for layer, _ in heads)
        assert g.worst == pytest.approx(groups(ablated(heads))[1])
    assert result.random_best.worst == max(g.worst for _, g in result.random_draws)
    assert "worst-group" in result.table()


def span(texts, variance):
    v = np.asarray(variance, dtype=float)
    return SpanResult(
        np.arange(len(texts)), v, float(v.sum()), np.eye(len(texts), D), np.zeros(D), D, list(texts)
    )


def test_heads_ranked_by_keywords_weight_texts_by_variance():
    spans = {
        (0, 0): span(["a blue sky", "water at dawn", "a red car"], [3, 1, 1]),
        (0, 1): span(["a red car", "a bluebird", "a dog"], [1, 1, 1]),
        (1, 0): span(["WATER", "a lake of water", "a cat"], [1, 1, 2]),
    }
    ranked = textspan.rank_heads(spans, keywords=["blue", "water"])
    assert [k for k, _ in ranked] == [(0, 0), (1, 0), (0, 1)]
    assert [s for _, s in ranked] == pytest.approx([0.8, 0.5, 0.0])  # "bluebird" is no match
    pool = np.eye(3, D)
    # Every head chose pool rows 0, 1, 2; only row 0 is like the example.
    by_example = textspan.rank_heads(spans, examples=np.eye(1, D), pool=pool)
    assert [k for k, _ in by_example] == [(0, 0), (0, 1), (1, 0)]
    assert [s for _, s in by_example] == pytest.approx([0.6, 1 / 3, 0.25])
    with pytest.raises(ValueError, match="keywords or example embeddings"):
        textspan.rank_heads(spans)


def test_retrieval_by_heads_equals_brute_force():
    src, _ = world()
    chosen = [(3, 1), (2, 0)]
    combined = src.heads[:, 3, 1] + src.heads[:, 2, 0]
    centred = combined - combined.mean(0)
    found = textspan.retrieve(src, chosen, 7, k=5, progress=False)
    cos = centred @ centred[7] / (np.linalg.norm(centred, axis=1) * np.linalg.norm(centred[7]))
    cos[7] = -np.inf
    np.testing.assert_array_equal(found.indices, np.argsort(-cos, kind="stable")[:5])
    np.testing.assert_allclose(found.scores, cos[found.indices], rtol=1e-5)
    text = np.random.default_rng(1).standard_normal(D)
    basis = np.linalg.qr(np.random.default_rng(2).standard_normal((D, 3)))[0].T
    found = textspan.retrieve(src, chosen, text, k=4, basis=basis, progress=False)
    scores = (centred @ basis.T) @ (basis @ text)
    np.testing.assert_array_equal(found.indices, np.argsort(-scores, kind="stable")[:4])


def test_bad_input_is_named_before_any_work():
    src, w = world()
    unlabeled = Contributions(src.heads, src.mlps, src.class_token, np.full(N, -1))
    with pytest.raises(ValueError, match=r"labels: accuracy needs a class in 0..4.*got -1"):
        textspan.ablation(unlabeled, w, progress=False)
    with pytest.raises(ValueError, match=r"labels: accuracy needs a class label per image"):
        textspan.ablation(Contributions(src.heads, src.mlps), w, progress=False)
    with pytest.raises(
        ValueError, match=r"mlps: expected shape \[240, 5 \(or 6 with a pooler MLP\), 16\]"
    ):
        textspan.ablation(Contributions(src.heads, src.mlps[:, 1:], labels=src.labels), w)
    with pytest.raises(ValueError, match=r"classifier: expected shape \[16, C\], got \[5, 16\]"):
        textspan.ablation(src, w.T, progress=False)
    with pytest.raises(ValueError, match="empty store"):
        textspan.ablation(Contributions(src.heads[:0], src.mlps[:0], labels=src.labels[:0]), w)
    with pytest.raises(
        ValueError, match=r"heads: head \(4, 0\) is outside the model's 4 layers × 3"
    ):
        textspan.repair(src, w, np.zeros(N, dtype=int), [(4, 0)], progress=False)
    with pytest.raises(ValueError, match=r"attribute: expected an integer spurious attribute"):
        textspan.repair(src, w, np.zeros(N), [(3, 0)], progress=False)
    with pytest.raises(ValueError, match=r"k: expected 1..239 neighbours, got 240"):
        textspan.retrieve(src, [(3, 0)], 0, k=240, progress=False)
    with pytest.raises(ValueError, match=r"query: expected an image index in 0..239, got 240"):
        textspan.retrieve(src, [(3, 0)], 240, progress=False)
    with pytest.raises(ValueError, match=r"spans: head \(5, 0\) is outside"):
        textspan.replacement(src, w, {(5, 0): next(iter(spans_for(src, [3]).values()))})


def test_default_pool_is_large_varied_and_deterministic(tmp_path):
    pool = textspan.default_pool()
    assert len(pool) >= 3000 and len(set(pool)) == len(pool)
    assert pool == textspan.default_pool()
    text = " ".join(pool).lower()
    for word in (
        "red",
        "triangle",
        "striped",
        "wood",
        "chair",
        "dog",
        "beach",
        "japan",
        "rainy",
        "light",
        "sunset",
        "watercolor",
        "three",
        "top left",
        "cheerful",
    ):
        assert word in text, word
    words = textspan.common_words()
    assert len(words) > 300 and all(" " not in w for w in words)
    f = tmp_path / "pool.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert textspan.load_texts(f) == ["a cat", "a dog"]
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="expected one text per line, got an empty file"):
        textspan.load_texts(f)


def test_repair_head_count_keeps_the_count_with_the_best_worst_group():
    src, w = world(n=400)
    rng = np.random.default_rng(4)
    attribute = rng.integers(0, C, len(src.labels))
    spurious = [(3, 1), (2, 0)]  # they write the attribute's class direction
    for a, b in spurious:
        src.heads[:, a, b] += 0.8 * w[:, attribute].T
    ranked = [*spurious, (3, 0), (2, 2)]  # the last two carry the class: ablating them hurts
    count, worst = textspan.repair_head_count(src, w, attribute, ranked)
    assert list(worst) == [1, 2, 3, 4] and count == 2
    results = {
        k: textspan.repair(src, w, attribute, ranked[:k], random_draws=0, progress=False)
        for k in worst
    }
    assert worst == {k: r.after.worst for k, r in results.items()}
    assert worst[2] > worst[1] > results[1].before.worst and worst[2] > worst[4]
    with pytest.raises(ValueError, match="between 1 and the 4 ranked heads"):
        textspan.repair_head_count(src, w, attribute, ranked, counts=[5])
