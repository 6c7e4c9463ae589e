"""The engines that run the model over many images or texts: this process (`LocalEngine`) or a
Ray cluster (`RayEngine`). An engine is an object holding its own options, passed to
`extract` and `encode_texts`; nothing below this tier imports Ray, and `ray.py` imports it
only when a `RayEngine` runs.

The engines only decompose: they hand rows to the store's writer (`textspan.store.writer`),
which owns the files, so a store begun by one engine is finished by the other."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.checks import Convention, check_convention
from ..datasets import ImageSet, open_images
from ..errors import InputError
from ..store.reader import StoreReader
from .job import ExtractJob
from .local import LocalEngine
from .ray import RayEngine

__all__ = ["Engine", "LocalEngine", "RayEngine", "encode_texts", "engine_named", "extract"]

Engine = LocalEngine | RayEngine


def _checked_engine(engine: Any) -> Engine:
    if engine is None:
        return LocalEngine()
    if not isinstance(engine, LocalEngine | RayEngine):
        raise InputError(f"engine: expected LocalEngine(...) or RayEngine(...), got {engine!r:.80}")
    return engine


def engine_named(name: str, **options: Any) -> Engine:
    """The engine called `name` ("local" or "ray") with the `options` it takes; options
    that are None keep their defaults (the command line's flags)."""
    kinds = {"local": LocalEngine, "ray": RayEngine}
    if name not in kinds:
        raise InputError(f"engine: expected 'local' or 'ray', got {name!r}")
    return kinds[name](**{k: v for k, v in options.items() if v is not None})


def extract(
    images: str | os.PathLike | ImageSet,
    out: str | os.PathLike,
    *,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    precision: str = "fp32",
    dtype: str = "float16",
    convention: Convention = "textspan",
    batch_size: int = 64,
    strict: bool = False,
    engine: Engine | None = None,
    progress: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> StoreReader:
    """Decomposes every image under `images` into a store in `out`, resuming if it exists.

    Args:
        images: an ImageFolder-layout folder (labels from sub-folders), a flat folder, a
            dataset spec ("imagenet:ROOT", "waterbirds:ROOT:SPLIT", "webdataset:GLOB"; see
            `textspan.datasets`) or an `ImageSet`.
        out: the store's folder.
        model, pretrained, precision: as in `textspan.load`.
        dtype: "float16" or "float32" storage of the contributions (statistics are always
            accumulated in float64 from the float32 contributions).
        convention: the decomposition's convention, "textspan" or "paper" (see
            `Decomposer.decompose`); recorded in the store, which a rerun with the other one
            refuses to resume.
        batch_size: images per forward pass.
        strict: stop at the first unreadable image, with an error naming it (what was done
            before it is kept, and a rerun resumes once it is removed or repaired); by
            default unreadable images are skipped, named in a `SkippedImagesWarning`, and
            recorded (`StoreReader.skipped`).
        engine: `LocalEngine(workers=, device=, checkpoint_every=)` (the default: this
            process) or `RayEngine(address=, workers=, num_gpus_per_worker=, shard_size=)`
            (`pip install 'textspan[ray]'`).
        on_progress: called with the number of image files done so far, after each batch
            (local) or shard (Ray).

    Only one process writes a store at a time: a second one is refused, naming the first.
    A rerun resumes — with either engine — when the images are the same (names, classes,
    sizes and modification times, wherever the folder now is) and the other arguments too.
    """
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    if batch_size < 1:
        raise InputError(f"batch_size: expected >= 1, got {batch_size}")
    job = ExtractJob(
        model=str(model),
        pretrained=None if pretrained is None else str(pretrained),
        precision=precision,
        dtype=dtype,
        convention=check_convention(convention),
        batch_size=batch_size,
        strict=strict,
        progress=progress,
        on_progress=on_progress,
    )
    engine = _checked_engine(engine)
    return engine.extract(open_images(images), Path(out), job)


def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
    engine: Engine | None = None,
) -> np.ndarray:
    """Unit-norm text embeddings [M, D] (float32), in batches, with a progress bar; with a
    `RayEngine`, in chunks by its actors, joined in the pool's order."""
    return _checked_engine(engine).encode_texts(
        model, tokenizer, texts, batch_size=batch_size, progress=progress
    )
