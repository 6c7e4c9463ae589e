"""The package's exceptions: one base, a few kinds.

Every error textspan raises on purpose is a `TextspanError`; the command line prints such an
error as one line and exits with status 2, and anything else (a bug) with its traceback.
The kinds also derive from the built-in exception a caller would expect, so
`except ValueError` keeps working for bad input. The Rust core raises `InputError` (mapped in
one place, `rust/python/src/lib.rs`).
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "InputTypeError",
    "MissingDependencyError",
    "MissingFileError",
    "StoreError",
    "TextspanError",
    "UnreadableImageError",
    "UnsupportedModelError",
]


class TextspanError(Exception):
    """Base class of every error textspan raises on purpose."""


class InputError(TextspanError, ValueError):
    """An argument, array, file or folder that is not what was expected; the message says
    what was expected and what was given."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong type or dtype (an integer array where floats are needed, …)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder named as input does not exist."""


class UnreadableImageError(InputError):
    """An image file that cannot be decoded (truncated, empty, or not an image)."""


class UnsupportedModelError(InputError):
    """The model's image tower cannot be decomposed exactly by this library."""


class StoreError(TextspanError):
    """A store that is missing, incomplete, corrupt, or made with other arguments."""


class MissingDependencyError(TextspanError, ImportError):
    """An optional dependency (PyTorch, open_clip, Ray) is not installed; the message says
    which extra installs it."""
