"""Retrieval by the direct contribution of chosen heads: nearest neighbours of an image, or
the images a head writes furthest along a text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checks import as_float_array
from ..errors import InputError
from .sources import Head, check_heads, chunks, rows_f32, shapes

__all__ = ["Retrieval", "retrieve"]


@dataclass
class Retrieval:
    """The best matches: indices into the source, best first, and their scores."""

    indices: np.ndarray
    scores: np.ndarray


def retrieve(
    source: Any,
    heads: Sequence[Head],
    query: int | Any,
    *,
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
    n, layers, h, d = shapes(source)
    chosen = check_heads(heads, layers, h, "heads")
    if n < 2:
        raise InputError(f"retrieval needs at least 2 images, the source has {n}")
    if not 1 <= k < n:
        raise InputError(f"k: expected 1..{n - 1} neighbours, got {k}")
    b = None
    if basis is not None:
        b = np.asarray(as_float_array(basis, "basis"), dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != d:
            raise InputError(f"basis: expected shape [r, {d}], got {list(b.shape)}")
    idx = tuple(np.array(chosen).T)

    def features(x: np.ndarray) -> np.ndarray:
        return x if b is None else x @ b.T

    combined = np.concatenate(
        [
            rows_f32(source.heads, rows)[:, idx[0], idx[1]].sum(1)
            for rows in chunks(source, n, progress, "heads")
        ]
    )
    centred = features(combined - combined.mean(0))
    if isinstance(query, int | np.integer):
        if not 0 <= query < n:
            raise InputError(f"query: expected an image index in 0..{n - 1}, got {query}")
        norms = np.linalg.norm(centred, axis=1)
        scores = centred @ centred[query] / np.maximum(norms * norms[query], 1e-30)
        scores[query] = -np.inf
    else:
        t = np.asarray(as_float_array(query, "query"), dtype=np.float32)
        if t.shape != (d,):
            raise InputError(
                f"query: expected an image index or a text embedding [{d}], got {list(t.shape)}"
            )
        scores = centred @ features(t[None])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return Retrieval(order, scores[order])
