"""The release wheel installs into a fresh virtual environment and works there.

The base install has NumPy and tqdm only: TextSpan works, and the PyTorch side says how to
get it."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment(tmp_path):
    dist = tmp_path / "dist"
    maturin = Path(sys.executable).with_name("maturin")
    subprocess.run(
        [str(maturin), "build", "--release", "--quiet", "--out", str(dist)],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = dist.glob("textspan-*.whl")
    # The embedded toy models travel in the wheel.
    names = zipfile.ZipFile(wheel).namelist()
    embedded = {
        f"textspan/toy/data/{m}/toy.{e}" for m in ("toy", "toy-spurious") for e in ("pt", "json")
    }
    assert embedded <= set(names)
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True)
    script = (
        "import numpy as np, textspan\n"
        "rng = np.random.default_rng(0)\n"
        "x, pool = rng.standard_normal((50, 8)), rng.standard_normal((6, 8))\n"
        "r = textspan.text_span(x, pool, n_texts=3, rank=8)\n"
        "print(textspan.__file__, len(r))\n"
        "try:\n"
        "    textspan.Decomposer\n"
        "except ImportError as e:\n"
        "    print('textspan[torch]' in str(e))\n"
    )
    out = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    location, count, names_the_extra = out.split()
    assert str(env_dir) in location, "imported the development copy, not the wheel"
    assert count == "3"
    assert names_the_extra == "True", "the PyTorch side should say how to install it"
