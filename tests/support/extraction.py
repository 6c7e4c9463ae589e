"""Extraction with the tiny model in tests: its arguments, and a run killed at a known point."""

from __future__ import annotations

import subprocess
import sys

from textspan.engines import LocalEngine


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
