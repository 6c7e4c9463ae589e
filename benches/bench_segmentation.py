"""Segmentation metrics: the Rust core beside the per-image NumPy / scikit-learn path.

The size of ImageNet-segmentation: 4,276 heatmaps of 16×16 patches (ViT-B/16 at 224 px),
upsampled to 224×224 and scored against binary masks. Both paths compute the same protocol
(bilinear upsampling, clipping, min–max normalisation, threshold at the mean, pixel
accuracy, two-class mIoU, two-channel average precision); the script prints both results,
their difference and the ratio of times. A benchmark, not a test: nothing is asserted.

    .venv/bin/python benches/bench_segmentation.py [--images 4276] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

import textspan


def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    return i0, np.where(i0 + 1 < n_in, i0 + 1, i0), src - i0


def numpy_path(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Image by image, as evaluation scripts of the protocol do it."""
    height, width = masks.shape[1:]
    c0, c1, tc = taps(maps.shape[2], width)
    r0, r1, tr = taps(maps.shape[1], height)
    correct = pixels = 0
    inter, union = np.zeros(2), np.zeros(2)
    aps = []
    for m, mask in zip(maps, masks.astype(bool), strict=True):
        columns = m[:, c0] * (1.0 - tc) + m[:, c1] * tc
        up = columns[r0] * (1.0 - tr)[:, None] + columns[r1] * tr[:, None]
        up = np.where(up > 0, up, 0.0)
        s = (up - up.min()) / (up.max() - up.min())
        predicted = s > s.mean()
        correct += (predicted == mask).sum()
        pixels += mask.size
        for k, (p, t) in enumerate([(~predicted, ~mask), (predicted, mask)]):
            inter[k] += (p & t).sum()
            union[k] += (p | t).sum()
        truth = np.concatenate([~mask.ravel(), mask.ravel()])
        aps.append(average_precision_score(truth, np.concatenate([1 - s.ravel(), s.ravel()])))
    iou = inter / (np.finfo(np.float64).eps + union)
    return {"pixel_accuracy": correct / pixels, "miou": iou.mean(), "map": float(np.mean(aps))}


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random heatmaps and masks correlated with them (an object blob per image)."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, 16, 16))
    yy, xx = np.mgrid[0:224, 0:224]
    centres = rng.uniform(40, 184, (n, 2))
    radii = rng.uniform(20, 80, n)
    masks = np.empty((n, 224, 224), dtype=np.uint8)
    for i in range(n):
        masks[i] = (yy - centres[i, 0]) ** 2 + (xx - centres[i, 1]) ** 2 < radii[i] ** 2
        cy, cx = (centres[i] / 14).astype(int)
        maps[i, max(0, cy - 2) : cy + 3, max(0, cx - 2) : cx + 3] += 2.0
    return maps, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4276)
    parser.add_argument("--threads", type=int, default=0, help="Rust threads (0: one per core)")
    args = parser.parse_args()
    textspan.set_num_threads(args.threads)
    maps, masks = synthetic(args.images)
    print(
        f"{args.images} heatmaps 16×16 → 224×224 with masks; Rust threads: "
        f"{textspan.get_num_threads()}"
    )
    textspan.segmentation_scores(maps[:4], masks[:4])  # starts the thread pool
    start = time.perf_counter()
    rust = textspan.segmentation_scores(maps, masks)
    rust_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = numpy_path(maps, masks)
    numpy_s = time.perf_counter() - start
    for key in rust:
        print(
            f"  {key:<15} rust {rust[key]:.9f}  numpy/sklearn {reference[key]:.9f}  "
            f"|diff| {abs(rust[key] - reference[key]):.1e}"
        )
    print(f"rust           {rust_s:8.2f} s  ({rust_s / args.images * 1e3:.2f} ms per image)")
    print(f"numpy/sklearn  {numpy_s:8.2f} s  ({numpy_s / args.images * 1e3:.2f} ms per image)")
    print(f"speed-up       {numpy_s / rust_s:8.1f}×")


if __name__ == "__main__":
    main()
