"""Shared fixtures: a tiny open_clip config with a checkpoint of random weights, and a small
ImageFolder of random images."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import textspan
from textspan.engines import LocalEngine

# The oracles in tests/published.py are imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny open_clip config of our own and a checkpoint of random weights for it."""
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "textspan-test-tiny.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model, _, _ = textspan.load(config, device="cpu")
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fish"):
        (root / c).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.png")
    return root


def extract_killed_after(count: int, images, out, tiny, **options) -> subprocess.CompletedProcess:
    """`textspan.extract(images, out, **options)` in a fresh process that kills itself
    (SIGKILL) as soon as its `on_progress` callback reports `count` image files done: an
    interruption at a known point."""
    config, checkpoint = tiny
    arguments = {"model": str(config), "pretrained": str(checkpoint), **options}
    code = (
        "import os, signal, textspan\n"
        "from textspan import LocalEngine, RayEngine\n"
        "def stop(done):\n"
        f"    if done >= {count}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"textspan.extract({str(images)!r}, {str(out)!r}, on_progress=stop, **{arguments!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def extract_options(tiny, **extra) -> dict:
    """`textspan.extract` arguments for the tiny model on the CPU, small batches and
    checkpoints, no progress bars; `extra` overrides them."""
    config, checkpoint = tiny
    return {
        "model": str(config),
        "pretrained": str(checkpoint),
        "batch_size": 4,
        "dtype": "float32",
        "engine": LocalEngine(workers=0, device="cpu", checkpoint_every=8),
        "progress": False,
        **extra,
    }
