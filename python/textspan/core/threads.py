"""The Rust core's thread count: `set_num_threads`, or the environment variable
TEXTSPAN_NUM_THREADS, checked here (the core itself would ignore a bad value silently).

More threads than the machine's processors only slow the core down (2,000 threads made a
tiny TextSpan call take 15 s), so a larger request is capped at that number, with a warning.
"""

from __future__ import annotations

import os
import warnings

import textspan._core as _core

from ..errors import InputError, SettingWarning

__all__ = ["ENVIRONMENT", "get_num_threads", "max_threads", "set_num_threads"]

ENVIRONMENT = "TEXTSPAN_NUM_THREADS"
get_num_threads = _core.get_num_threads


def max_threads() -> int:
    """The processors this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _capped(n: int, source: str) -> int:
    if n > max_threads():
        warnings.warn(
            f"{source}: {n} threads asked for, more than the {max_threads()} processors here; "
            f"using {max_threads()}",
            SettingWarning,
            stacklevel=3,
        )
        return max_threads()
    return n


def set_num_threads(n: int) -> None:
    """The number of threads of the Rust core (0: one per processor; at most that many)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"set_num_threads: expected an integer >= 0, got {n!r}")
    _core.set_num_threads(_capped(n, "set_num_threads"))


def apply_environment() -> None:
    """Checks TEXTSPAN_NUM_THREADS once, at import: a value that is not an integer >= 0 is
    named in a warning and the default used; a value above the processors is capped."""
    value = os.environ.get(ENVIRONMENT)
    if value is None:
        return
    try:
        n = int(value.strip())
        if n < 0:
            raise ValueError
    except ValueError:
        warnings.warn(
            f"{ENVIRONMENT}={value!r}: expected an integer >= 0; using the default (one thread "
            "per processor)",
            SettingWarning,
            stacklevel=2,
        )
        _core.set_num_threads(0)
        return
    _core.set_num_threads(_capped(n, ENVIRONMENT))
