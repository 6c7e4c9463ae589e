"""Input checks shared by the public API: arrays in, clear errors out."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from ..errors import InputError, InputTypeError


def as_float_array(x: Any, name: str) -> np.ndarray:
    """`x` as a float32 or float64 NumPy array (a view where possible).

    NumPy arrays, PyTorch tensors (any device) and nested sequences are accepted. float16 and
    bfloat16 become float32; integer, boolean and complex inputs are refused.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype.kind == "f" and not a.dtype.isnative:  # big-endian data, from a file
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.float32, np.float64):
        return a
    if a.dtype == np.float16:
        return a.astype(np.float32)
    raise InputTypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")


def check_ndim(a: np.ndarray, name: str, ndim: int | tuple[int, ...], layout: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in allowed:
        raise InputError(f"{name}: expected shape {layout}, got {list(a.shape)}")


def check_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InputError(f"{name}: expected finite values, got NaN or Inf at index {list(where)}")


# The decomposition's conventions (see `textspan.models.decompose`): textspan's own first, the
# default everywhere; "paper" gives the numbers of Gandelsman et al.'s code.
Convention = Literal["textspan", "paper"]
CONVENTIONS: tuple[Convention, ...] = get_args(Convention)


def check_convention(convention: Any) -> Convention:
    """The convention, or an InputError naming the choices."""
    if convention not in CONVENTIONS:
        raise InputError(
            f"convention: expected one of {', '.join(map(repr, CONVENTIONS))}, got {convention!r}"
        )
    return convention
