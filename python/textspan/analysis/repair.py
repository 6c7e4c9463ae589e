"""Removing a spurious feature by mean-ablating the heads whose TextSpan texts are about it
(the paper's Waterbirds experiment), and ranking heads by a property."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.checks import as_float_array
from ..core.span import SpanResult
from ..errors import InputError
from .sources import (
    Head,
    check_classifier,
    check_heads,
    check_labels,
    chunks,
    means_for,
    rows_f32,
    shapes,
)

__all__ = [
    "GroupAccuracy",
    "RepairResult",
    "group_accuracy",
    "group_sizes",
    "rank_heads",
    "repair",
    "repair_head_count",
]


def rank_heads(
    spans: Mapping[Head, SpanResult],
    keywords: Sequence[str] | None = None,
    *,
    examples: Any = None,
    pool: Any = None,
) -> list[tuple[Head, float]]:
    """Heads ranked by how much their TextSpan texts are about a property, best first.

    A head's score weights each of its texts by the share of variance it explains:
    - keywords: the weighted share of texts that contain one of the keywords (whole words,
      any case) — a score in [0, 1];
    - examples [E, D] (text embeddings of example texts) with pool [M, D] (the embeddings
      of the pool the spans chose from): the weighted mean over its texts of the largest
      cosine similarity to an example.
    """
    if (keywords is None) == (examples is None):
        raise InputError("rank_heads: expected keywords or example embeddings (one of them)")
    if not spans:
        raise InputError("spans: expected TextSpan results for at least one head, got none")
    if keywords is not None:
        words = [k.strip() for k in keywords if k.strip()]
        if not words:
            raise InputError("keywords: expected at least one non-empty keyword")
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    else:
        e = np.asarray(as_float_array(examples, "examples"), dtype=np.float64)
        p = None if pool is None else np.asarray(as_float_array(pool, "pool"), dtype=np.float64)
        if e.ndim != 2 or p is None or p.ndim != 2 or p.shape[1] != e.shape[1]:
            raise InputError(
                "examples and pool: expected embeddings [E, D] and [M, D] with one D, got "
                f"{list(e.shape)} and {None if p is None else list(p.shape)}"
            )
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
    scored = []
    for key, span in spans.items():
        weight = np.clip(span.explained, 0, None)
        if keywords is not None:
            if span.texts is None:
                raise InputError(f"spans[{key}]: keywords need the chosen texts (pass texts=)")
            hits = np.array([bool(pattern.search(t)) for t in span.texts], dtype=np.float64)
        else:
            hits = (p[span.indices] @ e.T).max(1)
        total = weight.sum()
        scored.append((key, float((weight * hits).sum() / total) if total > 0 else 0.0))
    return sorted(scored, key=lambda kv: -kv[1])


@dataclass
class GroupAccuracy:
    """Accuracy per group (class, attribute), the worst group's, and over all images."""

    groups: dict[tuple[int, int], float]
    worst: float
    average: float  # over the images evaluated
    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # images per group

    @property
    def worst_group(self) -> tuple[int, int]:
        return min(self.groups, key=self.groups.get)

    @property
    def balanced(self) -> float:
        """The mean of the groups' accuracies (each group weighs the same)."""
        return float(np.mean(list(self.groups.values())))

    def weighted(self, sizes: Mapping[tuple[int, int], int]) -> float:
        """The groups' accuracies weighted by `sizes` (e.g. the training split's group
        sizes: the average over a set distributed like the training set)."""
        total = sum(sizes.get(g, 0) for g in self.groups)
        if total == 0:
            raise InputError(f"sizes: expected counts for the groups {sorted(self.groups)}")
        return float(sum(a * sizes.get(g, 0) for g, a in self.groups.items()) / total)


def group_sizes(labels: np.ndarray, attribute: np.ndarray) -> dict[tuple[int, int], int]:
    """The number of images of each (class label, attribute) group present, in sorted order."""
    pairs, counts = np.unique(
        np.stack([np.asarray(labels), np.asarray(attribute)], 1), axis=0, return_counts=True
    )
    return {(int(y), int(a)): int(c) for (y, a), c in zip(pairs, counts, strict=True)}


def group_accuracy(correct: np.ndarray, labels: np.ndarray, attribute: np.ndarray) -> GroupAccuracy:
    """Per-group accuracy from a boolean [N] of correct predictions."""
    counts = group_sizes(labels, attribute)
    groups = {(y, a): float(correct[(labels == y) & (attribute == a)].mean()) for y, a in counts}
    return GroupAccuracy(groups, min(groups.values()), float(correct.mean()), counts)


