"""Loading open_clip models, encoding texts, and zero-shot classifiers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["encode_texts", "load", "resolve_model_name", "zero_shot_classifier"]


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_name(name: str | os.PathLike) -> str:
    """An open_clip model name; a path to a model config JSON is registered first and its
    file name (without .json) becomes the name."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config: no such file {path}")
        import open_clip

        open_clip.add_model_config(path)
        return path.stem
    return str(name)


def load(
    name: str | os.PathLike,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """An open_clip model in eval mode, its image preprocessing and its tokenizer.

    Args:
        name: an open_clip model name (`open_clip.list_models()`), a path to a model
            config JSON of your own, "toy": the embedded toy CLIP (`textspan.toyclip`;
            `pretrained` may then name a folder written by `textspan toy-train`), or
            "toy-spurious": the toy CLIP trained to lean on the background.
        pretrained: an open_clip pretrained tag (downloaded from the hub, e.g. "openai" or
            "laion2b_s34b_b79k"), a path to a local checkpoint, or None for random weights
            (seeded: the same in every process).
        device: "cuda" when available, else "cpu", unless given.
        precision: "fp32", "fp16", "bf16", "pure_fp16" or "pure_bf16" (open_clip's names).

    Returns:
        (model, preprocess, tokenizer).
    """
    import open_clip

    if str(name) in ("toy", "toy-spurious"):
        from .toyclip import SPURIOUS_DIR, load_toy

        if pretrained is None and str(name) == "toy-spurious":
            pretrained = SPURIOUS_DIR
        return load_toy(pretrained, device=device or default_device())
    model_name = resolve_model_name(name)
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"model: expected an open_clip model name or a config .json, got {str(name)!r} "
            "(open_clip.list_models() lists the names)"
        )
    if pretrained is not None:
        path = Path(pretrained)
        looks_like_a_file = os.sep in str(pretrained) or path.suffix in CHECKPOINT_SUFFIXES
        if looks_like_a_file and not path.is_file():
            raise FileNotFoundError(f"pretrained: no such checkpoint file {pretrained}")
    # Random weights are drawn from a fixed seed (the caller's RNG left as it was), so every
    # process that loads the same name gets the same model: a store extracted by many
    # workers stays one model's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=None if pretrained is None else str(pretrained),
            device=device or default_device(),
            precision=precision,
        )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
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
    and `num_gpus_per_worker` as in `textspan.extract`."""
    from tqdm.auto import tqdm

    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise TypeError(f"texts: expected strings, got {type(bad).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
    if engine == "ray":
        from .distributed import encode_texts_ray

        return encode_texts_ray(
            model,
            tokenizer,
            texts,
            batch_size,
            workers,
            address=address,
            num_gpus_per_worker=num_gpus_per_worker,
            progress=progress,
        )
    if engine != "local":
        raise ValueError(f"engine: expected 'local' or 'ray', got {engine!r}")
    device = _model_device(model)
    out = []
    bar = tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress)
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        emb = model.encode_text(tokens, normalize=True).float()
        out.append(emb.cpu().numpy())
        bar.update(len(tokens))
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    classnames: Sequence[str] | None = None,
    templates: Sequence[str | Callable[[str], str]] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """A zero-shot classifier [D, C]: per class, the normalised mean of its template embeddings.

    By default the ImageNet class names and the OpenAI templates from open_clip's metadata.
    Templates are format strings with "{}" or callables of the class name.
    """
    import open_clip

    classnames = list(open_clip.IMAGENET_CLASSNAMES if classnames is None else classnames)
    templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES if templates is None else templates)
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier: expected at least one class name and one template")

    def fill(template: str | Callable[[str], str], name: str) -> str:
        return template(name) if callable(template) else template.format(name)

    prompts = [fill(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, progress=progress)
    per_class = emb.reshape(len(classnames), len(templates), -1).mean(1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    return per_class.T.astype(np.float32)
