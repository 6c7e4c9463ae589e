"""The paper's claims checked against ground truth, on the toy CLIP and the toy world.

Every function here returns numbers the tests assert on and the demo reports:

- `head_factors`: TextSpan for every head over a pool of descriptions of the world, and for
  each head the factor most of its top texts describe, with that share (its purity);
- `segmentation_check`: zero-shot segmentation of held-out images against their exact
  masks, by the decomposition and by the raw-attention baseline;
- `spurious_check`: worst-group accuracy of shape on balanced (shape, background) groups
  before and after mean-ablating the heads `rank_heads` finds to be about the background,
  beside random heads (`spurious_study`: on the model trained to lean on the background);
- `retrieval_check`: images retrieved by one head share that head's factor with the query.

`study` runs them all and writes the demo's report (`textspan demo`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import analysis
from ..analysis import Head
from ..core.checks import Convention
from ..core.span import SpanResult, text_span_heads
from ..errors import FewerTextsWarning, RoundingWarning
from ..models import Decomposer, encode_texts
from . import report
from . import world as tw
from .model import SPURIOUS, SPURIOUS_DIR, load_toy, to_tensor, toy_meta, zero_shot
from .results import HeadFactor, RetrievalCheck, SegmentationCheck, SpuriousCheck, StudyResult

__all__ = [
    "decompose",
    "description_pool",
    "factor_classifier",
    "head_factors",
    "retrieval_check",
    "segmentation_check",
    "spurious_check",
    "spurious_study",
    "study",
]


def description_pool() -> tuple[list[str], list[frozenset[str]]]:
    """Texts about the world, each naming exactly one factor ("a red object", "a circle",
    "an object at the top left", "a small object", "an object on a water background"), and
    the factor each names. With two-factor texts in the pool too, TextSpan picks mostly
    those (their directions carry more of a head's variance), and a head's top texts stop
    saying which one factor it is about."""
    texts, named = [], []
    for factor in tw.FACTORS:
        captions = tw.factor_captions(factor)
        texts += captions
        named += [frozenset([factor])] * len(captions)
    return texts, named


def factor_classifier(model: Any, tokenizer: Any, factor: str) -> np.ndarray:
    """[D, C] zero-shot classifier of one factor: the captions naming only that factor."""
    return encode_texts(model, tokenizer, tw.factor_captions(factor), progress=False).T.copy()


def decompose(
    model: Any, world: tw.World, batch_size: int = 250, convention: Convention = "textspan"
) -> analysis.Contributions:
    """The direct contributions of every head and MLP for the world's images."""
    import torch

    parts = []
    with torch.no_grad(), Decomposer(model) as decomposer:
        for start in range(0, len(world), batch_size):
            images = to_tensor(world.images[start : start + batch_size])
            d = decomposer.decompose(images, convention=convention)
            parts.append(analysis.Contributions.from_decomposition(d))
    return analysis.Contributions(
        heads=np.concatenate([p.heads for p in parts]),
        mlps=np.concatenate([p.mlps for p in parts]),
        class_token=np.concatenate([p.class_token for p in parts]),
        convention=convention,
    )


def head_factors(
    spans: dict[Head, SpanResult], named: list[frozenset[str]], top: int = 5
) -> list[HeadFactor]:
    """For each head: the factor its first `top` TextSpan texts are most about (weighted by
    the variance each explains), with its purity and the plain share of those texts."""
    out = []
    for key, span in spans.items():
        picked = [named[i] for i in span.indices[:top]]
        weights = np.clip(span.explained[:top], 0, None)
        shares = _factor_shares(picked, weights)
        factor = max(shares, key=shares.get)
        out.append(
            HeadFactor(
                key,
                factor,
                shares[factor],
                _factor_shares(picked, np.ones(len(picked)))[factor],
                list(span.texts or [])[:top],
                float(span.explained[:top].sum()),
                span.stable,
            )
        )
    return out


def chance_purity(
    named: list[frozenset[str]], top: int = 5, draws: int = 4000, seed: int = 0
) -> float:
    """The plain share of the top factor among `top` texts drawn at random from the pool
    (mean over draws): what a head TextSpan could not read would score."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(draws):
        picked = [named[i] for i in rng.choice(len(named), top, replace=False)]
        scores.append(max(_factor_shares(picked, np.ones(top)).values()))
    return float(np.mean(scores))


def _factor_shares(picked: list[frozenset[str]], weights: np.ndarray) -> dict[str, float]:
    """Per factor, the weighted share of the texts about it (a text naming k factors counts
    1/k for each)."""
    total = max(float(weights.sum()), 1e-30)
    return {
        f: float(sum(w / len(p) for p, w in zip(picked, weights, strict=True) if f in p)) / total
        for f in tw.FACTORS
    }


def spans_for(
    contributions: analysis.Contributions,
    embeddings: np.ndarray,
    texts: list[str],
    n_texts: int = 10,
    progress: bool = False,
) -> dict[Head, SpanResult]:
    """TextSpan for every head (rank: the embedding width), in the contributions'
    convention."""
    _, layers, heads, d = contributions.heads.shape
    with warnings.catch_warnings():
        # The paper's convention warns that rank = D fills the heads' spans with rounding
        # noise; the study reports each head's stable prefix instead.
        warnings.simplefilter("ignore", RoundingWarning)
        warnings.simplefilter("ignore", FewerTextsWarning)
        found = text_span_heads(
            contributions.heads,
            embeddings,
            n_texts=n_texts,
            rank=d,
            texts=texts,
            progress=progress,
            convention=contributions.convention,
            stability=True,
        )
    return {(a, b): found[a][b] for a in range(layers) for b in range(heads)}


def segmentation_check(
    model: Any, tokenizer: Any, world: tw.World, convention: Convention = "textspan"
) -> dict[str, SegmentationCheck]:
    """Segmentation of the world's objects, for the true shape's text, by the decomposition
    and by the last layer's class-token attention, per method."""
    classifier = factor_classifier(model, tokenizer, "shape")
    images = to_tensor(world.images)
    out = {}
    for method in ("decomposition", "attention"):
        seg = analysis.segment(
            model,
            images,
            classifier,
            classes=world.values("shape"),
            method=method,
            progress=False,
            convention=convention,
        )
        out[method] = SegmentationCheck(seg.scores(world.masks), seg)
    return out


def spurious_check(
    model: Any,
    tokenizer: Any,
    spans: dict[Head, SpanResult],
    n_per_group: int = 150,
    draws: int = 20,
    seed: int = 0,
) -> SpuriousCheck:
    """Shape (circle vs triangle) on balanced groups of the training world's correlated
    pair. `rank_heads` orders the heads by how much of their TextSpan variance texts about
    the background explain; `repair_head_count` picks how many of them to mean-ablate on
    one draw of the groups (validation), and `repair` scores that choice on another (test),
    beside `draws` random sets of as many heads."""
    size = int(model.visual.image_size[0])
    classes = tuple(SPURIOUS.pairs)
    backgrounds = tuple(SPURIOUS.pairs.values())
    full = factor_classifier(model, tokenizer, "shape")
    classifier = full[:, [tw.SHAPES.index(c) for c in classes]]

    convention = next(iter(spans.values())).convention

    def groups(draw: int) -> tuple[analysis.Contributions, np.ndarray]:
        world = tw.balanced_groups(n_per_group, SPURIOUS, seed=draw, size=size)
        contributions = decompose(model, world, convention=convention)
        contributions.labels = np.array([classes.index(s) for s in world.names("shape")])
        return contributions, np.array([backgrounds.index(b) for b in world.names("background")])

    ranked = analysis.rank_heads(spans, keywords=["background"])
    order = [k for k, _ in ranked]
    validation, validation_background = groups(seed + 7)
    test, test_background = groups(seed + 8)
    count, by_count = analysis.repair_head_count(
        validation, classifier, validation_background, order
    )
    result = analysis.repair(
        test,
        classifier,
        test_background,
        order[:count],
        candidates=list(spans),
        random_draws=draws,
        seed=seed,
        progress=False,
    )
    return SpuriousCheck(ranked, result, classes, backgrounds, by_count)


def spurious_study(
    model_dir: str | Path | None = None,
    images: int = 2000,
    seed: int = 20_000,
    convention: Convention = "textspan",
) -> SpuriousCheck:
    """`spurious_check` on the toy CLIP trained with the correlated pair at its strongest
    (default: the embedded `SPURIOUS_DIR`), its heads' TextSpan computed here over `images`
    uncorrelated images of the world."""
    folder = model_dir if model_dir is not None else SPURIOUS_DIR
    model, _, tokenizer = load_toy(folder)
    world = tw.generate(images, seed=seed, size=int(model.visual.image_size[0]))
    texts, _ = description_pool()
    embeddings = encode_texts(model, tokenizer, texts, progress=False)
    spans = spans_for(decompose(model, world, convention=convention), embeddings, texts)
    check = spurious_check(model, tokenizer, spans)
    check.trained = toy_meta(folder)
    return check


def retrieval_check(
    contributions: analysis.Contributions,
    world: tw.World,
    head: Head,
    factor: str,
    span: SpanResult,
    k: int = 8,
    directions: int = 2,
) -> RetrievalCheck:
    """Nearest neighbours of 50 query images by one head's contribution projected on its
    first `directions` TextSpan directions (as `textspan retrieve --project`): per factor,
    how often a neighbour shares the query's value (`by_head`), beside the same by the
    whole representation (`by_all`) and by chance. A head about `factor` retrieves images
    alike in that factor more than in the others."""
    queries = range(min(50, len(world)))
    layers, heads = contributions.heads.shape[1:3]
    every = [(a, b) for a in range(layers) for b in range(heads)]
    basis = span.directions[:directions]
    by_head = [
        analysis.retrieve(contributions, [head], q, k=k, basis=basis, progress=False)
        for q in queries
    ]
    by_all = [analysis.retrieve(contributions, every, q, k=k, progress=False) for q in queries]

    def agreement(results: list[analysis.Retrieval], f: str) -> float:
        values = world.values(f)
        return float(
            np.mean([values[r.indices] == values[q] for q, r in zip(queries, results, strict=True)])
        )

    def chance(f: str) -> float:
        counts = np.bincount(world.values(f))
        return float(((counts / counts.sum()) ** 2).sum())

    return RetrievalCheck(
        head=head,
        factor=factor,
        by_head={f: agreement(by_head, f) for f in tw.FACTORS},
        by_all={f: agreement(by_all, f) for f in tw.FACTORS},
        chance={f: chance(f) for f in tw.FACTORS},
        example=by_head[0],
    )


def study(
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    images: int = 2000,
    progress: bool = True,
    spurious_dir: str | Path | None = None,
    explorer: str | None = None,
    convention: Convention = "textspan",
) -> StudyResult:
    """Everything above on the toy CLIP (`model_dir`, default the embedded one; the repair
    on `spurious_dir`, default the embedded model that leans on the background) →
    `out/report.html` (self-contained) and PNGs; `explorer`, the path of the model's
    explorer relative to `out`, is linked from the report. `convention`: the
    decomposition's, for every experiment ("textspan" or "paper")."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now
        if progress:
            print(f"  {name}: {timings[name]:.1f} s", flush=True)

    model, _, tokenizer = load_toy(model_dir)
    size = int(model.visual.image_size[0])
    world = tw.generate(images, seed=20_000, size=size)
    accuracy = zero_shot(model, tokenizer, world)
    lap("zero-shot accuracy")

    contributions = decompose(model, world, convention=convention)
    import torch

    with torch.no_grad():
        # The paper's terms add up to the normalised representation.
        normalize = convention == "paper"
        expected = model.encode_image(to_tensor(world.images[:200]), normalize=normalize).numpy()
    summed = contributions.heads[:200].sum((1, 2)) + contributions.mlps[:200].sum(1)
    identity_error = float(np.abs(summed - expected).max() / np.abs(expected).max())
    lap("decomposition")

    texts, named = description_pool()
    embeddings = encode_texts(model, tokenizer, texts, progress=False)
    spans = spans_for(contributions, embeddings, texts)
    factors = head_factors(spans, named)
    chance = chance_purity(named)
    lap("TextSpan for every head")

    ablations = {}
    for factor in tw.FACTORS:
        contributions.labels = world.values(factor)
        ablations[factor] = analysis.ablation(
            contributions, factor_classifier(model, tokenizer, factor), progress=False
        )
    contributions.labels = None
    lap("mean-ablations")

    held_out = tw.generate(500, seed=30_000, size=size)
    segmentation = segmentation_check(model, tokenizer, held_out, convention)
    lap("segmentation")

    # This model reads shape despite its training correlation; the repair is shown on one
    # trained to lean on the background.
    unbiased = spurious_check(model, tokenizer, spans).result.before
    spurious = spurious_study(spurious_dir, images=images, convention=convention)
    lap("spurious-feature repair")

    best = {}
    for hf in factors:
        if hf.factor not in best or hf.purity > best[hf.factor].purity:
            best[hf.factor] = hf
    retrievals = [
        retrieval_check(contributions, world, best[f].head, f, spans[best[f].head])
        for f in ("colour", "shape", "background", "position")
        if f in best
    ]
    lap("retrieval")

    result = StudyResult(
        zero_shot=accuracy,
        identity_error=identity_error,
        heads=factors,
        chance_purity=chance,
        ablation=ablations,
        segmentation=segmentation,
        spurious=spurious,
        spurious_on_this_model=unbiased,
        retrieval=retrievals,
        world=world,
        held_out=held_out,
        timings=timings,
        convention=convention,
    )
    result.report = report.write(out, result, explorer=explorer)
    lap("report")
    return result
