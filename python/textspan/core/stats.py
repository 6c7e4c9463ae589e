"""`HeadStats`: exact streaming statistics of attention-head outputs, the one statistics format
of the package (stores keep it, TextSpan reads it, workers merge it)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

import textspan._core as _core

from ..errors import InputError, InputTypeError
from .checks import as_float_array

__all__ = [
    "HeadStats",
    "batch_stats",
    "device_stats",
    "float32_stats",
    "on_accelerator",
    "unit_roundoff",
]


class HeadStats:
    """Exact streaming statistics of attention-head outputs, in float64.

    Holds the number of outputs seen (`count`), their `mean` [..., D] and their population
    `covariance` [..., D, D] (centred, divided by `count`). The leading `shape` indexes heads:
    one `HeadStats` can hold every head of a model, shape (L, H). TextSpan needs nothing else,
    however many images there are.

    Batches are added with `update` (Chan's pairwise formula: exact up to float64 rounding,
    with no loss from large means), and statistics from different workers or devices add up
    with `merge` or `+`.

    `roundoff` is the unit roundoff of the coarsest precision the outputs were stored in
    before they reached these statistics (2⁻¹¹ for float16, 2⁻⁸ for bfloat16; 0 when they
    were float32 or better): TextSpan treats directions at that rounding noise's level as
    absent (`rank_tolerance`).
    """

    def __init__(self, count: int, mean: Any, covariance: Any, roundoff: float = 0.0) -> None:
        # Views, not copies: indexing the heads of a large HeadStats must stay cheap. Nothing
        # writes into these arrays; `update` replaces them.
        mean = np.asarray(as_float_array(mean, "mean"), dtype=np.float64)
        covariance = np.asarray(as_float_array(covariance, "covariance"), dtype=np.float64)
        if mean.ndim < 1 or covariance.shape != (*mean.shape, mean.shape[-1]):
            raise InputError(
                f"HeadStats: expected mean [..., D] and covariance [..., D, D], got mean "
                f"{list(mean.shape)} and covariance {list(covariance.shape)}"
            )
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise InputError(f"HeadStats: expected an integer count >= 0, got {count!r}")
        if not 0.0 <= float(roundoff) < 1.0:
            raise InputError(f"HeadStats: expected a unit roundoff in [0, 1), got {roundoff!r}")
        self.count = int(count)
        self.mean = mean
        self.covariance = covariance
        self.roundoff = float(roundoff)

    @classmethod
    def zeros(cls, dim: int, shape: tuple[int, ...] = ()) -> HeadStats:
        """Empty statistics (count 0) for heads of width `dim`, one per index of `shape`."""
        return cls(0, np.zeros((*shape, dim)), np.zeros((*shape, dim, dim)))

    @classmethod
    def from_outputs(cls, outputs: Any) -> HeadStats:
        """Statistics of `outputs` [N, ..., D]: N outputs of each head in `...`."""
        return batch_stats(outputs)

    @property
    def shape(self) -> tuple[int, ...]:
        """The head shape, e.g. (L, H); () for one head."""
        return self.mean.shape[:-1]

    @property
    def dim(self) -> int:
        """D, the width of each output."""
        return self.mean.shape[-1]

    @property
    def second_moment(self) -> np.ndarray:
        """The uncentred second moment E[x xᵀ] [..., D, D]."""
        return self.covariance + self.mean[..., :, None] * self.mean[..., None, :]

    def update(self, outputs: Any) -> HeadStats:
        """Adds a batch of outputs [n, ..., D] (in place) and returns self."""
        merged = self.merge(batch_stats(outputs, expect_shape=self.shape, expect_dim=self.dim))
        self.count, self.mean, self.covariance = merged.count, merged.mean, merged.covariance
        self.roundoff = merged.roundoff
        return self

    def merge(self, other: HeadStats) -> HeadStats:
        """The statistics of both sets of outputs together."""
        if not isinstance(other, HeadStats):
            raise InputTypeError(f"merge: expected HeadStats, got {type(other).__name__}")
        if other.mean.shape != self.mean.shape:
            raise InputError(
                f"merge: expected statistics of shape {[*self.shape, self.dim]}, "
                f"got {[*other.shape, other.dim]}"
            )
        roundoff = max(self.roundoff, other.roundoff)
        if other.count == 0:
            return HeadStats(self.count, self.mean, self.covariance, roundoff)
        if self.count == 0:
            return HeadStats(other.count, other.mean, other.covariance, roundoff)
        # Chan, Golub and LeVeque's pairwise update of mean and covariance.
        na, nb = float(self.count), float(other.count)
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        covariance = (
            self.covariance * (na / n)
            + other.covariance * (nb / n)
            + delta[..., :, None] * delta[..., None, :] * (na * nb / n / n)
        )
        return HeadStats(self.count + other.count, mean, covariance, roundoff)

    __add__ = merge

    def __getitem__(self, index: Any) -> HeadStats:
        """The statistics of some heads, e.g. `stats[l, h]`."""
        mean = self.mean[index]
        if np.ndim(mean) < 1:
            raise IndexError(f"HeadStats index {index!r} leaves no output dimension")
        return HeadStats(self.count, mean, self.covariance[index], self.roundoff)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the statistics to `path` exactly (an .npz archive, whatever the name)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                count=self.count,
                mean=self.mean,
                covariance=self.covariance,
                roundoff=self.roundoff,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadStats:
        """Reads statistics written by `save`."""
        with np.load(path) as f:
            roundoff = float(f["roundoff"]) if "roundoff" in f else 0.0
            return cls(int(f["count"]), f["mean"], f["covariance"], roundoff)

    def __repr__(self) -> str:
        return f"HeadStats(count={self.count}, shape={self.shape}, dim={self.dim})"


def batch_stats(
    outputs: Any,
    expect_shape: tuple[int, ...] | None = None,
    expect_dim: int | None = None,
) -> HeadStats:
    """The exact statistics of `outputs` [N, ..., D] (float64 products)."""
    return _moments(outputs, expect_shape, expect_dim, float32_products=False)[0]


def float32_stats(outputs: Any) -> tuple[HeadStats, np.ndarray]:
    """The statistics of `outputs` [N, ..., D] from float32 products summed in float64 (about
    twice as fast as `batch_stats`), and a bound [...] on the spectral norm of each head's
    covariance error. For TextSpan on outputs held in memory, which checks per head that the
    error cannot change the directions kept and otherwise falls back to `batch_stats`."""
    return _moments(outputs, None, None, float32_products=True)


def _moments(
    outputs: Any,
    expect_shape: tuple[int, ...] | None,
    expect_dim: int | None,
    float32_products: bool,
) -> tuple[HeadStats, np.ndarray]:
    roundoff = unit_roundoff(outputs)
    x = as_float_array(outputs, "outputs")
    if x.ndim < 2:
        raise InputError(f"outputs: expected shape [N, ..., D], got {list(x.shape)}")
    heads, dim = x.shape[1:-1], x.shape[-1]
    if 0 in x.shape[1:]:
        raise InputError(
            f"outputs: expected at least one head of width D >= 1, got shape {list(x.shape)}"
        )
    if expect_shape is not None and (heads != expect_shape or dim != expect_dim):
        raise InputError(
            f"outputs: expected shape [n, {', '.join(map(str, (*expect_shape, expect_dim)))}], "
            f"got {list(x.shape)}"
        )
    n = x.shape[0]
    if n == 0:
        return HeadStats.zeros(dim, heads), np.zeros(heads)
    k = int(np.prod(heads, dtype=np.int64))
    means, scatters, errors = _core.batch_moments(
        np.ascontiguousarray(x.reshape(n, k, dim)), float32_products
    )
    scatters /= n  # in place: a covariance per head can be large
    stats = HeadStats(n, means.reshape(*heads, dim), scatters.reshape(*heads, dim, dim), roundoff)
    return stats, errors.reshape(heads) / n


def on_accelerator(x: Any) -> bool:
    """Whether `x` is a PyTorch tensor on a device other than the CPU (a GPU)."""
    device = getattr(x, "device", None)
    return hasattr(x, "detach") and getattr(device, "type", "cpu") != "cpu"


# Elements of one chunk of outputs converted to float64 at a time on the device (256 MiB).
_DEVICE_CHUNK = 2**25


def device_stats(outputs: Any) -> HeadStats:
    """The exact statistics of a PyTorch tensor of outputs [N, ..., D] (any float dtype),
    computed where the tensor lives: the mean and the centred products in float64, a chunk
    of rows at a time, so that only the [..., D, D] statistics cross to the host (for
    outputs on a GPU, where copying them whole would cost more than the products).

    The same statistics as `HeadStats.from_outputs`, up to the order of float64 sums.
    """
    x = outputs.detach()
    if not x.is_floating_point() or x.is_complex():
        raise InputTypeError(f"outputs: expected a float tensor, got dtype {x.dtype}")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise InputError(
            f"outputs: expected shape [N, ..., D] with at least one head of width D >= 1, "
            f"got {list(x.shape)}"
        )
    n, heads, dim = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    if n == 0:
        return HeadStats.zeros(dim, heads)
    flat = x.reshape(n, -1, dim)
    k = flat.shape[1]
    step = max(1, _DEVICE_CHUNK // (k * dim))
    total = flat.new_zeros((k, dim)).double()
    for start in range(0, n, step):
        total += flat[start : start + step].double().sum(0)
    if not bool(total.isfinite().all()):
        # Named by its index on the host, as for any other outputs.
        batch_stats(np.asarray(as_float_array(outputs, "outputs")))
    mean = total / n
    scatter = flat.new_zeros((k, dim, dim)).double()
    for start in range(0, n, step):
        centred = flat[start : start + step].double() - mean
        scatter += centred.permute(1, 2, 0) @ centred.permute(1, 0, 2)
    return HeadStats(
        n,
        mean.reshape(*heads, dim).cpu().numpy(),
        (scatter / n).reshape(*heads, dim, dim).cpu().numpy(),
        unit_roundoff(outputs),
    )


# Unit roundoffs of the storage precisions coarser than float32.
_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def unit_roundoff(x: Any) -> float:
    """The unit roundoff of `x`'s dtype when it is coarser than float32 (float16,
    bfloat16), else 0."""
    return _ROUNDOFF.get(str(getattr(x, "dtype", "")).removeprefix("torch."), 0.0)