@dataclass
class RepairResult:
    """Group accuracies before and after mean-ablating the chosen heads, and the random-heads
    baseline: the best (by worst-group accuracy) of several draws of as many heads."""

    heads: list[Head]
    before: GroupAccuracy
    after: GroupAccuracy
    random_best: GroupAccuracy
    random_draws: list[tuple[list[Head], GroupAccuracy]]

    @property
    def random_mean(self) -> tuple[float, float]:
        """Worst-group and average accuracy of the random draws, averaged over the draws
        (what ablating as many heads at random does, not the luckiest draw)."""
        draws = [g for _, g in self.random_draws] or [self.before]
        return float(np.mean([g.worst for g in draws])), float(np.mean([g.average for g in draws]))

    def table(self) -> str:
        named = [("before", self.before), ("heads ablated", self.after)]
        if self.random_draws:
            named.append((f"best of {len(self.random_draws)} random draws", self.random_best))
        rows = [(name, g.worst, g.average) for name, g in named]
        if self.random_draws:
            rows.append(("mean of the random draws", *self.random_mean))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':<{width}}  worst-group  average"]
        lines += [
            f"{name:<{width}}  {worst:11.2%}  {average:7.2%}" for name, worst, average in rows
        ]
        return "\n".join(lines)


def repair(
    source: Any,
    classifier: Any,
    attribute: Any,
    heads: Sequence[Head],
    *,
    candidates: Sequence[Head] | None = None,
    random_draws: int = 10,
    means: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> RepairResult:
    """Removes a spurious feature by mean-ablating `heads`, as the paper does on Waterbirds.

    Groups are (class label, spurious attribute). Reports worst-group and average accuracy
    before and after, beside the best of `random_draws` random sets of as many heads drawn
    from `candidates` (default: every head of the layers `heads` come from).
    """
    _, layers, h, _ = shapes(source)
    chosen = check_heads(heads, layers, h, "heads")
    if candidates is None:
        candidates = [(layer, i) for layer in sorted({k[0] for k in chosen}) for i in range(h)]
    candidates = check_heads(candidates, layers, h, "candidates")
    if len(candidates) < len(chosen):
        raise InputError(f"candidates: expected at least {len(chosen)} heads to draw from")
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 0:
        raise InputError(f"random_draws: expected an integer >= 0, got {random_draws!r}")
    rng = np.random.default_rng(seed)
    draws = [
        [candidates[i] for i in rng.choice(len(candidates), len(chosen), replace=False)]
        for _ in range(random_draws)
    ]
    accuracies = _ablated_group_accuracies(
        source, classifier, attribute, [chosen, *draws], means, progress
    )
    random = list(zip(draws, accuracies[2:], strict=True))
    best = max((g for _, g in random), key=lambda g: g.worst) if random else accuracies[0]
    return RepairResult(chosen, accuracies[0], accuracies[1], best, random)


def repair_head_count(
    source: Any,
    classifier: Any,
    attribute: Any,
    ranked: Sequence[Head],
    *,
    counts: Sequence[int] | None = None,
    means: Any = None,
    progress: bool = False,
) -> tuple[int, dict[int, float]]:
    """How many of `ranked` (best first, as `rank_heads` orders them) to mean-ablate: the
    count with the highest worst-group accuracy on `source`, which should be validation
    images, not those the repair is then scored on. Ties go to fewer heads. Returns the
    count and the worst-group accuracy of every count tried (default: 1 to all)."""
    _, layers, h, _ = shapes(source)
    ranked = check_heads(ranked, layers, h, "ranked")
    counts = list(counts) if counts is not None else list(range(1, len(ranked) + 1))
    if not counts or min(counts) < 1 or max(counts) > len(ranked):
        raise InputError(
            f"counts: expected numbers between 1 and the {len(ranked)} ranked heads, got {counts}"
        )
    accuracies = _ablated_group_accuracies(
        source, classifier, attribute, [ranked[:k] for k in counts], means, progress
    )
    worst = {k: g.worst for k, g in zip(counts, accuracies[1:], strict=True)}
    best = max(worst.values())
    return min(k for k, w in worst.items() if w == best), worst


def _ablated_group_accuracies(
    source: Any,
    classifier: Any,
    attribute: Any,
    sets: list[list[Head]],
    means: Any,
    progress: bool,
) -> list[GroupAccuracy]:
    """Group accuracies with nothing ablated, then with each set of heads mean-ablated: one
    pass over the source for all of them."""
    n, _, _, d = shapes(source)
    w = check_classifier(classifier, d)
    labels = check_labels(source, n, w.shape[1])
    attr = np.asarray(attribute)
    if attr.shape != (n,) or not np.issubdtype(attr.dtype, np.integer):
        raise InputError(
            f"attribute: expected an integer spurious attribute per image [{n}], got "
            f"{attr.dtype} {list(attr.shape)}"
        )
    mu = means_for(source, means, progress)
    correct = np.zeros((1 + len(sets), n), dtype=bool)
    for rows in chunks(source, n, progress, "repair"):
        x = rows_f32(source.heads, rows)
        rep = x.sum((1, 2)) + rows_f32(source.mlps, rows).sum(1)
        reps = [rep]
        for s in sets:
            idx = tuple(np.array(s).T)
            reps.append(rep - (x[:, idx[0], idx[1]] - mu.heads[idx].astype(np.float32)).sum(1))
        correct[:, rows] = (np.stack(reps) @ w).argmax(-1) == labels[rows]
    return [group_accuracy(c, labels, attr) for c in correct]
