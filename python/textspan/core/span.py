"""TextSpan: the texts whose directions explain most of an attention head's outputs.

The algorithm is Algorithm 1 of Gandelsman, Efros and Steinhardt, "Interpreting CLIP's
Image Representation via Text-Based Decomposition" (ICLR 2024). The selection runs in the
Rust core from each head's statistics (`HeadStats`: count, mean, covariance), so its cost
does not grow with the number of images, and many heads run in parallel over one shared
copy of the text pool.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

import textspan._core as _core

from ..errors import FewerTextsWarning, InputError, InputTypeError, RoundingWarning
from .checks import Convention, as_float_array, check_convention, check_ndim
from .stats import HeadStats, device_stats, float32_stats, on_accelerator, unit_roundoff

__all__ = [
    "SpanResult",
    "TextPool",
    "text_span",
    "text_span_from_stats",
    "text_span_heads",
]

TextPool = _core.TextPool


@dataclass(frozen=True)
class SpanResult:
    """What TextSpan found for one head.

    Attributes:
        indices: indices of the chosen texts in the pool, in the order chosen.
        variance: the variance of the head's outputs along each chosen direction, once the
            earlier ones were removed; these add up to the variance the texts explain.
        total_variance: the total variance of the head's outputs (trace of the covariance).
        directions: the chosen directions [k, D], orthonormal: each is a chosen text, projected
            on the head's span, with the earlier directions removed.
        mean: the head's mean output [D].
        rank: the dimension of the span the texts were projected on.
        texts: the chosen texts, when the pool's strings were given.
        stable: how many of the first picks stayed the same when the head's outputs were
            perturbed at rounding level (`STABILITY_TRIALS` times) and, in the paper's
            convention, when the null-space directions were dropped: picks past it were
            decided by rounding (those before it survived the perturbations tried, so it
            is an upper bound). None when not measured.
        convention: "textspan" (the span is the outputs' numerical rank, at most `rank`)
            or "paper" (exactly `rank` directions, as published).
    """

    indices: np.ndarray
    variance: np.ndarray
    total_variance: float
    directions: np.ndarray
    mean: np.ndarray
    rank: int
    texts: list[str] | None = None
    stable: int | None = None
    convention: Convention = "textspan"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def explained(self) -> np.ndarray:
        """The fraction of the total variance each chosen direction explains."""
        return self.variance / self.total_variance if self.total_variance > 0 else self.variance

    def reconstruct(self, outputs: Any, n_texts: int | None = None) -> np.ndarray:
        """Replaces outputs [..., D] by their reconstruction from the first `n_texts` directions.

        This is the paper's replacement: the head's mean plus the projection of the centred
        outputs on the chosen directions.
        """
        x = np.asarray(as_float_array(outputs, "outputs"), dtype=np.float64)
        if x.shape[-1] != self.mean.shape[0]:
            raise InputError(
                f"outputs: expected shape [..., {self.mean.shape[0]}], got {list(x.shape)}"
            )
        if n_texts is not None and not 0 <= n_texts <= len(self):
            raise InputError(f"n_texts: expected 0..{len(self)} (the texts found), got {n_texts}")
        u = self.directions if n_texts is None else self.directions[:n_texts]
        return self.mean + ((x - self.mean) @ u.T) @ u

    def table(self) -> str:
        """The chosen texts with the share of variance each explains, one per line; picks
        past the stable prefix are marked "(rounding)"."""
        names = self.texts or [f"#{i}" for i in self.indices]
        return "\n".join(
            f"{i + 1:>3}. {name}  ({share:.1%})"
            + ("  (rounding)" if self.stable is not None and i >= self.stable else "")
            for i, (name, share) in enumerate(zip(names, self.explained, strict=True))
        )


def _text_pool(text_embeddings: Any) -> TextPool:
    if isinstance(text_embeddings, TextPool):
        return text_embeddings
    t = as_float_array(text_embeddings, "text_embeddings")
    check_ndim(t, "text_embeddings", 2, "[M, D]")
    if t.shape[0] == 0:
        raise InputError(
            "text_embeddings: expected a pool of at least one text, got an empty [0, D]"
        )
    return TextPool(t)


def _check_texts(texts: Sequence[str] | None, pool: TextPool) -> list[str] | None:
    if texts is None:
        return None
    texts = list(texts)
    if len(texts) != len(pool):
        raise InputError(f"texts: expected one string per pool row ({len(pool)}), got {len(texts)}")
    return texts


# Rounding an output to a precision of unit roundoff u adds to each coordinate i an error of
# variance about u²·E[x_i²]/3, independent across coordinates: noise whose largest eigenvalue
# is about u²/3 times the largest diagonal entry of the second moment. Directions below
# ROUNDING_NOISE times that are taken for rounding noise.
ROUNDING_NOISE = 4.0


def _largest_eigenvalue(g: np.ndarray, iterations: int = 50) -> float:
    """The largest eigenvalue of a symmetric PSD matrix, by power iteration (from below)."""
    v = np.sqrt(np.maximum(np.diagonal(g), 0.0)) + 1e-300
    value = 0.0
    for _ in range(iterations):
        w = g @ v
        value = float(np.linalg.norm(w) / np.linalg.norm(v))
        v = w / np.linalg.norm(w)
    return max(value, float(np.diagonal(g).max()))


def rank_tolerance_for(stats: HeadStats, rank_tolerance: float | None) -> float:
    """The tolerance given, or the one the statistics' storage precision calls for."""
    if rank_tolerance is not None:
        return float(rank_tolerance)  # the core checks it
    if stats.roundoff == 0.0:
        return _core.RANK_TOLERANCE
    g = stats.second_moment
    top = _largest_eigenvalue(g)
    if top <= 0:
        return _core.RANK_TOLERANCE
    noise = ROUNDING_NOISE * stats.roundoff**2 / 3 * float(np.diagonal(g).max())
    return float(np.clip(noise / top, _core.RANK_TOLERANCE, 0.5))


# Unit roundoff of float32, the precision outputs are computed in: the least rounding any
# head's statistics carry.
FLOAT32_ROUNDOFF = 2.0**-24
# Rounding-level perturbations tried for `SpanResult.stable` (each is one more run).
STABILITY_TRIALS = 2


def _rounded(s: HeadStats, seed: tuple[int, int]) -> HeadStats:
    """The statistics of the same outputs rounded once more at their precision: rounding
    adds to coordinate i independent noise of variance about u²·E[x_i²]/3 (the factor in
    [0.5, 1.5) stands for how the rounding of each coordinate happens to fall)."""
    u = max(s.roundoff, FLOAT32_ROUNDOFF)
    second = np.diagonal(s.covariance) + s.mean**2
    factor = np.random.default_rng(seed).uniform(0.5, 1.5, s.dim)
    return HeadStats(
        s.count, s.mean, s.covariance + np.diag(u**2 / 3 * second * factor), s.roundoff
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _spans(
    chunk: list[HeadStats],
    pool: TextPool,
    *,
    n_texts: int,
    rank: int,
    tolerances: list[float],
    start: int,
    exact: bool,
    errors: list[float] | None = None,
    outputs: np.ndarray | None = None,
) -> list[_core.HeadSpan]:
    """The core's TextSpan for a group of heads (the first is head `start`), whose
    covariances are exact or (`errors`) within the given bounds, and computed from the
    float32 `outputs` [N, heads, D] when given (they certify heads narrower than `rank`)."""
    try:
        return _core.text_span_heads(
            pool,
            np.array([s.count for s in chunk], dtype=np.float64),
            np.stack([s.mean for s in chunk]),
            np.stack([s.covariance for s in chunk]),
            np.asarray(tolerances, dtype=np.float64),
            int(n_texts),
            rank,
            exact,
            None if errors is None else np.asarray(errors, dtype=np.float64),
            outputs,
        )
    except InputError as e:  # the core checks each head; it numbers them within the group
        raise InputError(_renumber(str(e), start)) from None


@dataclass(frozen=True)
class _Inexact:
    """Statistics from float32 products (`float32_stats`): a bound on each head's
    covariance error; the float32 outputs of heads `start..stop` as a view [N, heads, D]
    (None where the heads do not share one array), from which the core certifies a head
    narrower than `rank`; and each head's exact statistics, for a head neither certifies."""

    errors: list[float]
    outputs: Callable[[int, int], np.ndarray | None]
    exact: Callable[[int], HeadStats]

    def parts(self, start: int, stop: int) -> list[tuple[int, int, np.ndarray | None]]:
        """Heads `start..stop` as (first, last, outputs) runs that the core takes in one call:
        the whole range where its heads share an array of outputs, else one head each."""
        rows = self.outputs(start, stop)
        if rows is not None:
            return [(start, stop, rows)]
        return [(i, i + 1, self.outputs(i, i + 1)) for i in range(start, stop)]


def _stats_of_outputs(
    outputs: Any, x: np.ndarray, convention: Convention
) -> tuple[HeadStats, np.ndarray | None]:
    """The statistics of head outputs [N, ..., D] (`x`: them as a float array, which the
    caller has checked), and a bound [...] on each head's covariance error when they come
    from float32 products (else None).

    Float32 outputs get float32 products (`float32_stats`: half the time of the exact ones,
    which are most of the time of TextSpan on one head); the core certifies from them, and
    from the outputs for a head narrower than `rank`, that exact statistics would keep the
    same directions, and `_run` falls back per head to the exact statistics where it cannot.
    The rest gets exact statistics: float64 outputs, which ask for that precision; outputs
    stored coarser, whose rounding noise in every direction only exact products resolve at
    its cut-off; and the paper's convention, which keeps null-space directions that the
    products' error would decide.
    """
    if convention == "paper" or x.dtype != np.float32 or unit_roundoff(outputs):
        return HeadStats.from_outputs(outputs), None  # keeps the storage precision's roundoff
    return float32_stats(x)  # x is a view of float32 outputs: nothing converted again


def _heads_of_outputs(
    items: list[Any], convention: Convention, layout: str = "[N, D] per head"
) -> tuple[list[HeadStats], _Inexact | None]:
    """The statistics of each head's outputs (arrays of `layout`) or the `HeadStats` given."""
    stats: list[HeadStats] = []
    errors: list[float] = []
    arrays: list[np.ndarray | None] = []  # the float32 outputs of a head with float32 products
    for item in items:
        if isinstance(item, HeadStats) or on_accelerator(item):
            if not isinstance(item, HeadStats):
                check_ndim(item, "outputs", 2, layout)
                item = device_stats(item)
            stats.append(item)
            errors.append(0.0)
            arrays.append(None)
            continue
        x = as_float_array(item, "outputs")
        check_ndim(x, "outputs", 2, layout)
        s, e = _stats_of_outputs(item, x, convention)
        stats.append(s)
        errors.append(0.0 if e is None else float(e))
        arrays.append(None if e is None else x)
    if not any(errors):
        return stats, None

    def outputs(start: int, stop: int) -> np.ndarray | None:
        rows = arrays[start]
        return None if rows is None or stop != start + 1 else rows[:, None, :]

    return stats, _Inexact(errors, outputs, lambda i: HeadStats.from_outputs(arrays[i]))


def _run(
    stats: list[HeadStats],
    pool: TextPool,
    *,
    n_texts: int,
    rank: int,
    texts: list[str] | None,
    progress: bool,
    rank_tolerance: float | None = None,
    convention: Convention = "textspan",
    stability: bool = False,
    inexact: _Inexact | None = None,
) -> list[SpanResult]:
    """TextSpan for each head of `stats`. With `inexact`, the statistics carry the error
    bounds it holds, and a head whose kept directions those errors could change is run again
    from its exact statistics."""
    integers = [
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (n_texts, rank)
    ]
    if not all(integers):
        raise InputTypeError(f"n_texts and rank: expected integers, got {n_texts!r} and {rank!r}")
    if rank < 1:
        raise InputError(f"rank: expected an integer >= 1, got {rank}")
    if not 1 <= n_texts <= len(pool):
        raise InputError(
            f"n_texts: expected an integer between 1 and the pool size {len(pool)}, got {n_texts}"
        )
    paper = convention == "paper"  # checked by the public entry points
    rank = min(int(rank), pool.dim)  # a span has at most D directions
    if stability and inexact is not None:
        # The stability trials perturb the statistics at float32's rounding level, far below
        # the float32 products' error: they are meaningful on exact statistics only.
        stats = [
            inexact.exact(i) if e else s
            for i, (s, e) in enumerate(zip(stats, inexact.errors, strict=True))
        ]
        inexact = None
    # Every head's statistics before the long work (the core checks each group again).
    _core.check_heads(
        [float(s.count) for s in stats],
        [s.mean for s in stats],
        [s.covariance for s in stats],
        pool.dim,
    )
    # Heads go to the core in groups: the group's bases are found in parallel, and the bar
    # moves between groups (Ctrl-C is honoured there too).
    group = max(8, 2 * _core.get_num_threads())
    results: list[SpanResult] = []
    numerical_ranks: list[int] = []
    bar = _progress(len(stats), progress and len(stats) > group)

    def core(
        heads: list[HeadStats],
        tolerances: list[float],
        first: int,
        exact: bool = paper,
        **inexact_parts: Any,
    ) -> list[_core.HeadSpan]:
        """The core's TextSpan of some heads (their statistics; the first is head `first`)."""
        return _spans(
            heads,
            pool,
            n_texts=n_texts,
            rank=rank,
            tolerances=tolerances,
            start=first,
            exact=exact,
            **inexact_parts,
        )

    for start in range(0, len(stats), group):
        chunk = stats[start : start + group]
        tolerances = [rank_tolerance_for(s, rank_tolerance) for s in chunk]
        if inexact is None:
            spans = core(chunk, tolerances, start)
        else:
            spans = []
            for first, last, rows in inexact.parts(start, start + len(chunk)):
                a, b = first - start, last - start
                errors = inexact.errors[first:last]
                spans += core(chunk[a:b], tolerances[a:b], first, errors=errors, outputs=rows)
        for i, span in enumerate(spans):
            if not span.certified:
                assert inexact is not None  # exact statistics are always certified
                chunk[i] = inexact.exact(start + i)
                tolerances[i] = rank_tolerance_for(chunk[i], rank_tolerance)
                spans[i] = core([chunk[i]], [tolerances[i]], start + i)[0]
        numerical_ranks += [s.numerical_rank for s in spans]
        # What rounding decides: the picks again from rounded statistics, and (paper) with
        # the null-space directions dropped.
        others = []
        for trial in range(STABILITY_TRIALS if stability else 0):
            seeds = [(trial, start + i) for i in range(len(chunk))]
            rounded = [_rounded(s, seed) for s, seed in zip(chunk, seeds, strict=True)]
            others.append(core(rounded, tolerances, start))
        if paper and stability:  # without the null-space directions
            others.append(core(chunk, tolerances, start, exact=False))
        for i, (s, span) in enumerate(zip(chunk, spans, strict=True)):
            idx = np.asarray(span.indices, dtype=np.int64)
            stable = None
            if stability:
                stable = min(_common_prefix(idx, o[i].indices) for o in others)
            results.append(
                SpanResult(
                    indices=idx,
                    variance=span.variance,
                    total_variance=span.total_variance,
                    directions=span.directions,
                    mean=s.mean.copy(),
                    rank=span.rank,
                    texts=None if texts is None else [texts[i] for i in idx],
                    stable=stable,
                    convention=convention,
                )
            )
        bar.update(len(chunk))
    bar.close()
    _check_found(results, n_texts)
    if paper:
        _warn_null_space(results, numerical_ranks, rank)
    return results


def _warn_null_space(results: list[SpanResult], numerical_ranks: list[int], rank: int) -> None:
    noisy = [i for i, r in enumerate(numerical_ranks) if r < rank]
    if not noisy:
        return
    lowest = min(numerical_ranks[i] for i in noisy)
    unstable = [results[i].stable for i in noisy if results[i].stable is not None]
    where = f"; their lists are stable only up to pick {min(unstable)}" if unstable else ""
    warnings.warn(
        f"{len(noisy)} head(s) have outputs of numerical rank below rank={rank} (as low as "
        f"{lowest}): the paper's convention fills the rest of the span with directions of "
        f"rounding noise, so their picks depend on rounding{where} (SpanResult.stable). "
        "textspan's convention drops those directions.",
        RoundingWarning,
        stacklevel=4,
    )


def _check_found(results: list[SpanResult], n_texts: int) -> None:
    short = [i for i, r in enumerate(results) if len(r) < n_texts]
    empty = [i for i in short if len(results[i]) == 0]
    if empty:
        i = empty[0]
        if results[i].total_variance == 0:
            raise InputError(
                f"head {i}: its outputs do not vary (every output is the same), so no text "
                "explains any of their variance"
            )
        raise InputError(
            f"head {i}: no text in the pool has a component in the span of the head's "
            "outputs (the texts are orthogonal to every direction the outputs vary in)"
        )
    if short:
        found = min(len(results[i]) for i in short)
        warnings.warn(
            f"{len(short)} head(s) yielded fewer than n_texts={n_texts} texts (as few as "
            f"{found}): every direction of their span was used. Lower n_texts, or raise rank.",
            FewerTextsWarning,
            stacklevel=4,
        )


def _renumber(message: str, first: int) -> str:
    return re.sub(r"^head (\d+):", lambda m: f"head {first + int(m.group(1))}:", message)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="TextSpan", unit="head", disable=not enabled)


def text_span_from_stats(
    stats: HeadStats,
    text_embeddings: Any,
    *,
    n_texts: int = 10,
    rank: int = 80,
    texts: Sequence[str] | None = None,
    rank_tolerance: float | None = None,
    convention: Convention = "textspan",
    stability: bool = False,
) -> SpanResult:
    """TextSpan for one head given its statistics (see `text_span`)."""
    if not isinstance(stats, HeadStats):
        raise InputTypeError(f"stats: expected HeadStats, got {type(stats).__name__}")
    if stats.shape != ():
        raise InputError(
            f"stats: expected the statistics of one head, got shape {stats.shape}; "
            "use text_span_heads for many"
        )
    convention = check_convention(convention)
    pool = _text_pool(text_embeddings)
    names = _check_texts(texts, pool)
    found = _run(
        [stats],
        pool,
        n_texts=n_texts,
        rank=rank,
        texts=names,
        progress=False,
        rank_tolerance=rank_tolerance,
        convention=convention,
        stability=stability,
    )
    return found[0]


def text_span(
    outputs: Any,
    text_embeddings: Any,
    *,
    n_texts: int = 10,
    rank: int = 80,
    texts: Sequence[str] | None = None,
    rank_tolerance: float | None = None,
    convention: Convention = "textspan",
    stability: bool = False,
) -> SpanResult:
    """TextSpan for one attention head (the paper's Algorithm 1).

    Projects every text onto the span of the top-`rank` right singular vectors of the head's
    outputs, centres the outputs, then `n_texts` times picks the text whose projection has
    the largest variance over the outputs and removes its direction from outputs and texts.

    Args:
        outputs: the head's direct contributions [N, D] (N >= 2), float16, bfloat16,
            float32 or float64, as an array or a PyTorch tensor (on a GPU, its statistics
            are computed there). Float32 outputs get their statistics from float32 products
            (twice as fast) when a bound on their error, or for a head narrower than `rank`
            the outputs' residual outside the directions kept, shows that exact ones would
            keep the same directions, and exact float64 statistics otherwise.
        text_embeddings: the pool [M, D] (or a `TextPool` made once and reused). Rows are
            scaled to unit norm first; a row of zero norm has no direction and is never
            chosen.
        n_texts: how many texts to choose, 1 <= n_texts <= M.
        rank: the dimension of the span the texts are projected on (default 80, capped at
            D). Directions in which the outputs' second moment is below `rank_tolerance`
            of its largest eigenvalue count as absent, so a head whose outputs span fewer
            dimensions uses fewer (`SpanResult.rank`); the published algorithm would fill
            them with singular vectors of rounding noise.
        texts: the pool's strings, to be reported with the result.
        rank_tolerance: by default 1e-10 for outputs in float32 or float64, and 64·u² for
            outputs stored in a coarser precision of unit roundoff u (1.5e-5 for float16,
            9.8e-4 for bfloat16), whose rounding noise spans every direction at about u²
            of the signal: without it, a float16 head of rank 17 would count 30–40
            directions and its picks would follow the noise.
        convention: "textspan" (the above) or "paper": exactly `rank` directions as
            published, those beyond the outputs' numerical rank (by `rank_tolerance`)
            included; a warning says when there are such, since the picks then depend on
            rounding.
        stability: also find how many of the first picks survive rounding-level
            perturbations of the outputs (`SpanResult.stable`; `STABILITY_TRIALS` more
            runs, one more in the paper's convention). The commands turn it on.

    Returns:
        A `SpanResult`. If the span is exhausted before `n_texts` texts (n_texts above the
        rank), it holds fewer and a FewerTextsWarning says so.

    Raises:
        InputError (a ValueError): mismatched D, N < 2, an empty pool, n_texts outside
            1..M, rank < 1, NaN or Inf in any input. InputTypeError (also a TypeError): a
            non-float dtype.
    """
    convention = check_convention(convention)
    stats, inexact = _heads_of_outputs([outputs], convention, layout="[N, D]")
    pool = _text_pool(text_embeddings)
    names = _check_texts(texts, pool)
    found = _run(
        stats,
        pool,
        n_texts=n_texts,
        rank=rank,
        texts=names,
        progress=False,
        rank_tolerance=rank_tolerance,
        convention=convention,
        stability=stability,
        inexact=inexact,
    )
    return found[0]


def text_span_heads(
    outputs_or_stats: Any,
    text_embeddings: Any,
    *,
    n_texts: int = 10,
    rank: int = 80,
    texts: Sequence[str] | None = None,
    progress: bool = True,
    rank_tolerance: float | None = None,
    convention: Convention = "textspan",
    stability: bool = False,
) -> Any:
    """TextSpan for many heads at once, in parallel, sharing one copy of the text pool.

    Args:
        outputs_or_stats: one of
            - head outputs [N, L, H, D] (or any [N, ..., D]): the result is nested lists of
              `SpanResult` of the head shape, `result[l][h]`;
            - a `HeadStats` of shape (L, H) (or any): likewise;
            - a list of per-head outputs [N_i, D] or `HeadStats`: a list of results.
        text_embeddings, n_texts, rank, texts, rank_tolerance, convention, stability: as
            in `text_span`.
        progress: show a progress bar when there are many heads.
    """
    convention = check_convention(convention)
    pool = _text_pool(text_embeddings)
    names = _check_texts(texts, pool)
    inexact = None
    shape: tuple[int, ...] | None = None  # the heads' shape, for nesting the results
    if isinstance(outputs_or_stats, list | tuple):
        if not outputs_or_stats:
            raise InputError("outputs_or_stats: expected at least one head, got an empty list")
        flat, inexact = _heads_of_outputs(list(outputs_or_stats), convention)
    elif isinstance(outputs_or_stats, HeadStats):
        shape = outputs_or_stats.shape
        if not shape or 0 in shape:
            raise InputError(
                f"stats: expected statistics of at least one head in a head shape (L, H), "
                f"got shape {shape}" + ("; use text_span_from_stats for one" if not shape else "")
            )
        flat = [outputs_or_stats[idx] for idx in product(*(range(s) for s in shape))]
    else:
        on_device = on_accelerator(outputs_or_stats)
        x = outputs_or_stats if on_device else as_float_array(outputs_or_stats, "outputs")
        if x.ndim < 3:
            raise InputError(
                f"outputs: expected shape [N, L, H, D] (or [N, ..., D]), got {list(x.shape)}"
            )
        if on_device:
            all_stats, errors = device_stats(x), None
        else:
            all_stats, errors = _stats_of_outputs(outputs_or_stats, x, convention)
        if errors is not None:
            heads = x.reshape(x.shape[0], -1, x.shape[-1])
            inexact = _Inexact(
                errors.ravel().tolist(),
                lambda start, stop: heads[:, start:stop],
                lambda i: HeadStats.from_outputs(heads[:, i]),
            )
        shape = all_stats.shape
        flat = [all_stats[idx] for idx in product(*(range(s) for s in shape))]
    results = _run(
        flat,
        pool,
        n_texts=n_texts,
        rank=rank,
        texts=names,
        progress=progress,
        rank_tolerance=rank_tolerance,
        convention=convention,
        stability=stability,
        inexact=inexact,
    )
    return results if shape is None else _nest(results, shape)


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
