"""The package's exceptions and warnings: one base each, a few kinds.

Every error textspan raises on purpose is a `TextspanError`; the command line prints such an
error as one line and exits with status 2, and anything else (a bug) with its traceback.
The kinds also derive from the built-in exception a caller would expect, so
`except ValueError` keeps working for bad input. The Rust core raises `InputError` for bad
input and `NumericalError` when a computation fails (mapped in one place,
`rust/python/src/lib.rs`).

Every warning is a `TextspanWarning` of one kind, so that a caller can silence one kind
(`warnings.simplefilter("ignore", textspan.FewerTextsWarning)`) and keep the others.
"""

from __future__ import annotations

__all__ = [
    "AnalysisWarning",
    "DataWarning",
    "FewerTextsWarning",
    "InputError",
    "InputTypeError",
    "MissingDependencyError",
    "MissingFileError",
    "NumericalError",
    "RoundingWarning",
    "SettingWarning",
    "SkippedImagesWarning",
    "StoreError",
    "TextspanError",
    "TextspanWarning",
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


class NumericalError(TextspanError, ArithmeticError):
    """A computation that did not succeed on valid input (an eigensolver that did not
    converge): not the caller's input, so not an `InputError`."""


class TextspanWarning(UserWarning):
    """Base class of every warning textspan gives."""


class SkippedImagesWarning(TextspanWarning):
    """Unreadable images were skipped (and recorded in the store)."""


class DataWarning(TextspanWarning):
    """A dataset that looks incomplete or mislabelled (ImageNet with missing images)."""


class RoundingWarning(TextspanWarning):
    """A result that depends on rounding: the paper's convention asked for more directions
    than a head's outputs have above rounding noise."""


class FewerTextsWarning(TextspanWarning):
    """A head's span was used up before `n_texts` texts were found."""


class SettingWarning(TextspanWarning):
    """A setting that was adjusted or ignored (a thread count capped, a bad environment
    variable)."""


class AnalysisWarning(TextspanWarning):
    """A result to read with care (heads ablated that are unrelated to the property)."""
