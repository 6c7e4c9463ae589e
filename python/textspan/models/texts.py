"""Text embeddings and zero-shot classifiers from a CLIP model's text tower."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError, InputTypeError
from .families import encode_text

__all__ = [
    "checked_texts",
    "encode_texts",
    "imagenet_names",
    "imagenet_synsets",
    "zero_shot_classifier",
]


def checked_texts(texts: Sequence[str], batch_size: int) -> list[str]:
    """The texts as a list, refused when empty or not strings, and the batch size checked."""
    if isinstance(texts, str):
        raise InputTypeError(
            f"texts: expected a list of strings, got one string ({texts[:40]!r}); wrap it in a list"
        )
    texts = list(texts)
    if not texts:
        raise InputError("texts: expected at least one text, got none")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise InputTypeError(f"texts: expected strings, got {type(bad).__name__}")
    if batch_size < 1:
        raise InputError(f"batch_size: expected an integer >= 1, got {batch_size}")
    return texts


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Unit-norm text embeddings [M, D] (float32), in batches, with a progress bar, in this
    process (`textspan.encode_texts` can also spread them over a Ray cluster)."""
    from tqdm.auto import tqdm

    texts = checked_texts(texts, batch_size)
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress)
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        tokens = tokenizer(batch).to(device)
        out.append(encode_text(model, tokens).cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    classnames: Sequence[str] | None = None,
    templates: Sequence[str | Callable[[str], str]] | None = None,
    *,
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
        raise InputError("zero_shot_classifier: expected at least one class name and one template")

    bad = [t for t in templates if not callable(t) and "{}" not in str(t)]
    if bad:
        raise InputError(f"templates: expected '{{}}' where the class name goes, got {bad[0]!r}")

    def fill(template: str | Callable[[str], str], name: str) -> str:
        return template(name) if callable(template) else template.format(name)

    prompts = [fill(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, progress=progress)
    per_class = emb.reshape(len(classnames), len(templates), -1).mean(1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    return per_class.T.astype(np.float32)


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in the standard class order (sorted: 0 = n01440764,
    999 = n15075141), as timm ships them."""
    from importlib.resources import files

    return files("timm.data._info").joinpath("imagenet_synsets.txt").read_text().split()


def imagenet_names(synsets: Sequence[str] | None = None) -> list[str]:
    """open_clip's ImageNet class names: of the given synsets, in their order (any subset),
    or all 1000 in class order. An unknown synset is an error naming it."""
    import open_clip

    names = list(open_clip.IMAGENET_CLASSNAMES)
    if synsets is None:
        return names
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    unknown = [s for s in synsets if s not in index]
    if unknown:
        raise InputError(
            f"synsets: expected ImageNet-1k synsets, got {len(unknown)} unknown, e.g. "
            f"{', '.join(unknown[:3])}"
        )
    return [names[index[s]] for s in synsets]
