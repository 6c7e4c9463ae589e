"""The toy CLIP: a tiny open_clip CLIP trained from scratch on the toy world (`world.py`).

It is the embedded default model (`textspan.load("toy")`, `make demo`, the ground-truth
tests): small enough to train on two CPU cores in under 40 minutes (`train.py`), and trained
on a world whose every factor is known, so what TextSpan, segmentation and repair find can be
checked. This module holds what using it needs: its vocabulary and tokenizer, its training
configuration, its preprocessing, loading, and zero-shot accuracy per factor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingFileError
from . import world as tw

# PyTorch is imported inside the functions that need it: the CLI reads ToyConfig without it.

__all__ = [
    "SPURIOUS_DIR",
    "TOY_DIR",
    "ToyConfig",
    "WordTokenizer",
    "describe",
    "factor_matrix",
    "load_toy",
    "load_toy_spurious",
    "percent",
    "to_tensor",
    "toy_meta",
    "vocabulary",
    "zero_shot",
]

TOY_DIR = Path(__file__).parent / "data" / "toy"
# The same recipe trained with the correlated pair much stronger: a model that leans on the
# background, for the spurious-feature repair (`study.spurious_study`).
SPURIOUS_DIR = Path(__file__).parent / "data" / "toy-spurious"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CONTEXT_LENGTH = 24
EXTRA_WORDS = ("a", "an", "at", "the", "on", "background", "object", "and", "in")
# Circles mostly on grass and triangles mostly on water in training, like Waterbirds.
SPURIOUS = tw.Correlation("shape", "background", {"circle": "grass", "triangle": "water"}, 0.9)


def vocabulary() -> list[str]:
    """Every word the toy world's captions and text pools use."""
    names = {w for values in tw.NAMES.values() for n in values for w in n.split()}
    return sorted(names | set(EXTRA_WORDS))


class WordTokenizer:
    """Word-level tokens: 0 pads, 1 starts, the largest id ends (open_clip pools a text at
    its largest id). Unknown words are an error naming them."""

    def __init__(self, words: Sequence[str], context_length: int = CONTEXT_LENGTH) -> None:
        self.ids = {w: i + 2 for i, w in enumerate(words)}
        self.vocab_size = len(words) + 3
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]):
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = text.lower().replace(",", " ").split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise InputError(
                    f"toy tokenizer: {unknown} not in the toy world's vocabulary "
                    f"({len(self.ids)} words: {', '.join(self.ids)})"
                )
            ids = [1, *(self.ids[w] for w in words)][: self.context_length - 1]
            ids.append(self.vocab_size - 1)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@dataclass
class ToyConfig:
    """What `textspan toy-train` trains; the defaults made the committed checkpoint."""

    seed: int = 0
    steps: int = 2400
    batch_size: int = 128
    images: int = 40000
    image_size: int = 48
    patch_size: int = 6
    layers: int = 4
    width: int = 128
    head_width: int = 16
    embed_dim: int = 64
    text_layers: int = 2
    lr: float = 1e-3
    scale_lr: float = 2e-2
    freeze_text: float = 0.4  # fraction of the steps with the text tower frozen
    caption_factors: float = 0.5
    spurious_strength: float = 0.9  # how often circles are on grass and triangles on water

    def open_clip_config(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.layers,
                "width": self.width,
                "head_width": self.head_width,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": CONTEXT_LENGTH,
                "vocab_size": len(vocabulary()) + 3,
                "width": self.width,
                "heads": 4,
                "layers": self.text_layers,
            },
        }


def to_tensor(images: np.ndarray):
    """uint8 images [N, S, S, 3] → normalised float tensors [N, 3, S, S], as `preprocess`."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(STD).view(1, 3, 1, 1)


def factor_matrix(world: tw.World) -> np.ndarray:
    """[N, 5] factor indices of the first object, in FACTORS order."""
    return np.stack([world.values(f) for f in tw.FACTORS], 1)


def zero_shot(model, tokenizer, world: tw.World, batch_size: int = 500) -> dict[str, float]:
    """Per factor, accuracy of choosing among captions that name only that factor."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        was_training = model.training
        model.eval()
        image = torch.cat(
            [
                F.normalize(model.encode_image(to_tensor(world.images[i : i + batch_size])), dim=-1)
                for i in range(0, len(world), batch_size)
            ]
        )
        truth = factor_matrix(world)
        scores = {}
        for k, factor in enumerate(tw.FACTORS):
            text = F.normalize(model.encode_text(tokenizer(tw.factor_captions(factor))), dim=-1)
            predicted = (image @ text.T).argmax(-1).numpy()
            scores[factor] = float((predicted == truth[:, k]).mean())
        model.train(was_training)
    return scores


def load_toy(path: str | Path | None = None, device: str = "cpu"):
    """The toy CLIP (default: the embedded checkpoint) in eval mode, its preprocessing and
    its tokenizer: what `textspan.load("toy")` returns."""
    import open_clip
    import torch

    folder = Path(path) if path is not None else TOY_DIR
    meta = toy_meta(folder)
    model = open_clip.CLIP(**meta["model"])
    model.load_state_dict(torch.load(folder / "toy.pt", map_location="cpu", weights_only=True))
    model.to(device).eval()
    size = meta["model"]["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(
        size, is_train=False, mean=tuple(meta["mean"]), std=tuple(meta["std"])
    )
    return model, preprocess, WordTokenizer(meta["vocabulary"])


def load_toy_spurious(path: str | Path | None = None, device: str = "cpu"):
    """The toy CLIP trained to lean on the background (`textspan.load("toy-spurious")`)."""
    return load_toy(SPURIOUS_DIR if path is None else path, device=device)


def toy_meta(path: str | Path | None = None) -> dict:
    """A toy model folder's toy.json (default: the embedded model's): its architecture,
    vocabulary, training settings and held-out zero-shot accuracy."""
    folder = Path(path) if path is not None else TOY_DIR
    if not (folder / "toy.json").is_file() or not (folder / "toy.pt").is_file():
        raise MissingFileError(f"toy model: expected toy.json and toy.pt in {folder}")
    return json.loads((folder / "toy.json").read_text())


def percent(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in acc.items())


def describe(meta: dict) -> str:
    """One line of per-factor zero-shot accuracies, from a toy.json or anything with its
    "zero_shot" entry."""
    return "held-out zero-shot: " + percent(meta["zero_shot"])
