"""Replacing heads by their reconstruction from their first TextSpan texts (the paper's
replacement study)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.span import SpanResult
from ..errors import InputError
from .sources import (
    Head,
    check_classifier,
    check_heads,
    check_labels,
    chunks,
    correct_counts,
    means_for,
    rows_f32,
    shapes,
)

__all__ = ["ReplacementResult", "replacement"]


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


def _head_spans(spans: Mapping[Head, SpanResult], layers: int, h: int, d: int) -> list[Head]:
    keys = check_heads(list(spans), layers, h, "spans")
    for key, span in zip(keys, spans.values(), strict=True):
        if not isinstance(span, SpanResult) or span.directions.shape[-1] != d:
            raise InputError(f"spans[{key}]: expected a SpanResult with D = {d} directions")
    return keys


def replacement(
    source: Any,
    classifier: Any,
    spans: Mapping[Head, SpanResult],
    *,
    max_texts: int | None = None,
    means: Any = None,
    progress: bool = True,
) -> ReplacementResult:
    """The paper's replacement study.

    Every head in `spans` is replaced by its mean plus the projection of its centred output
    on its first n TextSpan directions (n = 0..max_texts); all attention layers before the
    first replaced layer are mean-ablated; everything else is kept.
    """
    n, layers, h, d = shapes(source)
    w = check_classifier(classifier, d)
    labels = check_labels(source, n, w.shape[1])
    keys = _head_spans(spans, layers, h, d)
    most = max(len(spans[k]) for k in keys)
    max_texts = most if max_texts is None else int(max_texts)
    if not 1 <= max_texts <= most:
        raise InputError(f"max_texts: expected 1..{most} (texts found per head), got {max_texts}")
    first = min(layer for layer, _ in keys)
    mu = means_for(source, means, progress)
    early_mean = mu.heads[:first].sum((0, 1)).astype(np.float32)
    # Per head: its directions' images under the classifier, zero-padded to max_texts.
    through = np.zeros((len(keys), max_texts, w.shape[1]), dtype=np.float32)
    for i, k in enumerate(keys):
        u = spans[k].directions[:max_texts].astype(np.float32)
        through[i, : len(u)] = u @ w
    correct = np.zeros(max_texts + 2, dtype=np.int64)  # baseline, then n = 0..max_texts
    for rows in chunks(source, n, progress, "replacement"):
        heads, mlps = rows_f32(source.heads, rows), rows_f32(source.mlps, rows)
        rep = heads.sum((1, 2)) + mlps.sum(1)
        y = labels[rows]
        correct[0] += correct_counts(rep[None], w, y)[0]
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
