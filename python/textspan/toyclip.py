"""The toy CLIP: a tiny open_clip CLIP trained from scratch on `textspan.toyworld`.

It is the embedded default model (`textspan.load("toy")`, `make demo`, the ground-truth
tests): small enough to train on two CPU cores in under 40 minutes, and trained on a world
whose every factor is known, so what TextSpan, segmentation and repair find can be checked.

    textspan toy-train --out build/toy     # retrain: same seed, same model within noise

Training choices that mattered (each found by a probe, see the README):
- Captions name a random subset of the factors ("a red object", "a small circle on a gray
  background"), drawn afresh every step, so that short single-factor texts (TextSpan's pool)
  are inside what the text tower has seen.
- Partial captions fit many images: the loss counts every image a caption is true of as a
  positive (CLIP's loss with multi-positive targets), instead of calling them negatives.
- The logit scale starts at 1 and is learned fast: at CLIP's usual 1/0.07 the first steps
  collapse all embeddings together, and spatial factors were never learned.
- The text tower is frozen (at its random initialisation, which already tells the captions
  apart) for the first steps: trained together from the start, it learns colour and
  background and maps every position phrase to one embedding, and position never appears.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import toyworld as tw

# PyTorch is imported inside the functions that need it: the CLI reads ToyConfig without it.

__all__ = [
    "SPURIOUS_DIR",
    "TOY_DIR",
    "ToyConfig",
    "WordTokenizer",
    "load_toy",
    "toy_meta",
    "train",
    "zero_shot",
]

TOY_DIR = Path(__file__).parent / "data" / "toy"
# The same recipe trained with the correlated pair much stronger: a model that leans on the
# background, for the spurious-feature repair (`toystudy.spurious_study`).
SPURIOUS_DIR = Path(__file__).parent / "data" / "toy-spurious"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CONTEXT_LENGTH = 24
EXTRA_WORDS = ("a", "an", "at", "the", "on", "background", "object", "and", "in")
# Circles mostly on grass and triangles mostly on water in training, like Waterbirds.
SPURIOUS = tw.Correlation("shape", "background", {"circle": "grass", "triangle": "water"}, 0.9)


def vocabulary() -> list[str]:
    """Every word the toy world's captions and text pools use."""
    names = {w for values in tw._NAMES.values() for n in values for w in n.split()}
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
                raise ValueError(
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


def _factor_matrix(world: tw.World) -> np.ndarray:
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
        truth = _factor_matrix(world)
        scores = {}
        for k, factor in enumerate(tw.FACTORS):
            text = F.normalize(model.encode_text(tokenizer(tw.factor_captions(factor))), dim=-1)
            predicted = (image @ text.T).argmax(-1).numpy()
            scores[factor] = float((predicted == truth[:, k]).mean())
        model.train(was_training)
    return scores


def train(
    out: str | Path,
    config: ToyConfig | None = None,
    minutes: float | None = None,
    progress: bool = True,
    checkpoint_every: int = 200,
) -> dict:
    """Trains the toy CLIP and writes `toy.pt` (weights) and `toy.json` (config, vocabulary,
    held-out zero-shot accuracy per factor) into `out`. A training interrupted and rerun with
    the same arguments resumes from its last checkpoint (`out/resume.pt`), bit for bit."""
    import open_clip
    import torch
    from tqdm.auto import tqdm

    config = config or ToyConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    words = vocabulary()
    tokenizer = WordTokenizer(words)
    model = open_clip.CLIP(**config.open_clip_config())
    with torch.no_grad():
        model.logit_scale.fill_(0.0)
    correlation = tw.Correlation(
        SPURIOUS.first, SPURIOUS.second, SPURIOUS.pairs, config.spurious_strength
    )
    train_world = tw.generate(
        config.images, seed=config.seed, size=config.image_size, correlation=correlation
    )
    held_out = tw.generate(1000, seed=config.seed + 10_000, size=config.image_size)
    factors = _factor_matrix(train_world)
    text_params = [
        p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"
    ]
    opt = torch.optim.AdamW(
        [
            {"params": list(model.visual.parameters()), "base_lr": config.lr},
            {"params": text_params, "base_lr": config.lr},
            {"params": [model.logit_scale], "base_lr": config.scale_lr, "weight_decay": 0.0},
        ],
        lr=config.lr,
        weight_decay=0.05,
    )
    rng = np.random.default_rng(config.seed)
    first = 1
    resume = out / "resume.pt"
    if resume.exists():
        state = torch.load(resume, weights_only=False)
        if state["config"] == asdict(config):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            first = state["step"] + 1
    warmup = max(1, config.steps // 20)
    frozen_until = int(config.freeze_text * config.steps)
    start = time.perf_counter()
    bar = tqdm(
        total=config.steps, initial=first - 1, desc="toy-train", unit="step", disable=not progress
    )
    step = first - 1
    for step in range(first, config.steps + 1):
        scale = min(step / warmup, 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        for p in text_params:
            p.requires_grad_(step > frozen_until)
        loss = _step(model, tokenizer, train_world, factors, rng, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % checkpoint_every == 0 and step < config.steps:
            state = {
                "config": asdict(config),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
            }
            torch.save(state, resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)
            acc = zero_shot(model, tokenizer, held_out)
            bar.write(f"step {step}: held-out zero-shot " + _percent(acc))
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            bar.write(f"stopping after {minutes} minutes at step {step}")
            break
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    accuracy = zero_shot(model, tokenizer, held_out)
    torch.save(model.state_dict(), out / "toy.pt")
    meta = {
        "model": config.open_clip_config(),
        "vocabulary": words,
        "mean": MEAN,
        "std": STD,
        "train": asdict(config),
        "steps_done": step,
        "spurious": {
            "first": SPURIOUS.first,
            "second": SPURIOUS.second,
            "pairs": SPURIOUS.pairs,
            "strength": config.spurious_strength,
        },
        "zero_shot": accuracy,
        "minutes": (time.perf_counter() - start) / 60,
    }
    (out / "toy.json").write_text(json.dumps(meta, indent=1))
    resume.unlink(missing_ok=True)
    return meta


def _percent(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in acc.items())


def _step(model, tokenizer, world, factors, rng, config):
    import torch
    import torch.nn.functional as F

    idx = rng.choice(len(world), config.batch_size, replace=False)
    f = factors[idx]
    named = rng.random(f.shape) < config.caption_factors
    empty = np.flatnonzero(~named.any(1))
    named[empty, rng.integers(0, len(tw.FACTORS), len(empty))] = True
    captions = [
        tw.caption(
            dict(zip(tw.FACTORS, row, strict=True)),
            {n for n, m in zip(tw.FACTORS, mask, strict=True) if m},
        )
        for row, mask in zip(f, named, strict=True)
    ]
    # Image i is a positive of caption j when every factor caption j names is image i's.
    positive = np.all(~named[None] | (f[:, None] == f[None]), axis=2)
    target = torch.from_numpy(positive).float()
    image = F.normalize(model.encode_image(to_tensor(world.images[idx])), dim=-1)
    text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    per_image = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    per_text = F.cross_entropy(logits.T, target.T / target.T.sum(1, keepdim=True))
    return (per_image + per_text) / 2


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


def toy_meta(path: str | Path | None = None) -> dict:
    """A toy model folder's toy.json (default: the embedded model's): its architecture,
    vocabulary, training settings and held-out zero-shot accuracy."""
    folder = Path(path) if path is not None else TOY_DIR
    if not (folder / "toy.json").is_file() or not (folder / "toy.pt").is_file():
        raise FileNotFoundError(f"toy model: expected toy.json and toy.pt in {folder}")
    return json.loads((folder / "toy.json").read_text())


def describe(meta: dict) -> str:
    """One line of per-factor zero-shot accuracies, from a toy.json or anything with its
    "zero_shot" entry."""
    return "held-out zero-shot: " + _percent(meta["zero_shot"])
