"""`textspan retrieve`: images by the contribution of chosen heads — neighbours of an image,
or the images a head writes furthest along a text → retrieval.json, retrieval.png."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import report
from ..analysis import Retrieval, retrieve
from ..datasets import reader_of
from ..errors import InputError
from ..models import encode_texts
from ..store.images import open_file
from ..store.reader import open_store
from .common import head_spans, model_of, output_for, pool_texts, store_options

NAME = "retrieve"
ORDER = 6  # its place in `textspan --help`
HELP = "images by a head's property"


def add_arguments(p: argparse.ArgumentParser) -> None:
    store_options(p)
    p.add_argument("--head", action="append", required=True, help="LAYER.HEAD (repeatable)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=int, help="index of the query image in the store")
    query.add_argument("--text", help="a text query")
    p.add_argument("--k", type=int, default=9, help="results")
    p.add_argument(
        "--project",
        type=int,
        default=0,
        help="project on the span of each head's first N TextSpan directions",
    )
    p.add_argument("--rank", type=int, default=80)
    p.add_argument("--pool", default=None, help="text pool for --project")


def main(args: argparse.Namespace) -> int:
    run(
        open_store(args.store),
        output_for(args, "retrieval"),
        [parse_head(h) for h in args.head],
        image=args.image,
        text=args.text,
        k=args.k,
        project=args.project,
        rank=args.rank,
        pool=args.pool,
        device=args.device,
    )
    return 0


def parse_head(text: str) -> tuple[int, int]:
    """ "L.H" or "L,H" → (L, H)."""
    m = re.fullmatch(r"\s*L?(\d+)\s*[.,:]\s*H?(\d+)\s*", text)
    if not m:
        raise InputError(f"head: expected LAYER.HEAD such as 11.4, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run(
    store: Any,
    out: str | os.PathLike,
    heads: Sequence[tuple[int, int]],
    *,
    image: int | None = None,
    text: str | None = None,
    k: int = 9,
    project: int = 0,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Retrieval:
    """Nearest neighbours of an image, or the best images for a text, by the chosen heads'
    contributions (projected on the span of their first `project` TextSpan directions when
    `project` > 0) → retrieval.json, retrieval.png."""
    if (image is None) == (text is None):
        raise InputError("retrieve: expected an image index or a text query (one of them)")
    heads = [tuple(h) for h in heads]
    model = tokenizer = None
    if text is not None or project:
        model, _, tokenizer = model_of(store, device)

    basis = None
    if project:
        texts = pool_texts(pool)
        emb = encode_texts(model, tokenizer, texts, progress=progress)
        depth = min(project, rank, store.heads.shape[-1])
        spans = head_spans(
            store, heads, emb, texts=texts, n_texts=depth, rank=rank, progress=progress
        )
        basis = np.linalg.qr(np.concatenate([s.directions for s in spans.values()]).T)[0].T
    query = image if text is None else encode_texts(model, tokenizer, [text], progress=False)[0]
    found = retrieve(store, heads, query, k=k, basis=basis, progress=progress)
    folder = report.output_folder(out)
    root = Path(store.manifest.images)
    files = [store.files[i] for i in found.indices]
    report.write_json(
        folder / "retrieval.json",
        {
            "heads": [list(h) for h in heads],
            "image": image,
            "text": text,
            "results": [
                {"index": int(i), "file": f, "score": float(s)}
                for i, f, s in zip(found.indices, files, found.scores, strict=True)
            ],
        },
    )
    head_names = ", ".join(f"L{a}.H{b}" for a, b in heads)
    read = reader_of(store.manifest.dataset)
    shown = [
        f"{root / f}" if read is open_file else report.crop_rgb(read(root, f), 160)
        for f in ([store.files[image]] if image is not None else []) + files
    ]
    captions = (["query"] if image is not None else []) + [
        f"#{i}  {s:.3f}" for i, s in zip(found.indices, found.scores, strict=True)
    ]
    try:
        report.image_grid(
            folder / "retrieval.png",
            shown,
            captions,
            f"{head_names}: " + (f"neighbours of image {image}" if text is None else f"“{text}”"),
        )
    except FileNotFoundError as e:
        print(f"no image grid: the store's images are not at {root} ({e})")
    for i, f, s in zip(found.indices, files, found.scores, strict=True):
        print(f"{s:8.4f}  #{i}  {f}")
    print(f"written: {folder}")
    return found
