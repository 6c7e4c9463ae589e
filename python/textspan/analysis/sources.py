"""Sources of contributions and what every analysis checks and reads of them.

Every analysis takes a *source*: a `Store` (memory-mapped, so any size) or `Contributions`
of in-memory arrays, read in chunks of rows. Accuracy is zero-shot: the argmax of
representation · classifier (normalising the representation does not change the argmax).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checks import Convention, as_float_array, check_finite
from ..errors import InputError, InputTypeError

__all__ = [
    "CHUNK",
    "Contributions",
    "Head",
    "TermMeans",
    "check_classifier",
    "check_heads",
    "check_labels",
    "chunks",
    "convention_of",
    "correct_counts",
    "means_for",
    "rows_f32",
    "shapes",
    "term_means",
]

CHUNK = 1024
Head = tuple[int, int]


@dataclass
class Contributions:
    """In-memory direct contributions (what a `Store` holds on disk).

    Attributes:
        heads: [N, L, H, D]; mlps: [N, L+1, D] (L+2 with an attention pooler's MLP, last);
        class_token: [N, L, D] or None (the class
        token's own share of each attention layer); labels: [N] class indices or None;
        convention: the decomposition's ("textspan" or "paper").
    """

    heads: Any
    mlps: Any
    class_token: Any = None
    labels: Any = None
    convention: Convention = "textspan"

    @classmethod
    def from_decomposition(cls, parts: Any, labels: Any = None) -> Contributions:
        """From a `Decomposition` (tensors are moved to NumPy)."""
        return cls(
            heads=as_float_array(parts.heads, "heads"),
            mlps=as_float_array(parts.mlps, "mlps"),
            class_token=as_float_array(parts.class_token, "class_token"),
            labels=labels,
            convention=parts.convention,
        )


def shapes(source: Any) -> tuple[int, int, int, int]:
    heads = getattr(source, "heads", None)
    mlps = getattr(source, "mlps", None)
    if heads is None or mlps is None:
        raise InputTypeError(
            f"source: expected a Store or Contributions (with heads and mlps), got "
            f"{type(source).__name__}"
        )
    if np.ndim(heads) != 4:
        raise InputError(f"heads: expected shape [N, L, H, D], got {list(np.shape(heads))}")
    n, layers, h, d = heads.shape
    if (
        np.ndim(mlps) != 3
        or mlps.shape[0] != n
        or mlps.shape[2] != d
        or not (layers + 1 <= mlps.shape[1] <= layers + 2)
    ):
        raise InputError(
            f"mlps: expected shape [{n}, {layers + 1} (or {layers + 2} with a pooler MLP), {d}] "
            f"to match heads {list(heads.shape)}, got {list(np.shape(mlps))}"
        )
    ct = getattr(source, "class_token", None)
    if ct is not None and tuple(ct.shape) != (n, layers, d):
        raise InputError(f"class_token: expected shape [{n}, {layers}, {d}], got {list(ct.shape)}")
    if n == 0:
        raise InputError("source: expected at least one image, got an empty store")
    return n, layers, h, d


def check_labels(source: Any, n: int, classes: int) -> np.ndarray:
    labels = getattr(source, "labels", None)
    if labels is None:
        raise InputError("labels: accuracy needs a class label per image, got none")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise InputError(f"labels: expected shape [{n}], got {list(labels.shape)}")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise InputError(
            f"labels: accuracy needs a class in 0..{classes - 1} for every image, got "
            f"{labels[bad[0]]} for image {bad[0]} ({bad.size} images without a usable label; "
            "extract an ImageFolder layout, one sub-folder per class)"
        )
    return labels


def check_classifier(classifier: Any, dim: int) -> np.ndarray:
    w = np.asarray(as_float_array(classifier, "classifier"), dtype=np.float32)
    if w.ndim != 2 or w.shape[0] != dim:
        raise InputError(f"classifier: expected shape [{dim}, C], got {list(w.shape)}")
    check_finite(w, "classifier")
    return w


def chunks(source: Any, n: int, progress: bool, desc: str) -> Iterator[slice]:
    """Slices of CHUNK rows, with a progress bar. A store checks the checksums of the rows
    each slice reaches (once per range), so corrupt rows stop the analysis with an error."""
    from tqdm.auto import tqdm

    check = getattr(source, "check_rows", None)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        if check is not None:
            check(slice(start, stop))
        yield slice(start, stop)
        bar.update(stop - start)
    bar.close()


def rows_f32(a: Any, rows: slice) -> np.ndarray:
    return np.asarray(a[rows], dtype=np.float32)


@dataclass
class TermMeans:
    """Each term's mean over a set of images: heads [L, H, D], mlps [L+1, D], class_token
    [L, D] (None when the source has none), in the source's convention."""

    heads: np.ndarray
    mlps: np.ndarray
    class_token: np.ndarray | None
    convention: Convention = "textspan"


def convention_of(source: Any) -> str:
    """The decomposition's convention a source was made in (arrays without one: textspan's)."""
    return getattr(source, "convention", "textspan")


def term_means(source: Any, *, progress: bool = True) -> TermMeans:
    """The mean of every term over the source's images (float64, in chunks)."""
    n, *_ = shapes(source)
    ct = getattr(source, "class_token", None)
    sums: list[np.ndarray | None] = [None, None, None]
    for rows in chunks(source, n, progress, "means"):
        for i, a in enumerate((source.heads, source.mlps, ct)):
            if a is not None:
                s = np.asarray(a[rows], dtype=np.float64).sum(0)
                sums[i] = s if sums[i] is None else sums[i] + s
    heads, mlps, cls = (None if s is None else s / n for s in sums)
    return TermMeans(heads, mlps, cls, convention_of(source))


def means_for(source: Any, means: Any, progress: bool) -> TermMeans:
    if means is None:
        return term_means(source, progress=progress)
    if convention_of(means) != convention_of(source):
        raise InputError(
            f"means: expected terms in the source's convention {convention_of(source)!r}, got "
            f"{convention_of(means)!r} (their terms share biases and norms differently, so "
            "they cannot replace one another)"
        )
    if isinstance(means, TermMeans):
        return means
    _, layers, h, d = shapes(source)
    other = shapes(means)
    if other[1:] != (layers, h, d):
        raise InputError(
            f"means: expected a source with heads [*, {layers}, {h}, {d}], got "
            f"{list(means.heads.shape)}"
        )
    return term_means(means, progress=progress)


def correct_counts(reps: np.ndarray, w: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correct predictions per condition: reps [K, n, D] → [K]."""
    return ((reps @ w).argmax(-1) == labels).sum(-1)


def check_heads(heads: Sequence[Head], layers: int, h: int, what: str) -> list[Head]:
    """(layer, head) pairs as ints, each checked against the model's layers × heads."""
    checked = [(int(a), int(b)) for a, b in heads]
    if not checked:
        raise InputError(f"{what}: expected at least one head, got none")
    for key in checked:
        if not (0 <= key[0] < layers and 0 <= key[1] < h):
            raise InputError(
                f"{what}: head {key} is outside the model's {layers} layers × {h} heads"
            )
    return checked
