"""Training the toy CLIP (`textspan toy-train`) on the toy world.

    textspan toy-train --out build/toy     # retrain: same seed, the same file byte for byte

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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import world as tw
from .model import (
    MEAN,
    SPURIOUS,
    STD,
    ToyConfig,
    WordTokenizer,
    factor_matrix,
    percent,
    to_tensor,
    vocabulary,
    zero_shot,
)

# PyTorch is imported inside the functions that need it: the CLI reads ToyConfig without it.

__all__ = ["train"]


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
    import torch
    from tqdm.auto import tqdm

    config = config or ToyConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _initial_model(config)
    correlation = tw.Correlation(
        SPURIOUS.first, SPURIOUS.second, SPURIOUS.pairs, config.spurious_strength
    )
    train_world = tw.generate(
        config.images, seed=config.seed, size=config.image_size, correlation=correlation
    )
    held_out = tw.generate(1000, seed=config.seed + 10_000, size=config.image_size)
    factors = factor_matrix(train_world)
    opt, text_params = _optimiser(model, config)
    rng = np.random.default_rng(config.seed)
    resume = out / "resume.pt"
    first = _resume(resume, config, model, opt, rng)
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
            _save_resume(resume, config, model, opt, rng, step)
            bar.write(
                f"step {step}: held-out zero-shot " + percent(zero_shot(model, tokenizer, held_out))
            )
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            bar.write(f"stopping after {minutes} minutes at step {step}")
            break
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    accuracy = zero_shot(model, tokenizer, held_out)
    torch.save(model.state_dict(), out / "toy.pt")
    meta = _meta(config, tokenizer, step, accuracy, (time.perf_counter() - start) / 60)
    (out / "toy.json").write_text(json.dumps(meta, indent=1))
    resume.unlink(missing_ok=True)
    return meta


def _initial_model(config: ToyConfig):
    """The untrained model (drawn from the config's seed) and the world's tokenizer."""
    import open_clip
    import torch

    torch.manual_seed(config.seed)
    tokenizer = WordTokenizer(vocabulary())
    model = open_clip.CLIP(**config.open_clip_config())
    with torch.no_grad():
        model.logit_scale.fill_(0.0)
    return model, tokenizer


def _optimiser(model, config: ToyConfig):
    """AdamW with the image tower, the text tower and the logit scale in groups of their own
    (the text tower is frozen for the first steps); returns it and the text parameters."""
    import torch

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
    return opt, text_params


def _resume(path: Path, config: ToyConfig, model, opt, rng: np.random.Generator) -> int:
    """The first step to run: 1, or the step after a checkpoint of the same config, whose
    model, optimiser and random states are restored."""
    import torch

    if not path.exists():
        return 1
    try:
        # Tensors and plain values only: a file put in the output folder never runs code.
        state = torch.load(path, weights_only=True)
    except Exception as e:  # pickle and torch raise many kinds
        raise InputError(
            f"{path} is not a checkpoint toy-train wrote ({type(e).__name__}): remove it to "
            "train from the start"
        ) from None
    if state["config"] != asdict(config):
        return 1
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["step"] + 1


def _save_resume(path: Path, config: ToyConfig, model, opt, rng, step: int) -> None:
    import torch

    state = {
        "config": asdict(config),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "step": step,
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _meta(config: ToyConfig, tokenizer, steps: int, accuracy: dict, minutes: float) -> dict:
    """What `toy.json` records: enough to load the model, and how it was trained."""
    return {
        "model": config.open_clip_config(),
        "vocabulary": list(tokenizer.ids),
        "mean": MEAN,
        "std": STD,
        "train": asdict(config),
        "steps_done": steps,
        "spurious": {
            "first": SPURIOUS.first,
            "second": SPURIOUS.second,
            "pairs": SPURIOUS.pairs,
            "strength": config.spurious_strength,
        },
        "zero_shot": accuracy,
        "minutes": minutes,
    }


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
