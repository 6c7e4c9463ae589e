"""TextSpan benchmark: the Rust core beside its floor and beside the published algorithm, in
one process.

The floor of each case is the product any implementation must compute, timed with NumPy's
float32 BLAS on the same inputs in the same run: for one head from raw outputs, the Gram
product XᵀX of its outputs; for heads from statistics, the pool against each head's
rank-`RANK` basis. The published algorithm runs as the paper's code runs it on a CPU: a NumPy
SVD of the head's outputs, then float32 PyTorch matrix products over all images and texts at
every step. Head outputs are synthetic and low rank like real ones, in float32. The headline
case is a head as wide as ViT-B/L/H heads, 64 directions in D = 768, at the published default
rank 80 (the published algorithm runs at the outputs' numerical rank, its well-defined answer
there), in float32, stored in float16, and in the paper's convention; the others write into
96 directions with a decaying spectrum, and "full rank" adds noise in every direction.
Every time is the best of several runs (3 for one head, 2 for 64 heads), the floor's too, so
that a slow moment of a shared machine does not decide a ratio. Prints figures and ratios;
asserts nothing about time.

    python benches/bench_textspan.py           # everything (about 3 minutes here)
    python benches/bench_textspan.py --quick   # skips the 50,000-image published run
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

import textspan
from textspan import HeadStats, text_span, text_span_heads
from textspan.core.synthetic import low_rank_outputs, low_rank_stats

D, M, RANK, N_TEXTS = 768, 3498, 80, 20


def published(outputs: np.ndarray, texts: np.ndarray, n_texts: int, rank: int) -> list[int]:
    _, _, vh = np.linalg.svd(outputs, full_matrices=False)
    vh = vh[:rank]
    projected = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh).dot(texts.T)).T
    data = torch.from_numpy(outputs).float()
    data = data - data.mean(dim=0, keepdim=True)
    text = torch.from_numpy(projected).float()
    chosen = []
    for _ in range(n_texts):
        best = int(torch.argmax((data @ text.T).std(dim=0)))
        chosen.append(best)
        t = text[best]
        norm = t @ t
        data = data - (data @ t / norm)[:, None] * t[None, :]
        text = text - (text @ t / norm)[:, None] * t[None, :]
    return chosen


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def pool(rng: np.random.Generator, m: int) -> np.ndarray:
    t = np.empty((m, D), dtype=np.float32)
    for start in range(0, m, 10_000):  # in chunks: no float64 copy of a large pool
        chunk = rng.standard_normal((min(10_000, m - start), D), dtype=np.float32)
        t[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return t


def one_head(rng, n: int, texts: np.ndarray, run_published: bool, noise: float = 0.0):
    x = low_rank_outputs(rng, n, D, 96, noise=noise, decay=0.03, dtype=np.float32)
    ours_s, ours = timed(lambda: text_span(x, texts, n_texts=N_TEXTS, rank=RANK), repeat=3)
    floor_s, _ = timed(lambda: x.T @ x, repeat=3)
    label = f"N = {n:,}, M = {len(texts):,}, D = {D}, {N_TEXTS} texts, rank {RANK}"
    if noise:
        label += f", full rank (noise {noise})"
    print(f"\none head from raw outputs: {label}")
    print(f"  textspan   {ours_s:9.3f} s   {ours_s / floor_s:5.2f}x the floor")
    print(f"  floor      {floor_s:9.3f} s   (NumPy float32 XᵀX of the same outputs)")
    if not run_published:
        return ours_s, None
    pub_s, chosen = timed(lambda: published(x, texts, N_TEXTS, RANK))
    same = chosen == ours.indices.tolist()
    print(f"  published  {pub_s:9.3f} s   {pub_s / ours_s:5.1f}x textspan; same selections: {same}")
    return ours_s, pub_s


def narrow_head(rng, texts: np.ndarray) -> None:
    """A 64-wide head at the default rank 80: float32, float16, the paper's convention."""
    x = low_rank_outputs(rng, 10_000, D, 64, noise=0.0, decay=0.03, dtype=np.float32)
    floor_s, _ = timed(lambda: x.T @ x, repeat=3)
    ours_s, ours = timed(lambda: text_span(x, texts, n_texts=N_TEXTS, rank=RANK), repeat=3)
    print(
        f"\none head 64 wide at rank {RANK}: N = 10,000, M = {len(texts):,}, D = {D}, "
        + f"{N_TEXTS} texts"
    )
    print(f"  floor      {floor_s:9.3f} s   (NumPy float32 XᵀX of the same outputs)")
    print(f"  float32    {ours_s:9.3f} s   {ours_s / floor_s:5.2f}x the floor (rank {ours.rank})")
    x16 = x.astype(np.float16)
    half_s, half = timed(lambda: text_span(x16, texts, n_texts=N_TEXTS, rank=RANK), repeat=3)
    print(f"  float16    {half_s:9.3f} s   {half_s / floor_s:5.2f}x the floor (rank {half.rank})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", textspan.RoundingWarning)  # the null-space one, expected
        paper_s, _ = timed(
            lambda: text_span(x, texts, n_texts=N_TEXTS, rank=RANK, convention="paper"), repeat=2
        )
    print(f"  paper      {paper_s:9.3f} s   {paper_s / floor_s:5.2f}x the floor (exactly {RANK})")
    noisy = (x + 0.003 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)
    noisy_s, _ = timed(lambda: text_span(noisy, texts, n_texts=N_TEXTS, rank=RANK), repeat=3)
    print(
        f"  + noise 0.003 {noisy_s:6.3f} s   {noisy_s / floor_s:5.2f}x the floor "
        "(a degenerate cluster straddles the rank)"
    )
    # At the outputs' numerical rank (64 directions and the mean): its well-defined answer.
    pub_s, chosen = timed(lambda: published(x, texts, N_TEXTS, ours.rank))
    same = chosen == ours.indices.tolist()
    print(
        f"  published  {pub_s:9.3f} s   {pub_s / ours_s:5.1f}x textspan (rank {ours.rank}); "
        f"same selections: {same}"
    )


