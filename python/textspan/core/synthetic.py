"""Synthetic head outputs with known structure, for tests and benchmarks.

Real attention heads write into a subspace about as wide as the head (64 of 768 dimensions
in ViT-L/14), with a few dominant directions. `low_rank_outputs` makes outputs like that, and
`low_rank_stats` the exact statistics of their distribution.
"""

from __future__ import annotations

import numpy as np

from .stats import HeadStats


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
