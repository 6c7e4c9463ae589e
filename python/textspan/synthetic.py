"""Synthetic head outputs and text pools with known structure, for the demo and benchmarks.

Real attention heads write into a subspace about as wide as the head (64 of 768 dimensions
in ViT-L/14), with a few dominant directions. `low_rank_outputs` makes outputs like that.
`concept_world` builds a small world of factors (colour, shape, position, texture) whose
words have known directions, heads that each encode one factor, and a pool of texts about
them: TextSpan should name each head's factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from .span import HeadStats


def _spectrum(
    rng: np.random.Generator, d: int, signal_rank: int, decay: float
) -> tuple[np.ndarray, np.ndarray]:
    """An orthonormal basis [d, k] of the signal directions and their scales [k]."""
    k = min(signal_rank, d)
    basis, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return basis, np.exp(-decay * np.arange(k)) * (1 + 0.02 * rng.standard_normal(k))


def low_rank_outputs(
    rng: np.random.Generator,
    n: int,
    d: int,
    signal_rank: int,
    noise: float = 1e-3,
    decay: float = 0.08,
    dtype: type = np.float64,
) -> np.ndarray:
    """N outputs [n, d]: `signal_rank` directions with a spectrum decaying as exp(-decay·i),
    a mean offset, and isotropic noise of scale `noise` (0 for exactly low-rank outputs)."""
    basis, scales = _spectrum(rng, d, signal_rank, decay)
    x = (rng.standard_normal((n, len(scales))) * scales) @ basis.T + 0.5 * rng.standard_normal(d)
    if noise:
        x += noise * rng.standard_normal((n, d))
    return x.astype(dtype)


def low_rank_stats(
    rng: np.random.Generator,
    count: int,
    d: int,
    signal_rank: int,
    noise: float = 1e-3,
    decay: float = 0.08,
) -> HeadStats:
    """The exact statistics of the distribution `low_rank_outputs` samples from, as if
    `count` outputs had been seen: for benchmarks over many heads without the outputs."""
    basis, scales = _spectrum(rng, d, signal_rank, decay)
    covariance = (basis * scales**2) @ basis.T + noise**2 * np.eye(d)
    return HeadStats(count, 0.5 * rng.standard_normal(d), covariance)


FACTORS: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
    "shape": ["circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond"],
    "position": [
        "at the top left",
        "at the top right",
        "at the bottom left",
        "at the bottom right",
        "in the centre",
        "at the edge",
    ],
    "texture": ["striped", "dotted", "plain", "checkered", "wavy", "furry"],
}


# The heads of the world and the factors each one writes.
HEADS: dict[str, list[str]] = {
    **{f: [f] for f in FACTORS},
    "colour and shape": ["colour", "shape"],
}


@dataclass
class ConceptWorld:
    """Texts [M] with embeddings [M, D], and head outputs [N, heads, D] of named heads."""

    texts: list[str]
    text_embeddings: np.ndarray
    head_names: list[str]
    outputs: np.ndarray


def concept_world(n_images: int = 2000, dim: int = 128, seed: int = 0) -> ConceptWorld:
    """A world of four factors. Each factor value has a random unit direction; a text's
    embedding is the normalised sum of the directions of the values it names, plus noise.
    Head f writes the direction of the image's value of factor f (times a random gain) into
    a private low-rank subspace of its own, plus noise; a fifth head mixes colour and shape."""
    rng = np.random.default_rng(seed)
    words = {
        (f, v): rng.standard_normal(dim) / np.sqrt(dim) for f, vs in FACTORS.items() for v in vs
    }

    def article(text: str) -> str:
        return ("an " if text[0] in "aeiou" else "a ") + text

    texts: list[str] = []
    parts: list[list[tuple[str, str]]] = []
    for c, s in product(FACTORS["colour"], FACTORS["shape"]):
        texts.append(f"a {c} {s}")
        parts.append([("colour", c), ("shape", s)])
    for t, s, p in product(FACTORS["texture"], FACTORS["shape"], FACTORS["position"]):
        texts.append(f"{article(t)} {s} {p}")
        parts.append([("texture", t), ("shape", s), ("position", p)])
    for c in FACTORS["colour"]:
        texts.append(f"something {c}")
        parts.append([("colour", c)])
    for s in FACTORS["shape"]:
        texts.append(f"{article(s)}")
        parts.append([("shape", s)])
    for p in FACTORS["position"]:
        texts.append(f"an object {p}")
        parts.append([("position", p)])
    for t in FACTORS["texture"]:
        texts.append(f"a {t} pattern")
        parts.append([("texture", t)])
    embeddings = np.stack([sum(words[w] for w in ws) for ws in parts])
    embeddings += 0.05 / np.sqrt(dim) * rng.standard_normal(embeddings.shape)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    draws = {f: rng.integers(len(vs), size=n_images) for f, vs in FACTORS.items()}
    outputs = np.zeros((n_images, len(HEADS), dim))
    for h, factors in enumerate(HEADS.values()):
        for f in factors:
            vectors = np.stack([words[(f, v)] for v in FACTORS[f]])
            gain = 1 + 0.2 * rng.standard_normal(n_images)
            outputs[:, h] += gain[:, None] * vectors[draws[f]]
        outputs[:, h] += 0.02 / np.sqrt(dim) * rng.standard_normal((n_images, dim))
    return ConceptWorld(texts, embeddings, list(HEADS), outputs)
