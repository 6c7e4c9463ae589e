"""Mean-ablation: accuracy with the MLPs, the class token's attention term, or the first
attention layers replaced by their means over a set of images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.checks import Convention
from .sources import (
    check_classifier,
    check_labels,
    chunks,
    convention_of,
    correct_counts,
    means_for,
    rows_f32,
    shapes,
)

__all__ = ["AblationResult", "ablation"]


@dataclass
class AblationResult:
    """Zero-shot accuracy under mean-ablations.

    Attributes:
        conditions: name → accuracy (baseline; MLPs; class-token attention; both).
        layers: [L+1] accuracy with the first k attention layers mean-ablated, k = 0..L.
        count: images evaluated.
        convention: the decomposition's convention of the terms ("textspan" or "paper").
        definitions: condition → what exactly was mean-ablated under that convention.
    """

    conditions: dict[str, float]
    layers: np.ndarray
    count: int
    convention: Convention = "textspan"
    definitions: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(k) for k in self.conditions)
        rows = [f"{k:<{width}}  {v:7.2%}" for k, v in self.conditions.items()]
        return "\n".join([*rows, f"(convention: {self.convention}; {self.definitions[MLPS]})"])


MLPS = "MLPs mean-ablated"
CLASS_TOKEN = "class-token attention mean-ablated"
BOTH = "MLPs + class-token attention mean-ablated"


def _definitions(convention: Convention) -> dict[str, str]:
    mlps = (
        "every layer's MLP and the embedding term, as the paper's code does"
        if convention == "paper"
        else "every layer's MLP (and an attention pooler's); the embedding term is kept"
    )
    return {
        "baseline": "nothing",
        MLPS: mlps,
        CLASS_TOKEN: "each layer's attention term from the class token's own position",
        BOTH: f"{mlps}; and the class-token attention terms",
    }


def ablation(
    source: Any, classifier: Any, *, means: Any = None, progress: bool = True
) -> AblationResult:
    """The paper's mean-ablation study.

    Accuracy for: the baseline; every layer's MLP mean-ablated (in the paper's convention the
    embedding term too, as its code does; in textspan's it is kept); the class token's own
    attention term mean-ablated in every layer; both; and attention layers mean-ablated
    cumulatively from the first (all heads of layers 0..k−1). The convention is the source's
    (`Store.convention`); means from a source of the other convention are refused.

    Args:
        source: a Store or Contributions with labels.
        classifier: [D, C] zero-shot classifier.
        means: where the means come from: None (the same set, as in the paper), another
            Store / Contributions, or `TermMeans`.
    """
    n, layers, _, d = shapes(source)
    w = check_classifier(classifier, d)
    labels = check_labels(source, n, w.shape[1])
    mu = means_for(source, means, progress)
    ct = getattr(source, "class_token", None)
    has_cls = ct is not None and mu.class_token is not None
    attn_mean = mu.heads.sum(1).astype(np.float32)  # [L, D]
    # The paper's "MLPs" are every entry of its mlps array, the embedding term included.
    first = 0 if convention_of(source) == "paper" else 1
    mlp_mean = mu.mlps[first:].sum(0).astype(np.float32)
    correct = np.zeros(4 + layers, dtype=np.int64)
    for rows in chunks(source, n, progress, "ablation"):
        heads, mlps = rows_f32(source.heads, rows), rows_f32(source.mlps, rows)
        attn = heads.sum(2)  # [n, L, D]
        rep = attn.sum(1) + mlps.sum(1)
        mlp_dev = mlps[:, first:].sum(1) - mlp_mean
        if has_cls:
            cls_dev = rows_f32(ct, rows).sum(1) - mu.class_token.sum(0).astype(np.float32)
        else:
            cls_dev = np.zeros_like(rep)
        cumulative = np.cumsum(attn - attn_mean, axis=1)  # [n, L, D]
        reps = np.concatenate(
            [
                np.stack([rep, rep - mlp_dev, rep - cls_dev, rep - mlp_dev - cls_dev]),
                rep[None] - cumulative.transpose(1, 0, 2),
            ]
        )
        correct += correct_counts(reps, w, labels[rows])
    accuracy = correct / n
    conditions = {"baseline": accuracy[0], MLPS: accuracy[1]}
    if has_cls:
        conditions[CLASS_TOKEN] = accuracy[2]
        conditions[BOTH] = accuracy[3]
    curve = np.concatenate([accuracy[:1], accuracy[4:]])
    definitions = {k: v for k, v in _definitions(convention_of(source)).items() if k in conditions}
    return AblationResult(
        {k: float(v) for k, v in conditions.items()},
        curve,
        n,
        convention_of(source),
        definitions,
    )
