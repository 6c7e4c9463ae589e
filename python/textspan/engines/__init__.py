"""The engines that run the model over many images or texts: this process (`local`) or a Ray
cluster (`ray`). The engine is chosen here, once, for both; nothing below this tier imports
Ray, and `ray.py` imports it only when that engine is chosen."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.checks import check_convention
from ..errors import InputError
from ..models import texts as _texts
from ..store.format import Store

__all__ = ["ENGINES", "encode_texts", "extract"]

ENGINES = ("local", "ray")


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"engine: expected 'local' or 'ray', got {engine!r}")


def extract(
    images: str | os.PathLike | Any,
    out: str | os.PathLike,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str | None = None,
    dtype: str = "float16",
    precision: str = "fp32",
    checkpoint_every: int = 4096,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    num_gpus_per_worker: float | None = None,
    shard_size: int = 1024,
    after_batch: Callable[[int], None] | None = None,
    before_shard: Callable[[int], None] | None = None,
    strict: bool = False,
    convention: str = "textspan",
) -> Store:
    """Decomposes every image under `images` into a store in `out`, resuming if it exists.

    Args:
        images: an ImageFolder-layout folder (labels from sub-folders), a flat folder, a
            dataset spec ("imagenet:ROOT", "waterbirds:ROOT:SPLIT", "webdataset:GLOB"; see
            `textspan.datasets`) or an `ImageSet`.
        out: the store's folder.
        model, pretrained, precision: as in `textspan.load`.
        batch_size: images per forward pass.
        workers: DataLoader worker processes ("local"), or Ray actors each holding the
            model ("ray").
        device: "cuda" when available, else "cpu", unless given ("local" only).
        dtype: "float16" or "float32" storage of the contributions (statistics are always
            accumulated in float64 from the float32 contributions).
        checkpoint_every: images between checkpoints (rounded up to whole batches; "local").
        engine: "local" (this process) or "ray": a Ray Data pipeline over a cluster (see
            `textspan.engines.ray`); `pip install 'textspan[ray]'`.
        address: the Ray cluster to join ("auto", "ray://host:10001", …); by default the
            instance running in this process, or a new local one.
        num_gpus_per_worker: GPUs per Ray actor (default: 1 when the cluster has GPUs).
        shard_size: images per Ray shard, the unit of work and of resumption.
        after_batch: called with the number of rows done after each batch ("local") or
            with the number of shards written by this run after each shard ("ray").
        before_shard: ("ray") called in the actor with a shard's first row before the
            shard is computed.
        strict: stop at the first unreadable image, with an error naming it (what was done
            before it is kept, and a rerun resumes once it is removed or repaired); by
            default unreadable images are skipped, named in a warning, and recorded
            (`Store.skipped`).
        convention: the decomposition's convention, "textspan" or "paper" (see
            `Decomposer.decompose`); recorded in the store, which a rerun with the other one
            refuses to resume.

    Only one process writes a store at a time: a second one is refused, naming the first.
    A rerun resumes when the images are the same (names, classes, sizes and modification
    times, wherever the folder now is) and the other arguments too.
    """
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    if batch_size < 1 or workers < 0 or checkpoint_every < 1:
        raise InputError(
            f"batch_size >= 1, workers >= 0 and checkpoint_every >= 1 expected, got "
            f"{batch_size}, {workers} and {checkpoint_every}"
        )
    _check_engine(engine)
    check_convention(convention)
    if engine == "ray":
        from .ray import extract_ray

        return extract_ray(
            images,
            out,
            model,
            pretrained,
            batch_size,
            workers,
            dtype,
            precision,
            address=address,
            num_gpus_per_worker=num_gpus_per_worker,
            shard_size=shard_size,
            progress=progress,
            after_shard=after_batch,
            before_shard=before_shard,
            strict=strict,
            convention=convention,
        )
    from .local import extract_local

    return extract_local(
        images,
        out,
        model,
        pretrained,
        batch_size,
        workers,
        device,
        dtype,
        precision,
        checkpoint_every,
        progress=progress,
        after_batch=after_batch,
        strict=strict,
        convention=convention,
    )


def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
    engine: str = "local",
    workers: int = 2,
    address: str | None = None,
    num_gpus_per_worker: float | None = None,
) -> np.ndarray:
    """Unit-norm text embeddings [M, D] (float32), in batches, with a progress bar.

    With `engine="ray"` the pool is encoded in chunks by `workers` Ray actors, each holding
    the model (on a GPU when the cluster has them), and joined in the pool's order; `address`
    and `num_gpus_per_worker` as in `extract`."""
    _check_engine(engine)
    if engine == "local":
        return _texts.encode_texts(model, tokenizer, texts, batch_size, progress)
    checked = _texts.checked_texts(texts, batch_size)
    from .ray import encode_texts_ray

    return encode_texts_ray(
        model,
        tokenizer,
        checked,
        batch_size,
        workers,
        address=address,
        num_gpus_per_worker=num_gpus_per_worker,
        progress=progress,
    )
