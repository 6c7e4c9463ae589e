"""The experiments end to end, one module per `textspan` command: its name (`NAME`), its place
in `textspan --help` (`ORDER`), its arguments (`add_arguments`), its command-line entry
(`main`) and its Python entry (`run`, for those that write an output folder), e.g.

    store = textspan.open_store("stores/val")
    textspan.experiments.span.run(store, "out/span", layers=4)

The commands are discovered: every module of this package with a `NAME` is one, so a new
command is a new module. The command line (`textspan.cli`) is assembled from `COMMANDS`.
"""

import importlib
import pkgutil
from types import ModuleType

from .common import class_names


def _discover() -> tuple[ModuleType, ...]:
    modules = [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    ]
    return tuple(sorted((m for m in modules if hasattr(m, "NAME")), key=lambda m: m.ORDER))


COMMANDS = _discover()

__all__ = ["COMMANDS", "class_names", *(m.__name__.rsplit(".", 1)[1] for m in COMMANDS)]
