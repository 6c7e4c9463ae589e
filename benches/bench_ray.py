"""Extraction with the Ray engine beside the single-process path, on the same images.

A randomly initialised ViT-B-16 (224 px) decomposes the same N random images (default 512)
three ways in one run: the default engine (one process, a DataLoader), and Ray Data with 1
and with 2 actors on a local Ray instance. Times are wall-clock from the call to the
finished store, so Ray's figures include starting its actors and loading the model in each.
A benchmark, not a test: it prints images/s and ratios and asserts nothing.

    .venv/bin/python benches/bench_ray.py [--images 512] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import textspan


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def timed(label: str, n: int, run) -> float:
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    print(f"{label:<28} {elapsed:8.1f} s   {n / elapsed:6.2f} images/s", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    work = Path(tempfile.mkdtemp(prefix="textspan-bench-ray-"))
    try:
        make_images(work / "images", args.images)
        common = {
            "model": "ViT-B-16",
            "batch_size": args.batch_size,
            "dtype": "float16",
            "progress": False,
        }
        print(
            f"{args.images} images, ViT-B-16 (random weights), 224 px, batch "
            f"{args.batch_size}, {os.cpu_count()} CPUs"
        )
        local = timed(
            "single process (2 loaders)",
            args.images,
            lambda: textspan.extract(
                work / "images",
                work / "local",
                engine=textspan.LocalEngine(workers=2, device="cpu"),
                **common,
            ),
        )
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        times = {}
        for workers in (1, 2):
            times[workers] = timed(
                f"ray, {workers} actor{'s' if workers > 1 else ''}",
                args.images,
                lambda w=workers: textspan.extract(
                    work / "images",
                    work / f"ray{w}",
                    engine=textspan.RayEngine(workers=w, shard_size=args.shard_size),
                    **common,
                ),
            )
        ray.shutdown()
        print(f"ray overhead at 1 actor: {times[1] / local - 1:+.0%} of the single-process time")
        print(f"2 actors vs 1 actor: {times[1] / times[2]:.2f}× the throughput")
        a = textspan.open_store(work / "local")
        b = textspan.open_store(work / "ray2")
        x, y = a.heads.astype(np.float32), b.heads.astype(np.float32)
        diff, scale = np.abs(x - y).max(), np.abs(x).max()
        print(
            f"stores' heads: largest difference {diff:.2g} of largest |value| {scale:.3g} "
            f"({diff / scale:.1e}; float16 keeps about 3 significant digits)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
