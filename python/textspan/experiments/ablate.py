"""`textspan ablate`: the mean-ablation study of a store → ablation.csv, ablation_layers.csv,
ablation.png."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from .. import report
from ..analysis import AblationResult, ablation
from ..store.reader import open_store
from .common import (
    class_names,
    model_of,
    output_for,
    require_labels,
    store_options,
    zero_shot_weights,
)

NAME = "ablate"
ORDER = 3  # its place in `textspan --help`
HELP = "mean-ablation study: accuracy without MLPs, class token, early layers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    store_options(p)
    p.add_argument(
        "--means",
        default=None,
        help="a store to take the means from (default: the same store, as in the paper)",
    )


def main(args: argparse.Namespace) -> int:
    run(
        open_store(args.store),
        output_for(args, "ablation"),
        means=open_store(args.means) if args.means else None,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
    )
    return 0


def run(
    store: Any,
    out: str | os.PathLike,
    *,
    means: Any = None,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> AblationResult:
    """Mean-ablation study → ablation.csv, ablation_layers.csv, ablation.png."""
    require_labels(store)
    model, _, tokenizer = model_of(store, device)
    w = zero_shot_weights(model, tokenizer, class_names(store.classes, classes_file), templates)
    result = ablation(store, w, means=means, progress=progress)
    folder = report.output_folder(out)
    report.write_csv(
        folder / "ablation.csv",
        ["condition", "accuracy", "mean-ablated", "convention"],
        [(k, v, result.definitions[k], result.convention) for k, v in result.conditions.items()],
    )
    layers = np.arange(len(result.layers))
    report.write_csv(
        folder / "ablation_layers.csv",
        ["attention_layers_mean_ablated", "accuracy"],
        zip(layers, result.layers, strict=True),
    )
    report.line_plot(
        folder / "ablation.png",
        {"attention layers 0..k−1 mean-ablated": (layers, result.layers)},
        "attention layers mean-ablated, from the first",
        "zero-shot accuracy",
        f"Mean-ablation ({result.count} images, {result.convention} convention)",
        hlines={k: v for k, v in result.conditions.items() if k != "baseline"},
    )
    print(result.table())
    print(f"written: {folder}")
    return result
