"""The benchmark scripts that need hardware the tests lack keep working: the GPU benchmark
runs its small CPU version and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parents[2] / "benches"


def test_the_gpu_benchmark_runs_on_the_cpu():
    run = subprocess.run(
        [sys.executable, str(BENCHES / "bench_gpu.py"), "--cpu", "--pool", "200"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    row = lines[header + 1].split()
    assert row[:3] == ["ViT-B-32", "fp32", "2"] and float(row[3]) > 0
    assert row[4].endswith("x") and float(row[4][:-1]) > 0
    assert any(line.startswith("TextSpan, 64 heads from statistics") for line in lines)
