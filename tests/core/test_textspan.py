"""TextSpan in the Rust core against the published algorithm, written out in published.py."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
from published import published_text_span

import textspan
from textspan import HeadStats, text_span, text_span_from_stats, text_span_heads
from textspan.core.synthetic import low_rank_outputs


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(8, 97))
    n = int(rng.integers(20, 1500))
    m = int(rng.integers(5, 400))
    signal = int(rng.integers(2, d + 1))
    rank = int(rng.integers(1, d + 1))
    x = low_rank_outputs(rng, n, d, signal)
    t = rng.standard_normal((m, d))
    # Stay inside the span: past it the published algorithm picks among rounding noise.
    usable = min(rank, d, n - 1, m)
    n_texts = int(rng.integers(1, min(usable, 25) + 1))
    return x, t, n_texts, rank


def assert_same(result, indices, variances):
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_allclose(result.variance, variances, rtol=1e-4, atol=0)


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_published_algorithm(seed):
    x, t, n_texts, rank = random_case(seed)
    indices, variances, _ = published_text_span(x, t, n_texts, rank)
    assert_same(text_span(x, t, n_texts=n_texts, rank=rank), indices, variances)


@pytest.mark.parametrize("seed", range(40))
def test_float32_outputs_match_the_published_algorithm(seed):
    # Float32 outputs take float32 products, each head certified or run again from exact
    # statistics; the cases are of full rank (noise in every direction) and of any spectrum.
    x, t, n_texts, rank = random_case(seed)
    x = x.astype(np.float32)
    indices, variances, _ = published_text_span(x, t, n_texts, rank)
    assert_same(text_span(x, t, n_texts=n_texts, rank=rank), indices, variances)


@pytest.mark.parametrize("seed", range(40))
def test_float16_rounded_outputs_match_the_published_algorithm_at_their_rank(seed):
    # float16 rounding is noise in every direction; directions at its level are left out,
    # and the picks are the published algorithm's on the rounded outputs at the rank kept.
    x, t, n_texts, rank = random_case(200 + seed)
    x = (x * 4).astype(np.float16)
    result = text_span(x, t, n_texts=min(n_texts, 5), rank=rank)
    indices, variances, _ = published_text_span(x, t, len(result.indices), result.rank)
    assert_same(result, indices, variances)


def test_float32_products_fall_back_to_exact_statistics_only_where_needed(monkeypatch):
    calls = []
    exact = HeadStats.from_outputs
    monkeypatch.setattr(
        HeadStats, "from_outputs", classmethod(lambda cls, x: calls.append(1) or exact(x))
    )
    rng = np.random.default_rng(4)
    t = rng.standard_normal((300, 64)).astype(np.float32)
    # Full rank, the first 20 directions far above the products' error: certified.
    full = low_rank_outputs(rng, 3000, 64, 40, decay=0.02).astype(np.float32)
    certified = text_span(full, t, n_texts=10, rank=20)
    assert calls == []
    reference = text_span_from_stats(exact(full), t, n_texts=10, rank=20)
    np.testing.assert_array_equal(certified.indices, reference.indices)
    np.testing.assert_allclose(certified.variance, reference.variance, rtol=1e-5)
    # Exactly 12 directions (and the mean) but 20 asked for: whether a 14th is above the
    # tolerance the products cannot tell, but the outputs can (their residual outside the 13
    # directions bounds every other eigenvalue): certified without exact statistics.
    basis, _ = np.linalg.qr(rng.standard_normal((64, 12)))
    low = ((rng.standard_normal((3000, 12)) @ basis.T) + 1.0).astype(np.float32)
    narrow = text_span(low, t, n_texts=10, rank=20)
    assert calls == [] and narrow.rank == 13
    exact_run = text_span_from_stats(exact(low), t, n_texts=10, rank=20)
    np.testing.assert_array_equal(narrow.indices, exact_run.indices)
    np.testing.assert_allclose(narrow.variance, exact_run.variance, rtol=1e-5)
    # Noise in every direction, above the tolerance but below the products' error: exact
    # statistics keep 20 directions that only they resolve, so the head runs again from them.
    noisy = (low + 1e-3 * rng.standard_normal(low.shape)).astype(np.float32)
    fallback = text_span(noisy, t, n_texts=10, rank=20)
    assert calls == [1] and fallback.rank == 20
    exact_run = text_span_from_stats(exact(noisy), t, n_texts=10, rank=20)
    np.testing.assert_array_equal(fallback.indices, exact_run.indices)
    np.testing.assert_array_equal(fallback.variance, exact_run.variance)
    # Many heads at once, as one array or as a list, fall back one by one; float64 outputs
    # never take float32 products.
    for heads in (np.stack([full, low, noisy], 1), [full, low, noisy]):
        calls.clear()
        found = text_span_heads(heads, t, n_texts=10, rank=20, progress=False)
        assert calls == [1]
        np.testing.assert_array_equal(found[1].indices, narrow.indices)
    calls.clear()
    text_span(full.astype(np.float64), t, n_texts=10, rank=20)
    assert calls == [1]


def test_float32_statistics_are_within_their_error_bound():
    from textspan.core.stats import float32_stats

    rng = np.random.default_rng(6)
    x = (low_rank_outputs(rng, 2500, 48, 30) + 100.0).astype(np.float32)  # a large mean
    fast, bound = float32_stats(x[:, None])
    exact = HeadStats.from_outputs(x[:, None])
    np.testing.assert_array_equal(fast.mean, exact.mean)
    error = np.linalg.norm(fast.covariance[0] - exact.covariance[0], 2)
    assert 0 < error <= bound[0] < 1e-4 * np.trace(exact.covariance[0])


@pytest.mark.parametrize("seed", range(12))
def test_statistics_accumulated_in_batches_match(seed):
    x, t, n_texts, rank = random_case(100 + seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=4, replace=False))
    parts = np.split(x, cuts)
    # Two "workers" each stream their batches, then their statistics are merged.
    left = HeadStats.zeros(x.shape[1])
    for part in parts[:2]:
        left.update(part)
    right = HeadStats.zeros(x.shape[1])
    for part in parts[2:]:
        right.update(part)
    stats = left + right
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.covariance, np.cov(x.T, bias=True), rtol=1e-9, atol=1e-13)
    indices, variances, _ = published_text_span(x, t, n_texts, rank)
    assert_same(text_span_from_stats(stats, t, n_texts=n_texts, rank=rank), indices, variances)


def test_many_heads_match_one_by_one():
    rng = np.random.default_rng(7)
    n, layers, heads, d, m = 400, 2, 3, 48, 250
    x = np.stack(
        [
            np.stack([low_rank_outputs(rng, n, d, 20 + 5 * h) for h in range(heads)], 1)
            for _ in range(layers)
        ],
        1,
    )
    t = rng.standard_normal((m, d))
    results = text_span_heads(x, t, n_texts=12, rank=30, progress=False)
    assert len(results) == layers and all(len(row) == heads for row in results)
    for layer in range(layers):
        for head in range(heads):
            indices, variances, _ = published_text_span(x[:, layer, head], t, 12, 30)
            assert_same(results[layer][head], indices, variances)
    # The same heads as a list of arrays of different lengths, and as statistics.
    per_head = [x[: 100 + 50 * h, 0, h] for h in range(heads)]
    listed = text_span_heads(per_head, t, n_texts=8, rank=30, progress=False)
    from_stats = text_span_heads(
        [HeadStats.from_outputs(a) for a in per_head], t, n_texts=8, rank=30
    )
    for h in range(heads):
        indices, variances, _ = published_text_span(per_head[h], t, 8, 30)
        assert_same(listed[h], indices, variances)
        assert_same(from_stats[h], indices, variances)


def test_exactly_low_rank_outputs_use_their_own_rank():
    # Real heads write into a subspace of about the head width: rank 80 asks for more
    # directions than exist, and the missing ones are left out rather than filled with noise.
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((96, 24)))
    x = rng.standard_normal((600, 24)) * np.exp(-0.1 * np.arange(24)) @ basis.T
    t = rng.standard_normal((300, 96))
    result = text_span(x, t, n_texts=15, rank=80)
    assert result.rank == 24
    indices, variances, _ = published_text_span(x, t, 15, 24)
    assert_same(result, indices, variances)


def test_directions_are_orthonormal_and_reconstruct_like_the_paper():
    rng = np.random.default_rng(11)
    x = low_rank_outputs(rng, 300, 40, 30)
    t = rng.standard_normal((120, 40))
    result = text_span(x, t, n_texts=10, rank=30)
    np.testing.assert_allclose(result.directions @ result.directions.T, np.eye(10), atol=1e-10)
    _, _, reconstruction = published_text_span(x, t, 10, 30)
    np.testing.assert_allclose(result.reconstruct(x), reconstruction, rtol=1e-8, atol=1e-10)
    assert result.variance.sum() <= result.total_variance * (1 + 1e-12)
    np.testing.assert_allclose(result.total_variance, x.var(0).sum(), rtol=1e-10)


def test_float32_and_non_contiguous_inputs_are_accepted():
    rng = np.random.default_rng(5)
    x = low_rank_outputs(rng, 500, 64, 40)
    t = rng.standard_normal((200, 64))
    reference = text_span(x, t, n_texts=10, rank=40)
    wide = np.zeros((500, 128))
    wide[:, ::2] = x
    strided = text_span(wide[:, ::2], np.asfortranarray(t), n_texts=10, rank=40)
    np.testing.assert_array_equal(strided.indices, reference.indices)
    np.testing.assert_allclose(strided.variance, reference.variance, rtol=1e-12)
    single = text_span(x.astype(np.float32), t.astype(np.float32), n_texts=10, rank=40)
    np.testing.assert_array_equal(single.indices, reference.indices)
    np.testing.assert_allclose(single.variance, reference.variance, rtol=1e-4)


def test_zero_norm_texts_are_never_chosen():
    rng = np.random.default_rng(9)
    x = low_rank_outputs(rng, 300, 32, 20)
    t = rng.standard_normal((50, 32))
    with_zeros = np.insert(t, [0, 10, 50], 0.0, axis=0)
    result = text_span(x, with_zeros, n_texts=10, rank=20)
    kept = np.flatnonzero(np.linalg.norm(with_zeros, axis=1) > 0)
    indices, variances, _ = published_text_span(x, t, 10, 20)
    assert_same(result, kept[indices], variances)


def test_texts_are_reported_with_the_result():
    rng = np.random.default_rng(2)
    x = low_rank_outputs(rng, 200, 16, 10)
    t = rng.standard_normal((30, 16))
    names = [f"text {i}" for i in range(30)]
    result = text_span(x, t, n_texts=4, rank=10, texts=names)
    assert result.texts == [names[i] for i in result.indices]
    assert result.table().splitlines()[0].startswith("  1. text ")


def test_exhausting_the_span_warns_and_returns_what_exists():
    rng = np.random.default_rng(4)
    x = low_rank_outputs(rng, 300, 32, 32)
    t = rng.standard_normal((100, 32))
    with pytest.warns(textspan.FewerTextsWarning, match="fewer than n_texts=12"):
        result = text_span(x, t, n_texts=12, rank=5)
    assert len(result) == 5


def test_same_result_with_one_and_two_threads():
    # Large enough for several row blocks and text chunks.
    rng = np.random.default_rng(8)
    x = low_rank_outputs(rng, 9000, 48, 40).astype(np.float32)
    t = rng.standard_normal((2500, 48)).astype(np.float32)
    before = textspan.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            textspan.set_num_threads(threads)
            assert textspan.get_num_threads() == threads
            runs.append(text_span(x, t, n_texts=20, rank=40))
    finally:
        textspan.set_num_threads(0 if before > 2 else before)
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)
    np.testing.assert_array_equal(runs[0].variance, runs[1].variance)
    np.testing.assert_array_equal(runs[0].directions, runs[1].directions)


def _span_in_child(queue):
    rng = np.random.default_rng(1)
    x = low_rank_outputs(rng, 5000, 32, 20)
    queue.put(text_span(x, rng.standard_normal((2000, 32)), n_texts=5, rank=20).indices.tolist())


def test_runs_in_a_process_forked_after_the_pool_was_used():
    rng = np.random.default_rng(1)
    x = low_rank_outputs(rng, 5000, 32, 20)
    expected = text_span(x, rng.standard_normal((2000, 32)), n_texts=5, rank=20).indices.tolist()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_span_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung: the thread pool is not fork-safe"
    assert queue.get(timeout=5) == expected


BAD_INPUTS = [
    # (outputs, texts, kwargs, exception, message)
    # The Rust core's checks, reported as InputError (a ValueError).
    (
        np.ones((10, 8)),
        np.ones((5, 6)),
        {},
        textspan.InputError,
        r"head 0: mean: expected shape \[6\] \(the texts' D\), got \[8\]",
    ),
    (np.ones((1, 8)), np.ones((5, 8)), {}, ValueError, "count: expected at least 2 outputs, got 1"),
    (np.ones((10, 8)), np.ones((0, 8)), {}, ValueError, "at least one text, got an empty"),
    (
        np.ones((10, 8)),
        np.ones((5, 8)),
        {"n_texts": 6},
        ValueError,
        "between 1 and the pool size 5, got 6",
    ),
    (np.ones((10, 8)), np.ones((5, 8)), {"n_texts": 0}, ValueError, "pool size 5, got 0"),
    (
        np.ones((10, 8)),
        np.ones((5, 8)),
        {"rank": 0},
        ValueError,
        r"rank: expected an integer >= 1, got 0",
    ),
    (
        np.ones((10, 8, 2)),
        np.ones((5, 8)),
        {},
        ValueError,
        r"expected shape \[N, D\], got \[10, 8, 2\]",
    ),
    (
        np.ones((10, 8), dtype=np.int64),
        np.ones((5, 8)),
        {},
        TypeError,
        "float32 or float64 .* int64",
    ),
]


@pytest.mark.parametrize(("outputs", "texts", "kwargs", "exc", "message"), BAD_INPUTS)
def test_bad_input_is_named(outputs, texts, kwargs, exc, message):
    kwargs = {"n_texts": 2, "rank": 4, **kwargs}
    with pytest.raises(exc, match=message):
        text_span(outputs, texts, **kwargs)


@pytest.mark.parametrize("where", ["outputs", "texts"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_refused(where, bad):
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((20, 8)), rng.standard_normal((6, 8))
    (x if where == "outputs" else t)[3, 5] = bad
    with pytest.raises(ValueError, match=r"expected finite values, got NaN or Inf at index \[3,"):
        text_span(x, t, n_texts=2, rank=4)


def test_head_stats_shapes_and_persistence(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 2, 3, 8))
    stats = HeadStats.from_outputs(x)
    assert stats.shape == (2, 3) and stats.dim == 8 and stats.count == 50
    np.testing.assert_allclose(stats[1, 2].covariance, np.cov(x[:, 1, 2].T, bias=True), atol=1e-12)
    np.testing.assert_allclose(
        stats.second_moment[0, 1], x[:, 0, 1].T @ x[:, 0, 1] / 50, rtol=1e-10
    )
    stats.save(tmp_path / "stats.npz")
    loaded = HeadStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.covariance, stats.covariance)
    with pytest.raises(ValueError, match=r"expected shape \[n, 2, 3, 8\], got \[5, 2, 8\]"):
        stats.update(np.ones((5, 2, 8)))


def test_bad_statistics_are_reported_before_any_head_runs(monkeypatch):
    import textspan._core as core

    rng = np.random.default_rng(8)
    t = rng.standard_normal((50, 16))
    heads = [HeadStats.from_outputs(low_rank_outputs(rng, 200, 16, 8)) for _ in range(20)]
    skewed = heads[17].covariance.copy()
    skewed[0, 1] += 1.0
    heads[17] = HeadStats(heads[17].count, heads[17].mean, skewed)
    ran = []
    span = core.text_span_heads
    monkeypatch.setattr(core, "text_span_heads", lambda *a, **k: ran.append(1) or span(*a, **k))
    with pytest.raises(textspan.InputError, match="head 17: covariance: expected a symmetric"):
        text_span_heads(heads, t, n_texts=3, rank=8, progress=False)
    assert ran == []  # no group of heads ran, though head 17 is past the first group
    heads[17] = HeadStats(heads[17].count, heads[17].mean, heads[16].covariance)
    assert len(text_span_heads(heads, t, n_texts=3, rank=8, progress=False)) == 20
    assert ran  # the same call runs once the statistics are sound


@pytest.mark.parametrize("seed", range(6))
def test_heads_narrower_than_rank_match_the_published_algorithm_without_exact_statistics(
    seed, monkeypatch
):
    # Real heads write into fewer dimensions than the default rank (64 of 80): certified
    # from float32 products and the outputs, and the published algorithm's picks at the
    # rank the outputs have.
    calls = []
    exact = HeadStats.from_outputs
    monkeypatch.setattr(
        HeadStats, "from_outputs", classmethod(lambda cls, x: calls.append(1) or exact(x))
    )
    rng = np.random.default_rng(300 + seed)
    width = int(rng.integers(8, 40))
    x = low_rank_outputs(rng, 2000, 192, width, noise=0.0, decay=0.03, dtype=np.float32)
    t = rng.standard_normal((500, 192))
    result = text_span(x, t, n_texts=8, rank=width + 16)
    assert calls == [] and result.rank == width + 1  # the signal and the mean
    indices, variances, _ = published_text_span(x, t, 8, result.rank)
    assert_same(result, indices, variances)


def test_outputs_on_an_accelerator_get_their_statistics_there(monkeypatch):
    torch = pytest.importorskip("torch")
    from textspan.core import span as span_module
    from textspan.core.stats import device_stats

    rng = np.random.default_rng(9)
    x = low_rank_outputs(rng, 700, 48, 12, dtype=np.float32).reshape(700, 1, 1, 48) * 3 + 2
    stats = device_stats(torch.from_numpy(x))
    exact = HeadStats.from_outputs(x)
    np.testing.assert_allclose(stats.mean, exact.mean, rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, exact.covariance, rtol=1e-9, atol=1e-14)
    assert stats.shape == (1, 1) and stats.roundoff == 0.0
    assert device_stats(torch.from_numpy(x).half()).roundoff == 2.0**-11
    # A tensor on a GPU (a CPU tensor standing in for one here) never crosses whole to NumPy.
    monkeypatch.setattr(span_module, "on_accelerator", lambda a: isinstance(a, torch.Tensor))
    real = span_module.as_float_array

    def host_copy(a, name):
        if isinstance(a, torch.Tensor):
            pytest.fail("outputs copied to the host")
        return real(a, name)

    monkeypatch.setattr(span_module, "as_float_array", host_copy)
    t = rng.standard_normal((60, 48))
    one = text_span(torch.from_numpy(x[:, 0, 0]), t, n_texts=5, rank=20)
    many = text_span_heads(torch.from_numpy(x), t, n_texts=5, rank=20, progress=False)
    reference = text_span_from_stats(exact[0, 0], t, n_texts=5, rank=20)
    np.testing.assert_array_equal(one.indices, reference.indices)
    np.testing.assert_array_equal(many[0][0].indices, reference.indices)
    with pytest.raises(textspan.InputError, match=r"expected shape \[N, D\]"):
        text_span(torch.from_numpy(x), t, n_texts=5, rank=20)


@pytest.mark.parametrize("scale, kept, exact_runs", [(1.5, 14, 1), (0.5, 13, 0)])
def test_a_direction_just_above_the_tolerance_is_kept_by_exact_statistics(
    scale, kept, exact_runs, monkeypatch
):
    # 12 directions and a mean, plus one direction whose variance is `scale` times the
    # tolerance's cut-off: above it, the outputs cannot certify the 13 and exact statistics
    # keep the 14th; below it, the 13 are certified without them.
    calls = []
    exact = HeadStats.from_outputs
    monkeypatch.setattr(
        HeadStats, "from_outputs", classmethod(lambda cls, x: calls.append(1) or exact(x))
    )
    rng = np.random.default_rng(11)
    basis, _ = np.linalg.qr(rng.standard_normal((64, 14)))
    signal = rng.standard_normal((3000, 12)) @ basis[:, :12].T + 1.0
    cutoff = textspan._core.RANK_TOLERANCE * np.linalg.eigvalsh(signal.T @ signal / 3000)[-1]
    weak = basis[:, 13] - basis[:, 13].mean()  # nearly orthogonal to the signal and the mean
    weak /= np.linalg.norm(weak)
    extra = np.sqrt(scale * cutoff) * rng.choice([-1.0, 1.0], 3000)
    x = (signal + extra[:, None] * weak).astype(np.float32)
    t = rng.standard_normal((300, 64)).astype(np.float32)
    result = text_span(x, t, n_texts=10, rank=20)
    assert result.rank == kept and len(calls) == exact_runs
    reference = text_span_from_stats(exact(x), t, n_texts=10, rank=20)
    assert reference.rank == kept
    np.testing.assert_array_equal(result.indices, reference.indices)
