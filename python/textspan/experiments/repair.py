"""`textspan repair`: removes a spurious feature by mean-ablating the heads whose TextSpan
texts are about it → repair.json, repair.csv, head_scores.csv, repair.png."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import report
from ..analysis import Head, RepairResult, rank_heads, repair
from ..core.pools import load_texts
from ..errors import AnalysisWarning, InputError, MissingFileError
from ..models import encode_texts
from ..store.reader import open_store
from .common import (
    class_names,
    head_spans,
    last_layers,
    model_of,
    output_for,
    pool_texts,
    require_labels,
    span_options,
    store_options,
    template_list,
    zero_shot_weights,
)

NAME = "repair"
ORDER = 5  # its place in `textspan --help`
HELP = "remove a spurious feature by ablating heads"


def add_arguments(p: argparse.ArgumentParser) -> None:
    store_options(p)
    span_options(p, texts=10)
    p.add_argument(
        "--attribute",
        default=None,
        help="spurious attribute per image: .npy of ints or one int per line (default: the "
        "place a Waterbirds store records)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--keywords", help="comma-separated words naming the property")
    what.add_argument("--examples", help="file of example texts about the property")
    p.add_argument("--top", type=int, default=None, help="ablate the N best-scoring heads")
    p.add_argument(
        "--min-score",
        type=float,
        default=0.5,
        help="else ablate heads scoring at least this (default 0.5)",
    )
    p.add_argument("--draws", type=int, default=10, help="random-heads baseline draws")


def main(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    if args.attribute is None and "place" not in store.attributes:
        raise InputError(
            f"--attribute: store {store.path} records no place per image (only Waterbirds "
            "stores do): pass a file of one integer per image"
        )
    attribute = (
        store.attributes["place"]
        if args.attribute is None
        else load_attribute(args.attribute, len(store))
    )
    run(
        store,
        output_for(args, "repair"),
        attribute,
        keywords=args.keywords.split(",") if args.keywords else None,
        examples=load_texts(args.examples) if args.examples else None,
        layers=args.layers,
        top=args.top,
        min_score=args.min_score,
        n_texts=args.texts,
        rank=args.rank,
        pool=args.pool,
        draws=args.draws,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
        seed=args.seed,
    )
    return 0


def load_attribute(path: str | os.PathLike, count: int) -> np.ndarray:
    """A spurious attribute per image: a .npy of integers, or a text file of one per line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"attribute: no such file {path}")
    try:
        if path.suffix == ".npy":
            values = np.load(path)
        else:
            values = np.array([int(t) for t in load_texts(path)])
    except ValueError as e:  # a line that is not an integer, or not a NumPy file
        raise InputError(f"attribute {path}: expected integers, one per image ({e})") from None
    if values.shape != (count,) or not np.issubdtype(values.dtype, np.integer):
        raise InputError(
            f"attribute {path}: expected {count} integers (one per image of the store), got "
            f"{values.dtype} {list(values.shape)}"
        )
    return values


def run(
    store: Any,
    out: str | os.PathLike,
    attribute: Any,
    *,
    keywords: Sequence[str] | None = None,
    examples: Sequence[str] | None = None,
    layers: int = 4,
    top: int | None = None,
    min_score: float = 0.5,
    n_texts: int = 10,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    draws: int = 10,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RepairResult:
    """Removes a spurious feature: ranks the heads of the last `layers` layers by how much
    their TextSpan texts are about the property, mean-ablates the chosen ones (the `top`
    heads, or those scoring at least `min_score`), and reports group accuracies beside the
    random-heads baseline → repair.json, repair.csv, head_scores.csv, repair.png."""
    span_layers = last_layers(store, layers)
    require_labels(store)
    if top is not None and top < 1:
        raise InputError(f"top: expected a number of heads >= 1, got {top}")
    if draws < 0:
        raise InputError(f"draws: expected a number of random draws >= 0, got {draws}")
    attr = np.asarray(attribute)
    if attr.shape != (len(store),):
        raise InputError(
            f"attribute: expected one value per image ({len(store)}), got {list(attr.shape)}"
        )
    if (keywords is None) == (examples is None):
        raise InputError("repair: expected keywords or example texts (one of them)")
    template_list(templates)  # a bad templates file fails now, not after TextSpan
    texts = pool_texts(pool)
    model, _, tokenizer = model_of(store, device)
    keys = [(layer, h) for layer in span_layers for h in range(store.heads.shape[2])]
    embeddings = encode_texts(model, tokenizer, texts, progress=progress)
    depth = min(n_texts, rank, store.heads.shape[-1])
    spans = head_spans(
        store, keys, embeddings, texts=texts, n_texts=depth, rank=rank, progress=progress
    )
    if keywords is not None:
        ranked = rank_heads(spans, keywords=keywords)
    else:
        example_emb = encode_texts(model, tokenizer, list(examples), progress=False)
        ranked = rank_heads(spans, examples=example_emb, pool=embeddings)
    if top is not None:
        chosen = [k for k, _ in ranked[:top]]
        unrelated = [f"L{a}.H{b}" for (a, b), score in ranked[:top] if score == 0]
        if unrelated:
            warnings.warn(
                f"{len(unrelated)} of the top {top} heads ({', '.join(unrelated[:5])}) scored 0: "
                "none of their TextSpan texts is about the property, yet they are ablated",
                AnalysisWarning,
                stacklevel=2,
            )
    else:
        chosen = [k for k, score in ranked if score >= min_score]
    if not chosen:
        (a, b), best = ranked[0]
        raise InputError(
            f"no head scored at least {min_score:g} for the property (best: L{a}.H{b} at "
            f"{best:.3g}); lower --min-score or use --top"
        )
    w = zero_shot_weights(model, tokenizer, class_names(store.classes, classes_file), templates)
    result = repair(
        store, w, attr, chosen, candidates=keys, random_draws=draws, seed=seed, progress=progress
    )
    folder = _write(report.output_folder(out), result, ranked, spans)
    report.repair_plot(folder / "repair.png", result)
    print("heads ablated: " + ", ".join(f"L{a}.H{b}" for a, b in chosen))
    print(result.table())
    print(f"written: {folder}")
    return result


def _write(
    folder: Path, result: RepairResult, ranked: list[tuple[Head, float]], spans: dict[Head, Any]
) -> Path:
    """head_scores.csv, repair.csv and repair.json."""
    report.write_csv(
        folder / "head_scores.csv",
        ["layer", "head", "score", "chosen", "texts"],
        [[k[0], k[1], s, k in result.heads, " | ".join(spans[k].texts or [])] for k, s in ranked],
    )
    named = [("before", result.before), ("after", result.after)]
    if result.random_draws:  # no random baseline without draws
        named.append(("random_best", result.random_best))
    report.write_csv(
        folder / "repair.csv",
        ["class", "attribute", *(name for name, _ in named)],
        [[y, a, *(g.groups[(y, a)] for _, g in named)] for y, a in result.before.groups],
    )
    report.write_json(
        folder / "repair.json",
        {
            "heads": [list(k) for k in result.heads],
            **{name: {"worst_group": g.worst, "average": g.average} for name, g in named},
            "random_draws": [
                {"heads": [list(k) for k in d], "worst_group": g.worst, "average": g.average}
                for d, g in result.random_draws
            ],
        },
    )
    return folder
