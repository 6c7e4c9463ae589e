"""`textspan explore`: a static site to browse a store's heads, texts and images."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..core.pools import default_pool, default_topics, load_texts
from ..errors import InputError
from ..explorer import Site, build_site, make_server, serve
from ..models import encode_texts, tower_of
from ..store.reader import open_store
from .common import class_names, model_of, output_for, store_options, zero_shot_weights

NAME = "explore"
ORDER = 9  # its place in `textspan --help`
HELP = "a static site to browse the heads, their texts and images"
DESCRIPTION = (
    "Write a site of plain files (it opens from disk and needs no network): an overview of "
    "every head of the last layers coloured by the topic of its TextSpan texts, a page per "
    "head with its texts and the images at the ends of its directions, and a page per "
    "sample image with token maps."
)
TOY_MODELS = ("toy", "toy-spurious")


def add_arguments(p: argparse.ArgumentParser) -> None:
    store_options(p)
    p.add_argument("--images", default=None, help="the store's image folder, if it moved")
    p.add_argument("--pool", default=None, help="text pool, one per line (default: built-in)")
    p.add_argument("--topics", default=None, help="topics, one per line: 'topic: word, word'")
    p.add_argument("--layers", type=int, default=4, help="the last K layers' heads")
    p.add_argument("--samples", type=int, default=6, help="sample image pages")
    p.add_argument("--serve", action="store_true", help="serve the site after writing it")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (with --serve)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (with --serve)")


def main(args: argparse.Namespace) -> int:
    out = output_for(args, "explorer")
    # Bound before the site is built, so that a busy or impossible port is said at once.
    server = make_server(out, host=args.host, port=args.port) if args.serve else None
    try:
        site = _build(args, out)
    except BaseException:
        if server is not None:
            server.server_close()
        raise
    if server is not None:
        serve(server, site.path.parent)
    return 0


def _build(args: argparse.Namespace, out: str) -> Site:
    return run(
        open_store(args.store),
        out,
        images=args.images,
        pool=args.pool,
        topics=args.topics,
        layers=args.layers,
        samples=args.samples,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
    )


def read_topics(path: str | os.PathLike) -> dict[str, list[str]]:
    """Topics from a file of lines 'topic: phrase, phrase, ...'."""
    topics = {}
    for line in load_texts(path):
        name, sep, words = line.partition(":")
        phrases = [w.strip() for w in words.split(",") if w.strip()]
        if not sep or not name.strip() or not phrases:
            raise InputError(f"topics {path}: expected lines 'topic: phrase, phrase', got {line!r}")
        topics[name.strip()] = phrases
    return topics


def _texts_and_topics(store: Any, pool: Any, topics: Any) -> tuple[list[str], dict]:
    """The pool and topics: given, or the toy world's descriptions for a toy store (its
    tokenizer knows only those words), or the built-in pool's."""
    if store.manifest.model in TOY_MODELS and pool is None:
        from ..toy import study
        from ..toy import world as tw

        texts, _ = study.description_pool()
        found = {f: list(tw.NAMES[f]) for f in tw.FACTORS}
    else:
        texts = default_pool() if pool is None else load_texts(pool)
        found = default_topics()
    return texts, read_topics(topics) if topics is not None else found


def run(
    store: Any,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    pool: str | os.PathLike | None = None,
    topics: str | os.PathLike | None = None,
    layers: int = 4,
    samples: int = 6,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Site:
    """Writes the explorer of `store` into `out` → index.html and the pages it links."""
    if samples < 0:
        raise InputError(f"samples: expected a number of images >= 0, got {samples}")
    texts, topic_words = _texts_and_topics(store, pool, topics)
    model, preprocess, tokenizer = model_of(store, device)
    embeddings = encode_texts(model, tokenizer, texts, progress=progress)
    labelled = len(store) and bool(store.classes) and (store.labels >= 0).all()
    classifier = None
    if labelled:
        toy = store.manifest.model in TOY_MODELS
        names = class_names(store.classes, classes_file)
        classifier = zero_shot_weights(model, tokenizer, names, "article" if toy else templates)
    m = store.manifest
    info = {
        "model": f"{m.model} ({type(tower_of(model).module).__name__})",
        "weights": str(
            m.pretrained or ("embedded" if m.model in TOY_MODELS else "random (seeded)")
        ),
        "images": f"{len(store)} from {m.images}"
        + (f", {len(store.skipped)} unreadable skipped" if store.skipped else ""),
        "classes": f"{len(store.classes)}" if store.classes else "none (a flat folder)",
        "heads analysed": f"the last {layers} layers' ({store.heads.shape[2]} per layer)",
        "text pool": f"{len(texts)} texts" + (f" from {pool}" if pool else ""),
    }
    site = build_site(
        store,
        out,
        pool=texts,
        pool_embeddings=embeddings,
        topics=topic_words,
        layers=layers,
        samples=samples,
        images=images,
        model=model,
        preprocess=preprocess,
        classifier=classifier,
        info=info,
        progress=progress,
    )
    print(
        f"explorer: {site.path} ({site.pages} pages, {site.files} files, "
        f"{site.bytes / 1e6:.1f} MB, {site.seconds:.1f} s)"
    )
    return site
