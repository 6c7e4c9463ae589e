"""Type stubs of the compiled Rust core (`rust/python.rs`)."""

import numpy as np
import numpy.typing as npt

RANK_TOLERANCE: float

class TextPool:
    """A text pool held once on the Rust side: rows copied and scaled to unit norm."""

    def __init__(self, embeddings: npt.NDArray[np.float32] | npt.NDArray[np.float64]) -> None: ...
    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...

def text_span_heads(
    pool: TextPool,
    counts: npt.NDArray[np.float64],
    means: npt.NDArray[np.float64],
    covariances: npt.NDArray[np.float64],
    n_texts: int,
    rank: int,
) -> list[tuple[list[int], npt.NDArray[np.float64], float, npt.NDArray[np.float64], int]]: ...
def batch_moments(
    x: npt.NDArray[np.float32] | npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