def basis_floor(rng, texts: np.ndarray, heads: int) -> float:
    """The pool against `heads` bases of RANK directions, NumPy float32, in blocks of rows."""
    bases = rng.standard_normal((D, heads * RANK), dtype=np.float32)
    step = 8192

    def products():
        for start in range(0, len(texts), step):
            texts[start : start + step] @ bases

    return timed(products, repeat=2)[0]


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def many_heads_from_stats(rng, m: int, texts: np.ndarray, published_per_head: float | None):
    layers, heads = 4, 16
    stats = [low_rank_stats(rng, 50_000, D, 96, noise=0.0, decay=0.03) for _ in range(64)]
    stacked = HeadStats(
        50_000,
        np.stack([s.mean for s in stats]).reshape(layers, heads, D),
        np.stack([s.covariance for s in stats]).reshape(layers, heads, D, D),
    )
    measure_memory = os.path.exists("/proc/self/clear_refs")
    if measure_memory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size to the current one
    before = rss_kib("VmRSS") if measure_memory else 0
    seconds, _ = timed(
        lambda: text_span_heads(stacked, texts, n_texts=N_TEXTS, rank=RANK, progress=False),
        repeat=2,
    )
    peak = (rss_kib("VmHWM") - before) / 1024 if measure_memory else None
    floor = basis_floor(rng, texts, 64)
    print(f"\n64 heads (4 layers x 16) from statistics, M = {m:,}, {N_TEXTS} texts each")
    print(f"  textspan   {seconds:9.3f} s in all   {seconds / floor:5.2f}x the floor")
    print(
        f"  floor      {floor:9.3f} s   (NumPy float32: the pool against 64 bases of rank {RANK})"
    )
    if published_per_head is not None:
        estimate = 64 * published_per_head
        print(f"  published  {estimate:9.1f} s (64 x the one-head run above, N = 10,000)")
        print(f"  speed-up   {estimate / seconds:9.1f}x")
    if peak is not None:
        size = texts.nbytes / 2**20
        print(
            f"  pool {size:,.0f} MiB; peak memory above the inputs {peak:,.0f} MiB "
            f"({peak / size:.2f}x the pool)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slowest published run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"textspan {textspan.__version__}: {textspan.get_num_threads()} threads; "
        f"torch {torch.__version__}: {torch.get_num_threads()} threads"
    )
    rng = np.random.default_rng(0)
    texts = pool(rng, M)
    narrow_head(rng, texts)
    _, published_10k = one_head(rng, 10_000, texts, run_published=True)
    one_head(rng, 10_000, texts, run_published=True, noise=1e-3)
    one_head(rng, 50_000, texts, run_published=not args.quick)
    many_heads_from_stats(rng, M, texts, published_10k)
    many_heads_from_stats(rng, 200_000, pool(rng, 200_000), None)


if __name__ == "__main__":
    main()
