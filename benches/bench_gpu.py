"""GPU benchmark: the decomposition beside plain `encode_image`, on one CUDA device.

For each model (random weights: no download), precision and batch size, in one process:
`encode_image`, the decomposition (heads and MLPs), the same plus token scores against
K = 10 texts, and the extraction pipeline without the disk (decomposition, head statistics
accumulated in float64 on the device, contributions copied to the host) in images/s; then
TextSpan for 64 heads from statistics beside it (the Rust core, on the CPU). Prints one table;
asserts nothing about time.

    python benches/bench_gpu.py                        # ViT-B-16 and ViT-L-14, fp32 and fp16,
                                                       # batch 64 and 256, on cuda
    python benches/bench_gpu.py --cpu                  # a small run on the CPU (the tests
                                                       # keep the script working with it)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import open_clip
import torch

import textspan
from textspan.core.synthetic import low_rank_stats
from textspan.store.sums import DeviceStats

K = 10


def synchronised(device: torch.device):
    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return wait


def timed(fn, wait, repeat: int) -> float:
    """The best of `repeat` runs after one warm-up, in seconds."""
    fn()
    wait()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        wait()
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn, device: torch.device) -> float:
    """Peak device memory of `fn` above what was allocated before, in GiB (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def bench_model(name, precision, batch, device, repeat) -> dict[str, float]:
    torch.manual_seed(0)
    model = open_clip.create_model(name, precision=precision, device=device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    dtype = next(model.parameters()).dtype
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    directions = torch.randn(K, model.visual.output_dim, device=device)
    wait = synchronised(device)
    row: dict[str, float] = {}
    with torch.no_grad(), textspan.Decomposer(model) as decomposer:
        tower = decomposer.tower
        stats = DeviceStats((tower.layers, tower.heads), tower.dim, device)

        def pipeline() -> None:
            parts = decomposer.decompose(images)
            stats.update(parts.heads)
            for name in ("heads", "mlps", "class_token", "representation"):
                getattr(parts, name).to(torch.float16).cpu()

        row["encode"] = timed(lambda: model.encode_image(images), wait, repeat)
        row["decompose"] = timed(lambda: decomposer.decompose(images), wait, repeat)
        row["scores"] = timed(
            lambda: decomposer.decompose(images, spatial=True).scores(directions), wait, repeat
        )
        row["pipeline"] = timed(pipeline, wait, repeat)
        row["memory"] = peak_memory(
            lambda: decomposer.decompose(images, spatial=True).scores(directions), device
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="a small run on the CPU")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--precisions", nargs="+", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--pool", type=int, default=3498, help="texts for the TextSpan figure")
    args = parser.parse_args()
    if args.cpu:
        device = torch.device("cpu")
        models, precisions, batches, repeat = ["ViT-B-32"], ["fp32"], [2], 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: no CUDA device here; --cpu runs a small CPU version")
        device = torch.device("cuda")
        models, precisions = ["ViT-B-16", "ViT-L-14"], ["fp32", "fp16"]
        batches, repeat = [64, 256], 3
    models = args.models or models
    precisions = args.precisions or precisions
    batches = args.batches or batches
    repeat = args.repeat or repeat
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"textspan {textspan.__version__} on {where}; torch {torch.__version__}")
    print(
        f"{'model':<10} {'prec':<5} {'batch':>5}  {'encode img/s':>12}  {'decompose':>9}  "
        f"{'+scores K=10':>12}  {'extract img/s':>13}  {'extract':>7}  {'peak GiB':>8}"
    )
    for name in models:
        for precision in precisions:
            for batch in batches:
                r = bench_model(name, precision, batch, device, repeat)
                print(
                    f"{name:<10} {precision:<5} {batch:>5}  {batch / r['encode']:12.1f}  "
                    f"{r['decompose'] / r['encode']:8.2f}x  {r['scores'] / r['encode']:11.2f}x  "
                    f"{batch / r['pipeline']:13.1f}  {r['pipeline'] / r['encode']:6.2f}x  "
                    f"{r['memory']:8.2f}",
                    flush=True,
                )
    rng = np.random.default_rng(0)
    stats = [low_rank_stats(rng, 10_000, 768, 96) for _ in range(64)]
    pool = rng.standard_normal((args.pool, 768)).astype(np.float32)
    start = time.perf_counter()
    textspan.text_span_heads(stats, pool, n_texts=20, rank=80, progress=False)
    print(
        f"TextSpan, 64 heads from statistics (D 768, M {args.pool}, 20 texts, rank 80, Rust core "
        f"on {textspan.get_num_threads()} CPU threads): {time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    main()
