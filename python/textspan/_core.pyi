"""Type stubs of the compiled Rust core (`rust/python/src/lib.rs`), checked against the built
module by `stubtest` in `make test`."""

from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "RANK_TOLERANCE",
    "HeadSpan",
    "TextPool",
    "batch_moments",
    "check_heads",
    "class_heatmaps",
    "get_num_threads",
    "normalised_heatmaps",
    "segmentation_scores",
    "set_num_threads",
    "text_span_heads",
]

RANK_TOLERANCE: float

@final
class TextPool:
    """A text pool held once on the Rust side: rows copied and scaled to unit norm."""

    def __new__(
        cls,
        embeddings: npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.float16],
    ) -> TextPool: ...
    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...

@final
class HeadSpan:
    """One head's TextSpan, as the core found it."""

    @property
    def indices(self) -> list[int]: ...
    @property
    def variance(self) -> npt.NDArray[np.float64]: ...
    @property
    def total_variance(self) -> float: ...
    @property
    def directions(self) -> npt.NDArray[np.float64]: ...
    @property
    def rank(self) -> int: ...
    @property
    def numerical_rank(self) -> int: ...
    @property
    def certified(self) -> bool: ...

def text_span_heads(
    pool: TextPool,
    counts: npt.NDArray[np.float64],
    means: npt.NDArray[np.float64],
    covariances: npt.NDArray[np.float64],
    rank_tolerances: npt.NDArray[np.float64],
    n_texts: int,
    rank: int,
    exact_rank: bool = False,
    covariance_errors: npt.NDArray[np.float64] | None = None,
    outputs: npt.NDArray[np.float32] | None = None,
) -> list[HeadSpan]: ...
def check_heads(
    counts: list[float],
    means: list[npt.NDArray[np.float64]],
    covariances: list[npt.NDArray[np.float64]],
    dim: int,
) -> None: ...
def batch_moments(
    x: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    float32_products: bool = False,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def class_heatmaps(
    scores: npt.NDArray[np.float32], classes: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]: ...
def normalised_heatmaps(
    maps: npt.NDArray[np.float64], height: int, width: int, paper: bool = False
) -> npt.NDArray[np.float64]: ...
def segmentation_scores(
    maps: npt.NDArray[np.float64], masks: npt.NDArray[np.uint8], paper: bool = False
) -> tuple[float, float, float]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
