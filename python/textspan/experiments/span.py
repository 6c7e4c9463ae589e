"""`textspan span`: TextSpan for every head of the last layers, from the store's statistics →
span.json, span.md, span.html; then the replacement study → replacement.csv,
replacement.png."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import report
from ..analysis import Head, ReplacementResult, replacement
from ..core.pools import common_words, load_texts
from ..core.span import SpanResult
from ..errors import InputError
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

NAME = "span"
ORDER = 4  # its place in `textspan --help`
HELP = "TextSpan for the last layers' heads, and the replacement study"


def add_arguments(p: argparse.ArgumentParser) -> None:
    store_options(p)
    span_options(p, texts=10)
    p.add_argument(
        "--words",
        default=None,
        help="word pool of the baseline (default: the built-in pool's vocabulary)",
    )
    p.add_argument("--max-texts", type=int, default=60, help="replacement: up to n texts per head")
    p.add_argument("--no-replacement", action="store_true", help="TextSpan only")


def main(args: argparse.Namespace) -> int:
    run(
        open_store(args.store),
        output_for(args, "span"),
        layers=args.layers,
        n_texts=args.texts,
        rank=args.rank,
        pool=args.pool,
        words=args.words,
        max_texts=args.max_texts,
        replace=not args.no_replacement,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
        seed=args.seed,
    )
    return 0


@dataclass
class SpanStudy:
    """TextSpan per head, and the replacement curve per pool (None with `replace=False`)."""

    spans: dict[Head, SpanResult]
    replacement: dict[str, ReplacementResult] | None


def _head_record(key: tuple[int, int], span: SpanResult, shown: int) -> dict[str, Any]:
    return {
        "layer": key[0],
        "head": key[1],
        "texts": (span.texts or [])[:shown],
        "explained_each": span.explained[:shown].tolist(),
        "explained": float(span.explained[:shown].sum()),
        "total_variance": span.total_variance,
        "rank": span.rank,
        "stable": None if span.stable is None else min(span.stable, shown),
        "convention": span.convention,
    }


def run(
    store: Any,
    out: str | os.PathLike,
    *,
    layers: int = 4,
    n_texts: int = 10,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    words: str | os.PathLike | None = None,
    max_texts: int = 60,
    replace: bool = True,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    classifier: np.ndarray | None = None,
) -> SpanStudy:
    """TextSpan for every head of the last `layers` layers → span.json, span.md, span.html;
    and the replacement study for the text pool, common words and random directions →
    replacement.csv, replacement.png. `classifier` [D, C] replaces the one built from the
    class names."""
    span_layers = last_layers(store, layers)
    if n_texts < 1 or max_texts < 1:
        raise InputError(f"n_texts and max_texts: expected >= 1, got {n_texts} and {max_texts}")
    if replace:
        require_labels(store)
        template_list(templates)  # a bad templates file fails now, not after TextSpan
    texts = pool_texts(pool)
    word_list = common_words() if words is None else load_texts(words)
    model, _, tokenizer = model_of(store, device)
    dim = store.heads.shape[-1]
    depth = min(max(n_texts, max_texts if replace else 0), rank, dim, len(texts), len(word_list))
    keys = [(layer, h) for layer in span_layers for h in range(store.heads.shape[2])]
    embeddings = encode_texts(model, tokenizer, texts, progress=progress)
    spans = head_spans(
        store,
        keys,
        embeddings,
        texts=texts,
        n_texts=max(n_texts, depth),
        rank=rank,
        progress=progress,
    )
    folder = report.output_folder(out)
    records = [_head_record(k, s, n_texts) for k, s in spans.items()]
    report.write_json(folder / "span.json", {"pool_size": len(texts), "heads": records})
    (folder / "span.md").write_text(report.span_markdown(records))
    unstable = [r for r in records if r["stable"] is not None and r["stable"] < len(r["texts"])]
    if unstable:
        print(
            f"{len(unstable)} of {len(records)} heads: picks past position "
            f"{min(r['stable'] for r in unstable)} (at the earliest) were decided by rounding "
            "(marked in span.md)"
        )
    (folder / "span.html").write_text(report.span_html(records, "TextSpan: each head in words"))
    for r in records[: min(4, len(records))]:
        print(f"L{r['layer']}.H{r['head']}: " + "; ".join(r["texts"][:5]))
    curves = None
    if replace:
        w = classifier
        if w is None:
            names = class_names(store.classes, classes_file)
            w = zero_shot_weights(model, tokenizer, names, templates)
        words_embedded = encode_texts(model, tokenizer, word_list, progress=progress)
        random_dirs = np.random.default_rng(seed).standard_normal((len(texts), dim))
        pools = {
            "text pool": spans,
            "common words": head_spans(
                store,
                keys,
                words_embedded,
                texts=word_list,
                n_texts=depth,
                rank=rank,
                progress=progress,
                stability=False,
            ),
            "random directions": head_spans(
                store,
                keys,
                random_dirs.astype(np.float32),
                texts=None,
                n_texts=depth,
                rank=rank,
                progress=progress,
                stability=False,
            ),
        }
        curves = _replacement_study(store, w, pools, folder, layers, progress)
    print(f"written: {folder}")
    return SpanStudy(spans, curves)


def _replacement_study(
    store: Any,
    w: np.ndarray,
    pools: dict[str, dict[Head, SpanResult]],
    folder: Path,
    layers: int,
    progress: bool,
) -> dict[str, ReplacementResult]:
    """Each pool's replacement curve → replacement.csv, replacement.png."""
    # Up to the texts every pool yielded (a head's span may be narrower than asked for).
    depth = min(max(len(r) for r in s.values()) for s in pools.values())
    curves = {
        name: replacement(store, w, s, max_texts=depth, progress=progress)
        for name, s in pools.items()
    }
    baseline = next(iter(curves.values())).baseline
    n = curves["text pool"].n_texts
    report.write_csv(
        folder / "replacement.csv",
        ["n_texts", *curves],
        [[int(i), *(float(c.accuracy[i]) for c in curves.values())] for i in n],
    )
    report.line_plot(
        folder / "replacement.png",
        {name: (c.n_texts, c.accuracy) for name, c in curves.items()},
        "texts per head (n)",
        "zero-shot accuracy",
        f"Last {layers} layers' heads replaced by n-text reconstructions",
        hlines={"baseline": baseline},
    )
    print(
        f"replacement with {depth} texts per head: "
        + ", ".join(f"{k} {c.accuracy[-1]:.2%}" for k, c in curves.items())
        + f" (baseline {baseline:.2%})"
    )
    return curves
