"""The paper's experiments on direct contributions: mean-ablation, replacement of heads by
their TextSpan reconstruction, removal of spurious features, and retrieval by property.

Every function takes a *source* of contributions: a `Store` (memory-mapped, so any size) or
`Contributions` of in-memory arrays. Sources are read in chunks of rows; accuracy is
zero-shot: the argmax of representation · classifier (normalising the representation does
not change the argmax).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import as_float_array, check_finite
from .span import SpanResult

__all__ = [
    "AblationResult",
    "Contributions",
    "GroupAccuracy",
    "RepairResult",
    "ReplacementResult",
    "Retrieval",
    "TermMeans",
    "ablation",
    "group_accuracy",
    "rank_heads",
    "repair",
    "repair_head_count",
    "replacement",
    "retrieve",
    "term_means",
]

CHUNK = 1024
Head = tuple[int, int]


@dataclass
class Contributions:
    """In-memory direct contributions (what a `Store` holds on disk).

    Attributes:
        heads: [N, L, H, D]; mlps: [N, L+1, D]; class_token: [N, L, D] or None (the class
        token's own share of each attention layer); labels: [N] class indices or None.
    """

    heads: Any
    mlps: Any
    class_token: Any = None
    labels: Any = None

    @classmethod
    def from_decomposition(cls, parts: Any, labels: Any = None) -> Contributions:
        """From a `Decomposition` (tensors are moved to NumPy)."""
        return cls(
            heads=as_float_array(parts.heads, "heads"),
            mlps=as_float_array(parts.mlps, "mlps"),
            class_token=as_float_array(parts.class_token, "class_token"),
            labels=labels,
        )


def _shapes(source: Any) -> tuple[int, int, int, int]:
    heads = getattr(source, "heads", None)
    mlps = getattr(source, "mlps", None)
    if heads is None or mlps is None:
        raise TypeError(
            f"source: expected a Store or Contributions (with heads and mlps), got "
            f"{type(source).__name__}"
        )
    if np.ndim(heads) != 4:
        raise ValueError(f"heads: expected shape [N, L, H, D], got {list(np.shape(heads))}")
    n, layers, h, d = heads.shape
    if tuple(mlps.shape) != (n, layers + 1, d):
        raise ValueError(
            f"mlps: expected shape [{n}, {layers + 1}, {d}] to match heads {list(heads.shape)}, "
            f"got {list(mlps.shape)}"
        )
    ct = getattr(source, "class_token", None)
    if ct is not None and tuple(ct.shape) != (n, layers, d):
        raise ValueError(f"class_token: expected shape [{n}, {layers}, {d}], got {list(ct.shape)}")
    if n == 0:
        raise ValueError("source: expected at least one image, got an empty store")
    return n, layers, h, d


def _labels(source: Any, n: int, classes: int) -> np.ndarray:
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ValueError("labels: accuracy needs a class label per image, got none")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape [{n}], got {list(labels.shape)}")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise ValueError(
            f"labels: accuracy needs a class in 0..{classes - 1} for every image, got "
            f"{labels[bad[0]]} for image {bad[0]} ({bad.size} images without a usable label; "
            "extract an ImageFolder layout, one sub-folder per class)"
        )
    return labels


def _classifier(classifier: Any, dim: int) -> np.ndarray:
    w = np.asarray(as_float_array(classifier, "classifier"), dtype=np.float32)
    if w.ndim != 2 or w.shape[0] != dim:
        raise ValueError(f"classifier: expected shape [{dim}, C], got {list(w.shape)}")
    check_finite(w, "classifier")
    return w


def _chunks(n: int, progress: bool, desc: str) -> Iterator[slice]:
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        yield slice(start, stop)
        bar.update(stop - start)
    bar.close()


def _f32(a: Any, rows: slice) -> np.ndarray:
    return np.asarray(a[rows], dtype=np.float32)


@dataclass
class TermMeans:
    """Each term's mean over a set of images: heads [L, H, D], mlps [L+1, D], class_token
    [L, D] (None when the source has none)."""

    heads: np.ndarray
    mlps: np.ndarray
    class_token: np.ndarray | None


def term_means(source: Any, progress: bool = True) -> TermMeans:
    """The mean of every term over the source's images (float64, in chunks)."""
    n, *_ = _shapes(source)
    ct = getattr(source, "class_token", None)
    sums: list[np.ndarray | None] = [None, None, None]
    for rows in _chunks(n, progress, "means"):
        for i, a in enumerate((source.heads, source.mlps, ct)):
            if a is not None:
                s = np.asarray(a[rows], dtype=np.float64).sum(0)
                sums[i] = s if sums[i] is None else sums[i] + s
    heads, mlps, cls = (None if s is None else s / n for s in sums)
    return TermMeans(heads, mlps, cls)


def _means_for(source: Any, means: Any, progress: bool) -> TermMeans:
    if means is None:
        return term_means(source, progress)
    if isinstance(means, TermMeans):
        return means
    _, layers, h, d = _shapes(source)
    other = _shapes(means)
    if other[1:] != (layers, h, d):
        raise ValueError(
            f"means: expected a source with heads [*, {layers}, {h}, {d}], got "
            f"{list(means.heads.shape)}"
        )
    return term_means(means, progress)


def _correct(reps: np.ndarray, w: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correct predictions per condition: reps [K, n, D] → [K]."""
    return ((reps @ w).argmax(-1) == labels).sum(-1)


@dataclass
class AblationResult:
    """Zero-shot accuracy under mean-ablations.

    Attributes:
        conditions: name → accuracy (baseline; MLPs; class-token attention; both).
        layers: [L+1] accuracy with the first k attention layers mean-ablated, k = 0..L.
        count: images evaluated.
    """

    conditions: dict[str, float]
    layers: np.ndarray
    count: int

    def table(self) -> str:
        width = max(len(k) for k in self.conditions)
        return "\n".join(f"{k:<{width}}  {v:7.2%}" for k, v in self.conditions.items())


def ablation(
    source: Any, classifier: Any, means: Any = None, progress: bool = True
) -> AblationResult:
    """The paper's mean-ablation study.

    Accuracy for: the baseline; every layer's MLP mean-ablated (the embedding term is kept);
    the class token's own attention term mean-ablated in every layer; both; and attention
    layers mean-ablated cumulatively from the first (all heads of layers 0..k−1).

    Args:
        source: a Store or Contributions with labels.
        classifier: [D, C] zero-shot classifier.
        means: where the means come from: None (the same set, as in the paper), another
            Store / Contributions, or `TermMeans`.
    """
    n, layers, _, d = _shapes(source)
    w = _classifier(classifier, d)
    labels = _labels(source, n, w.shape[1])
    mu = _means_for(source, means, progress)
    ct = getattr(source, "class_token", None)
    has_cls = ct is not None and mu.class_token is not None
    attn_mean = mu.heads.sum(1).astype(np.float32)  # [L, D]
    mlp_mean = mu.mlps[1:].sum(0).astype(np.float32)
    correct = np.zeros(4 + layers, dtype=np.int64)
    for rows in _chunks(n, progress, "ablation"):
        heads, mlps = _f32(source.heads, rows), _f32(source.mlps, rows)
        attn = heads.sum(2)  # [n, L, D]
        rep = attn.sum(1) + mlps.sum(1)
        mlp_dev = mlps[:, 1:].sum(1) - mlp_mean
        if has_cls:
            cls_dev = _f32(ct, rows).sum(1) - mu.class_token.sum(0).astype(np.float32)
        else:
            cls_dev = np.zeros_like(rep)
        cumulative = np.cumsum(attn - attn_mean, axis=1)  # [n, L, D]
        reps = np.concatenate(
            [
                np.stack([rep, rep - mlp_dev, rep - cls_dev, rep - mlp_dev - cls_dev]),
                rep[None] - cumulative.transpose(1, 0, 2),
            ]
        )
        correct += _correct(reps, w, labels[rows])
    accuracy = correct / n
    conditions = {"baseline": accuracy[0], "MLPs mean-ablated": accuracy[1]}
    if has_cls:
        conditions["class-token attention mean-ablated"] = accuracy[2]
        conditions["MLPs + class-token attention mean-ablated"] = accuracy[3]
    curve = np.concatenate([accuracy[:1], accuracy[4:]])
    return AblationResult({k: float(v) for k, v in conditions.items()}, curve, n)


@dataclass
class ReplacementResult:
    """Accuracy when heads are replaced by their reconstruction from their first n texts.

    Attributes:
        n_texts: [K] 0..n_max (0: the heads mean-ablated).
        accuracy: [K].
        baseline: accuracy of the unmodified representation.
        heads: the replaced heads (layer, head).
    """

    n_texts: np.ndarray
    accuracy: np.ndarray
    baseline: float
    heads: list[Head]


def _heads(heads: Sequence[Head], layers: int, h: int, what: str) -> list[Head]:
    """(layer, head) pairs as ints, each checked against the model's layers × heads."""
    checked = [(int(a), int(b)) for a, b in heads]
    if not checked:
        raise ValueError(f"{what}: expected at least one head, got none")
    for key in checked:
        if not (0 <= key[0] < layers and 0 <= key[1] < h):
            raise ValueError(
                f"{what}: head {key} is outside the model's {layers} layers × {h} heads"
            )
    return checked


def _head_spans(spans: Mapping[Head, SpanResult], layers: int, h: int, d: int) -> list[Head]:
    keys = _heads(list(spans), layers, h, "spans")
    for key, span in zip(keys, spans.values(), strict=True):
        if not isinstance(span, SpanResult) or span.directions.shape[-1] != d:
            raise ValueError(f"spans[{key}]: expected a SpanResult with D = {d} directions")
    return keys


def replacement(
    source: Any,
    classifier: Any,
    spans: Mapping[Head, SpanResult],
    max_texts: int | None = None,
    means: Any = None,
    progress: bool = True,
) -> ReplacementResult:
    """The paper's replacement study.

    Every head in `spans` is replaced by its mean plus the projection of its centred output
    on its first n TextSpan directions (n = 0..max_texts); all attention layers before the
    first replaced layer are mean-ablated; everything else is kept.
    """
    n, layers, h, d = _shapes(source)
    w = _classifier(classifier, d)
    labels = _labels(source, n, w.shape[1])
    keys = _head_spans(spans, layers, h, d)
    most = max(len(spans[k]) for k in keys)
    max_texts = most if max_texts is None else int(max_texts)
    if not 1 <= max_texts <= most:
        raise ValueError(f"max_texts: expected 1..{most} (texts found per head), got {max_texts}")
    first = min(layer for layer, _ in keys)
    mu = _means_for(source, means, progress)
    early_mean = mu.heads[:first].sum((0, 1)).astype(np.float32)
    # Per head: its directions' images under the classifier, zero-padded to max_texts.
    through = np.zeros((len(keys), max_texts, w.shape[1]), dtype=np.float32)
    for i, k in enumerate(keys):
        u = spans[k].directions[:max_texts].astype(np.float32)
        through[i, : len(u)] = u @ w
    correct = np.zeros(max_texts + 2, dtype=np.int64)  # baseline, then n = 0..max_texts
    for rows in _chunks(n, progress, "replacement"):
        heads, mlps = _f32(source.heads, rows), _f32(source.mlps, rows)
        rep = heads.sum((1, 2)) + mlps.sum(1)
        y = labels[rows]
        correct[0] += _correct(rep[None], w, y)[0]
        base = rep - (heads[:, :first].sum((1, 2)) - early_mean)
        coefficients = np.zeros((len(rep), len(keys), max_texts), dtype=np.float32)
        for i, k in enumerate(keys):
            centred = heads[:, k[0], k[1]] - spans[k].mean.astype(np.float32)
            base -= centred
            u = spans[k].directions[:max_texts].astype(np.float32)
            coefficients[:, i, : len(u)] = centred @ u.T
        logits = base @ w
        correct[1] += (logits.argmax(-1) == y).sum()
        for t in range(max_texts):
            logits += coefficients[:, :, t] @ through[:, t]
            correct[t + 2] += (logits.argmax(-1) == y).sum()
    return ReplacementResult(np.arange(max_texts + 1), correct[1:] / n, float(correct[0] / n), keys)


def rank_heads(
    spans: Mapping[Head, SpanResult],
    keywords: Sequence[str] | None = None,
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
        raise ValueError("rank_heads: expected keywords or example embeddings (one of them)")
    if not spans:
        raise ValueError("spans: expected TextSpan results for at least one head, got none")
    if keywords is not None:
        words = [k.strip() for k in keywords if k.strip()]
        if not words:
            raise ValueError("keywords: expected at least one non-empty keyword")
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    else:
        e = np.asarray(as_float_array(examples, "examples"), dtype=np.float64)
        p = None if pool is None else np.asarray(as_float_array(pool, "pool"), dtype=np.float64)
        if e.ndim != 2 or p is None or p.ndim != 2 or p.shape[1] != e.shape[1]:
            raise ValueError(
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
                raise ValueError(f"spans[{key}]: keywords need the chosen texts (pass texts=)")
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
    average: float

    @property
    def worst_group(self) -> tuple[int, int]:
        return min(self.groups, key=self.groups.get)


def group_accuracy(correct: np.ndarray, labels: np.ndarray, attribute: np.ndarray) -> GroupAccuracy:
    """Per-group accuracy from a boolean [N] of correct predictions."""
    groups = {}
    for y, a in sorted({(int(y), int(a)) for y, a in zip(labels, attribute, strict=True)}):
        members = (labels == y) & (attribute == a)
        groups[(y, a)] = float(correct[members].mean())
    return GroupAccuracy(groups, min(groups.values()), float(correct.mean()))


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
    _, layers, h, _ = _shapes(source)
    chosen = _heads(heads, layers, h, "heads")
    if candidates is None:
        candidates = [(layer, i) for layer in sorted({k[0] for k in chosen}) for i in range(h)]
    candidates = _heads(candidates, layers, h, "candidates")
    if len(candidates) < len(chosen):
        raise ValueError(f"candidates: expected at least {len(chosen)} heads to draw from")
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
    counts: Sequence[int] | None = None,
    means: Any = None,
    progress: bool = False,
) -> tuple[int, dict[int, float]]:
    """How many of `ranked` (best first, as `rank_heads` orders them) to mean-ablate: the
    count with the highest worst-group accuracy on `source`, which should be validation
    images, not those the repair is then scored on. Ties go to fewer heads. Returns the
    count and the worst-group accuracy of every count tried (default: 1 to all)."""
    _, layers, h, _ = _shapes(source)
    ranked = _heads(ranked, layers, h, "ranked")
    counts = list(counts) if counts is not None else list(range(1, len(ranked) + 1))
    if not counts or min(counts) < 1 or max(counts) > len(ranked):
        raise ValueError(
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
    n, _, _, d = _shapes(source)
    w = _classifier(classifier, d)
    labels = _labels(source, n, w.shape[1])
    attr = np.asarray(attribute)
    if attr.shape != (n,) or not np.issubdtype(attr.dtype, np.integer):
        raise ValueError(
            f"attribute: expected an integer spurious attribute per image [{n}], got "
            f"{attr.dtype} {list(attr.shape)}"
        )
    mu = _means_for(source, means, progress)
    correct = np.zeros((1 + len(sets), n), dtype=bool)
    for rows in _chunks(n, progress, "repair"):
        x = _f32(source.heads, rows)
        rep = x.sum((1, 2)) + _f32(source.mlps, rows).sum(1)
        reps = [rep]
        for s in sets:
            idx = tuple(np.array(s).T)
            reps.append(rep - (x[:, idx[0], idx[1]] - mu.heads[idx].astype(np.float32)).sum(1))
        correct[:, rows] = (np.stack(reps) @ w).argmax(-1) == labels[rows]
    return [group_accuracy(c, labels, attr) for c in correct]


@dataclass
class Retrieval:
    """The best matches: indices into the source, best first, and their scores."""

    indices: np.ndarray
    scores: np.ndarray


def retrieve(
    source: Any,
    heads: Sequence[Head],
    query: int | Any,
    k: int = 9,
    basis: Any = None,
    progress: bool = True,
) -> Retrieval:
    """Retrieval by the direct contribution of one head or a set of heads.

    Each image is represented by the sum of the chosen heads' contributions, centred by its
    mean over the source, optionally projected on the span of `basis` [r, D] (e.g. a head's
    TextSpan directions, which are orthonormal).

    - `query` an image index: its k nearest neighbours by cosine similarity (itself left out);
    - `query` a text embedding [D]: the k images whose contribution points furthest along
      it (dot product: how much the heads write in that direction).
    """
    n, layers, h, d = _shapes(source)
    chosen = _heads(heads, layers, h, "heads")
    if not 1 <= k < n:
        raise ValueError(f"k: expected 1..{n - 1} neighbours, got {k}")
    b = None
    if basis is not None:
        b = np.asarray(as_float_array(basis, "basis"), dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != d:
            raise ValueError(f"basis: expected shape [r, {d}], got {list(b.shape)}")
    idx = tuple(np.array(chosen).T)

    def features(x: np.ndarray) -> np.ndarray:
        return x if b is None else x @ b.T

    combined = np.concatenate(
        [
            _f32(source.heads, rows)[:, idx[0], idx[1]].sum(1)
            for rows in _chunks(n, progress, "heads")
        ]
    )
    centred = features(combined - combined.mean(0))
    if isinstance(query, int | np.integer):
        if not 0 <= query < n:
            raise ValueError(f"query: expected an image index in 0..{n - 1}, got {query}")
        norms = np.linalg.norm(centred, axis=1)
        scores = centred @ centred[query] / np.maximum(norms * norms[query], 1e-30)
        scores[query] = -np.inf
    else:
        t = np.asarray(as_float_array(query, "query"), dtype=np.float32)
        if t.shape != (d,):
            raise ValueError(
                f"query: expected an image index or a text embedding [{d}], got {list(t.shape)}"
            )
        scores = centred @ features(t[None])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return Retrieval(order, scores[order])
