"""Head statistics as they accumulate during an extraction: float64 sums about a fixed shift,
on the model's device, saved at each checkpoint and turned into `HeadStats` at the end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..core.stats import HeadStats

__all__ = ["DeviceStats", "save_sums", "stats_from_sums"]


class DeviceStats:
    """Per-head sums about a fixed shift s, in float64 on the model's device: the count,
    Σ(x − s) and Σ(x − s)(x − s)ᵀ. One in-place batched product per batch. The shift is the
    first batch's mean, close to the final mean, so the covariance recovered at the end does
    not cancel catastrophically."""

    def __init__(self, shape: tuple[int, int], dim: int, device: torch.device) -> None:
        self.shape, self.dim, self.device = shape, dim, device
        self.count = 0
        self.shift = torch.zeros(*shape, dim, dtype=torch.float64, device=device)
        self.sum1 = torch.zeros_like(self.shift)
        self.sum2 = torch.zeros(*shape, dim, dim, dtype=torch.float64, device=device)

    def update(self, heads: torch.Tensor) -> None:
        x = heads.to(torch.float64)
        n = x.shape[0]
        if self.count == 0:
            self.shift = x.mean(0)
        centred = (x - self.shift).reshape(n, -1, self.dim).transpose(0, 1)  # [LH, n, D]
        self.sum1 += centred.sum(1).view_as(self.sum1)
        self.sum2.view(-1, self.dim, self.dim).baddbmm_(centred.transpose(1, 2), centred)
        self.count += n

    def add(self, other: HeadStats) -> None:
        """`other`'s statistics added to these sums, about the same shift: its rows x add
        Σ(x − s) = n (m − s) and Σ(x − s)(x − s)ᵀ = n (C + (m − s)(m − s)ᵀ), in place. The
        first statistics added set the shift to their mean."""
        n = other.count
        if not n:
            return
        mean = torch.as_tensor(other.mean, dtype=torch.float64, device=self.device)
        covariance = torch.as_tensor(other.covariance, dtype=torch.float64, device=self.device)
        if self.count == 0:
            self.shift = mean.clone()
        d = mean - self.shift
        self.sum1 += n * d
        self.sum2 += n * covariance
        self.sum2 += n * d[..., :, None] * d[..., None, :]
        self.count += n

    def state(self) -> dict[str, np.ndarray]:
        return {
            "count": np.array(self.count),
            **{k: getattr(self, k).cpu().numpy() for k in ("shift", "sum1", "sum2")},
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.count = int(state["count"])
        for k in ("shift", "sum1", "sum2"):
            setattr(self, k, torch.as_tensor(state[k], dtype=torch.float64, device=self.device))


def stats_from_sums(state: dict[str, np.ndarray]) -> HeadStats:
    """HeadStats from the count, shift and shifted sums that `DeviceStats` keeps."""
    n = int(state["count"])
    offset = state["sum1"] / n
    covariance = state["sum2"] / n - offset[..., :, None] * offset[..., None, :]
    return HeadStats(n, state["shift"] + offset, covariance)


def save_sums(path: Path, state: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **state)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
