"""Decomposition benchmark: each figure beside plain `encode_image`, in one process.

Randomly initialised towers of four families — open_clip's ViT-B-16 (class token), ViT-B-16-
SigLIP (timm, attention pooler), EVA02-B-16 (timm Eva: RoPE, sub-LN) and Hugging Face CLIP
ViT-B/16 — at 224 px, batch 16, on the CPU, float32, each beside the model's own image
encoding; then extraction of a folder into a store with ViT-B-16. Prints times, ratios and
peak memory; asserts nothing about time.

    python benches/bench_decompose.py                 # 1,000 images for the store
    python benches/bench_decompose.py --images 200    # a quicker extraction figure
    python benches/bench_decompose.py --models ViT-B-16-SigLIP --images 0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from textspan import Decomposer, LocalEngine, extract

BATCH, SIZE, K = 16, 224, 10


def _status(name: str) -> int:
    """A field of /proc/self/status in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def peak_mib(name: str, what: str) -> float:
    """Peak resident memory of one `what` ("encode" or "scores") above the built model, in a
    fresh process: memory the allocator kept from earlier runs cannot hide it."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", name, what], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return float(out.stdout.split()[-1])


def _measure_peak(name: str, what: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    with torch.no_grad(), Decomposer(model) as decomposer:
        directions = torch.randn(K, decomposer.tower.dim)
        before = _status("VmRSS")
        if what == "encode":
            decomposer.tower.encode(x)
        else:
            decomposer.decompose(x, spatial=True).scores(directions)
        print((_status("VmHWM") - before) / 1024)


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the store figure")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--peak", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        _measure_peak(*args.peak)
        return
    for name in args.models:
        bench_model(name)
    if args.images:
        bench_store(args.images, args.workers)


HF_CLIP = "HF CLIP ViT-B/16"
MODELS = ("ViT-B-16", "ViT-B-16-SigLIP", "EVA02-B-16", HF_CLIP)


def build(name: str) -> torch.nn.Module:
    if name == HF_CLIP:
        import transformers

        config = transformers.CLIPVisionConfig(patch_size=16, projection_dim=512)
        return transformers.CLIPVisionModelWithProjection(config).eval()
    return open_clip.create_model(name).eval()


def bench_model(name: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    with Decomposer(model) as decomposer:
        directions = torch.randn(K, decomposer.tower.dim)
        family = f"{decomposer.tower.family}, {decomposer.tower.pooling_type} pooling"
    print(
        f"{name} ({family}, random weights), {SIZE} px, batch {BATCH}, "
        f"{torch.get_num_threads()} threads"
    )

    with torch.no_grad(), Decomposer(model) as decomposer:
        plain = lambda: decomposer.tower.encode(x)  # noqa: E731 (the model's own encoder)
        heads = lambda: decomposer.decompose(x)  # noqa: E731
        scores = lambda: decomposer.decompose(x, spatial=True).scores(directions)  # noqa: E731
        for fn in (plain, heads, scores):
            fn()  # warm-up
        t_plain, t_heads, t_scores = (best_of(f) for f in (plain, heads, scores))
        shape = list(scores().shape)
    m_plain, m_scores = peak_mib(name, "encode"), peak_mib(name, "scores")
    print(f"  encode_image                     {t_plain:7.3f} s")
    print(f"  decompose (heads, MLPs)          {t_heads:7.3f} s   {t_heads / t_plain:5.2f}x")
    print(f"  decompose + scores, K = {K}       {t_scores:7.3f} s   {t_scores / t_plain:5.2f}x")
    print(
        f"  peak memory above the model, each in a fresh process: encode_image "
        f"{m_plain:,.0f} MiB, decompose + scores {m_scores:,.0f} MiB (scores {shape})\n"
    )


def bench_store(images: int, workers: int) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                root / f"{i:05d}.jpg"
            )
        checkpoint = Path(tmp) / "random-vit-b-16.pt"
        torch.save(model.state_dict(), checkpoint)
        _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16")
        from textspan.store import ImageDataset, list_images

        files, _, _ = list_images(root)
        loader = torch.utils.data.DataLoader(
            ImageDataset(root, files, preprocess, 0), batch_size=BATCH, num_workers=workers
        )
        start = time.perf_counter()
        with torch.no_grad():
            for batch in loader:
                model.encode_image(batch)
        plain_rate = len(files) / (time.perf_counter() - start)
        start = time.perf_counter()
        store = extract(
            root,
            Path(tmp) / "store",
            model="ViT-B-16",
            pretrained=str(checkpoint),
            batch_size=BATCH,
            dtype="float16",
            engine=LocalEngine(workers=workers, device="cpu"),
        )
        store_rate = len(store) / (time.perf_counter() - start)
    print(f"{images} images from a folder, batch {BATCH}, {workers} loader workers")
    print(f"  encode_image          {plain_rate:7.2f} images/s")
    print(
        f"  extract to a store    {store_rate:7.2f} images/s"
        f"   {plain_rate / store_rate:5.2f}x the time"
    )


if __name__ == "__main__":
    main()
