"""The toy-CLIP training script runs end to end (a few steps) and its tokenizer ends every
text with the largest id, where open_clip pools the text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).parent.parent / "toy" / "train.py"


def test_training_runs_and_writes_weights_and_zero_shot_accuracy(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--out",
            str(tmp_path),
            "--steps",
            "3",
            "--images",
            "300",
            "--batch-size",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["zero_shot"]) == {"shape", "colour", "size", "position", "background"}
    assert all(0.0 <= v <= 1.0 for v in metrics["zero_shot"].values())
    config = json.loads((tmp_path / "toy.json").read_text())
    assert (tmp_path / "toy.pt").stat().st_size > 0 and config["vision_cfg"]["patch_size"] == 6


def test_word_tokenizer_ends_texts_with_the_largest_id():
    sys.path.insert(0, str(TRAIN.parent))
    try:
        from train import WordTokenizer
    finally:
        sys.path.pop(0)
    tokens = WordTokenizer(context_length=12)(["a small red circle", "an object"])
    for row, words in zip(tokens, (4, 2), strict=True):
        assert row[0] == 1 and row[words + 1] == tokens.max() and (row[words + 2 :] == 0).all()
