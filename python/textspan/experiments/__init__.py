"""The experiments end to end, one module per `textspan` command: its arguments
(`add_arguments`), its command-line entry (`main`) and its Python entry (`run`, for those
that write an output folder), e.g.

    store = textspan.open_store("stores/val")
    textspan.experiments.span.run(store, "out/span", layers=4)

The command line (`textspan.cli`) is assembled from `COMMANDS`.
"""

from . import (
    ablate,
    catalogue,
    demo,
    explore,
    extract,
    repair,
    reproduce,
    retrieve,
    segment,
    span,
    toy_data,
    toy_train,
)
from .common import class_names

# In the order `textspan --help` lists them.
COMMANDS = (
    demo,
    extract,
    ablate,
    span,
    repair,
    retrieve,
    segment,
    reproduce,
    explore,
    catalogue,
    toy_train,
    toy_data,
)

__all__ = [
    "COMMANDS",
    "ablate",
    "class_names",
    "demo",
    "explore",
    "extract",
    "repair",
    "reproduce",
    "retrieve",
    "segment",
    "span",
    "toy_data",
    "toy_train",
]
