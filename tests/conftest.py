"""Shared fixtures: a tiny open_clip config with a checkpoint of random weights, and a small
ImageFolder of random images. PyTorch and PIL are imported by the fixtures that need them,
so that the NumPy-only tests (tests/core, tests/analysis) run without them. Helpers shared
by several test folders live in tests/support (on the path, see pyproject.toml)."""

import json

import numpy as np
import pytest

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny open_clip config of our own and a checkpoint of random weights for it."""
    import torch

    import textspan

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
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fish"):
        (root / c).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.png")
    return root
