"""What the experiments share: the model of a store, class names and templates, zero-shot
weights, text pools, the heads' TextSpan from a store's statistics, and the command-line
options several commands take."""

from __future__ import annotations

import argparse
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.pools import default_pool, load_texts
from ..core.span import SpanResult, text_span_heads
from ..errors import FewerTextsWarning, InputError, RoundingWarning
from ..models import imagenet_names, load, zero_shot_classifier

__all__ = [
    "TEMPLATE_SETS",
    "class_names",
    "head_spans",
    "last_layers",
    "model_of",
    "model_options",
    "output_for",
    "pool_texts",
    "require_labels",
    "span_options",
    "store_options",
    "template_list",
    "zero_shot_weights",
]


def model_of(store: Any, device: str | None) -> tuple[Any, Any, Any]:
    m = store.manifest
    return load(m.model, pretrained=m.pretrained, device=device, precision=m.precision)


def class_names(folders: Sequence[str], classes_file: str | os.PathLike | None = None) -> list[str]:
    """Class names for a classifier, one per class folder: one per line of `classes_file`;
    "imagenet": open_clip's ImageNet names, each synset folder (n01440764 …) named by its
    synset (any subset of the 1000), all 1000 when there are no folders; without a file,
    synset folders become their ImageNet names and other names have underscores replaced by
    spaces."""
    synsets = bool(folders) and all(re.fullmatch(r"n\d{8}", f) for f in folders)
    if str(classes_file) == "imagenet" or (classes_file is None and synsets):
        if synsets:
            return imagenet_names(folders)
        if folders:
            raise InputError(
                f"--classes imagenet: expected ImageNet synset folders (n01440764 …), got "
                f"folders such as {folders[0]!r}; pass a file of class names instead"
            )
        return imagenet_names()
    if classes_file is not None:
        names = load_texts(classes_file)
        if folders and len(names) != len(folders):
            raise InputError(
                f"classes file {classes_file}: expected {len(folders)} names (one per class "
                f"folder), got {len(names)}"
            )
        return names
    if not folders:
        raise InputError("classes: the images have no class folders; pass a classes file")
    return [f.replace("_", " ") for f in folders]


TEMPLATE_SETS = {
    "simple": ["a photo of a {}."],
    "article": ["a {}"],  # for the toy model, whose tokenizer knows only the world's words
}


def template_list(templates: str | None) -> list[str] | None:
    if templates in (None, "openai"):
        return None  # open_clip's OpenAI ImageNet templates
    if templates in TEMPLATE_SETS:
        return TEMPLATE_SETS[templates]
    found = load_texts(templates)
    if not all("{}" in t for t in found):
        raise InputError(f"templates {templates}: expected every line to contain '{{}}'")
    return found


def zero_shot_weights(
    model: Any, tokenizer: Any, names: list[str], templates: str | None
) -> np.ndarray:
    return zero_shot_classifier(model, tokenizer, names, template_list(templates))


def require_labels(store: Any) -> None:
    if len(store) == 0:
        raise InputError(f"store {store.path} is empty")
    if (np.asarray(store.labels) < 0).any():
        raise InputError(
            f"store {store.path}: accuracy needs a class label per image, but its images were "
            "extracted from a flat folder (labels -1). Extract an ImageFolder layout."
        )


def last_layers(store: Any, layers: int) -> range:
    total = store.heads.shape[1]
    if not 1 <= layers <= total:
        raise InputError(f"layers: expected 1..{total} (the model's layers), got {layers}")
    return range(total - layers, total)


def pool_texts(pool: str | os.PathLike | None) -> list[str]:
    return default_pool() if pool is None else load_texts(pool)


def head_spans(
    store: Any,
    heads: list[tuple[int, int]],
    embeddings: np.ndarray,
    *,
    texts: list[str] | None,
    n_texts: int,
    rank: int,
    progress: bool,
    stability: bool = True,
) -> dict[tuple[int, int], SpanResult]:
    """TextSpan of the store's heads in the store's convention (`stability`: measure how
    many picks survive rounding, `SpanResult.stable`)."""
    stats = [store.stats[layer, head] for layer, head in heads]
    with warnings.catch_warnings():
        # A head spans at most its value width (64 in ViT-B/16), so asking for more texts
        # than that is expected here; the tables show how many each head yielded, and (the
        # paper's convention) up to which pick its list is stable.
        warnings.simplefilter("ignore", FewerTextsWarning)
        warnings.simplefilter("ignore", RoundingWarning)
        found = text_span_heads(
            stats,
            embeddings,
            n_texts=n_texts,
            rank=rank,
            texts=texts,
            progress=progress,
            convention=store.convention,
            stability=stability,
        )
    return dict(zip(heads, found, strict=True))


def store_options(p: argparse.ArgumentParser, store: bool = True) -> None:
    """The store, output folder, device, classes and templates options."""
    if store:
        p.add_argument("store", help="a store made by `textspan extract`")
    p.add_argument("--out", default=None, help="output folder (default: next to the store)")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument(
        "--classes",
        default=None,
        help="class names, one per line ('imagenet': ImageNet's); default: the class folder names",
    )
    p.add_argument(
        "--templates",
        default="openai",
        help="'openai' (80 ImageNet templates), 'simple', 'article' ('a {}'), or a file of "
        "templates with {}",
    )


def span_options(p: argparse.ArgumentParser, texts: int) -> None:
    """The options of TextSpan over the last layers' heads."""
    p.add_argument("--layers", type=int, default=4, help="the last K layers' heads")
    p.add_argument("--texts", type=int, default=texts, help="texts per head")
    p.add_argument("--rank", type=int, default=80, help="rank of the span of each head")
    p.add_argument(
        "--pool", default=None, help="text pool, one per line (default: the built-in descriptions)"
    )
    p.add_argument("--seed", type=int, default=0)


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or config .json")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--precision", default="fp32", help="model precision (open_clip's names)")


def output_for(args: argparse.Namespace, suffix: str) -> str:
    """--out, or a folder beside the store named after the experiment."""
    return args.out or f"{args.store.rstrip('/')}-{suffix}"
