"""Writing results: one output folder per command, tables (CSV, JSON, Markdown, HTML), plots
and images. Plots use matplotlib's Agg backend, so no display is needed."""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "crop_rgb",
    "image_grid",
    "line_plot",
    "output_folder",
    "overlays",
    "repair_plot",
    "span_html",
    "span_markdown",
    "write_csv",
    "write_json",
]


def output_folder(path: str | os.PathLike) -> Path:
    """Creates the folder (and parents) and returns it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    # File names that are not UTF-8 (read with Python's surrogate escapes) are written back
    # as the bytes they were.
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_json(path: Path, data: Any) -> Path:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    path.write_text(json.dumps(data, indent=1, default=default))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    hlines: dict[str, float] | None = None,
    percent: bool = True,
) -> Path:
    """One line per series {label: (x, y)}, with labelled horizontal reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, (x, y) in series.items():
        y = np.asarray(y) * (100 if percent else 1)
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
    for i, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(
            value * (100 if percent else 1), ls="--", lw=1, color=f"C{i + len(series)}", label=label
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def repair_plot(path: Path, result: Any) -> Path:
    """Worst-group and average accuracy before, after ablating the chosen heads, and for the
    best and the mean of the random draws of as many heads (an `analysis.RepairResult`)."""
    plt = pyplot()
    names = ["before", "heads ablated"]
    bars = [(g.worst, g.average) for g in (result.before, result.after)]
    if result.random_draws:
        names += ["best random heads", "mean random heads"]
        bars += [(result.random_best.worst, result.random_best.average), result.random_mean]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [worst * 100 for worst, _ in bars], 0.4, label="worst group")
    ax.bar(x + 0.2, [average * 100 for _, average in bars], 0.4, label="average")
    ax.set_xticks(x, names)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"Mean-ablating {len(result.heads)} heads about the spurious property")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def load_rgb(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file resized and centre-cropped to size × size, as the models see it."""
    from PIL import Image

    with Image.open(path) as im:
        return crop_rgb(im, size)


def crop_rgb(im: Any, size: int) -> np.ndarray:
    """A PIL image resized (shorter side) and centre-cropped to size × size RGB."""
    im = im.convert("RGB")
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))))
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def image_grid(
    path: Path,
    images: Sequence[str | os.PathLike | np.ndarray],
    captions: Sequence[str],
    title: str,
    columns: int = 5,
    size: int = 160,
) -> Path:
    """A grid of images (files, centre-cropped, or [H, W, 3] arrays) with captions."""
    plt = pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image if isinstance(image, np.ndarray) else load_rgb(image, size))
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def overlays(
    path: Path,
    images: Sequence[np.ndarray],
    heatmaps: np.ndarray,
    masks: np.ndarray,
    captions: Sequence[str],
    columns: int = 4,
) -> Path:
    """Each image beside its heatmap overlay and its thresholded segmentation (three panels
    per image)."""
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows + 0.3), dpi=100, squeeze=False)
    for i, (image, heat, mask, caption) in enumerate(
        zip(images, heatmaps, masks, captions, strict=True)
    ):
        a, b, c = axes[i]
        a.imshow(image)
        a.set_title(caption, fontsize=8)
        b.imshow(image)
        b.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        b.set_title("heatmap", fontsize=8)
        c.imshow(image * mask[..., None] + (image * 0.25 * ~mask[..., None]).astype(image.dtype))
        c.set_title("segmentation", fontsize=8)
        for ax in (a, b, c):
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


STABILITY_NOTE = (
    "Picks marked *rounding* changed when the head's outputs were perturbed at rounding level"
    " (or, in the paper's convention, when the directions beyond the outputs' rank were"
    " dropped): rounding, not the head, decided them."
)


def _unstable(h: dict[str, Any], i: int) -> bool:
    """Whether pick i of a head record is past its stable prefix."""
    return h.get("stable") is not None and i >= h["stable"]


def span_markdown(heads: Sequence[dict[str, Any]]) -> str:
    """Markdown: per head, its texts, the variance each explains, and which picks rounding
    decided."""
    lines = ["# TextSpan: what each head writes, in words", ""]
    conventions = sorted({h.get("convention", "textspan") for h in heads})
    lines += [f"Convention: {', '.join(conventions)}. {STABILITY_NOTE}", ""]
    for h in heads:
        lines.append(
            f"## Layer {h['layer']}, head {h['head']} — {h['explained']:.1%} of its variance"
        )
        lines.append("")
        lines.append("| # | text | variance explained | stable |")
        lines.append("|---|------|-------------------:|--------|")
        for i, (text, share) in enumerate(zip(h["texts"], h["explained_each"], strict=True)):
            mark = "*rounding*" if _unstable(h, i) else "yes"
            lines.append(f"| {i + 1} | {text.replace('|', '/')} | {share:.2%} | {mark} |")
        lines.append("")
    return "\n".join(lines)


def span_html(heads: Sequence[dict[str, Any]], title: str) -> str:
    """A self-contained HTML page with one table per head."""
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:auto}"
        "table{border-collapse:collapse;margin:0.5em 1em 1.5em 0;display:inline-table;"
        "vertical-align:top}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "td.v{text-align:right}tr.rounding td{color:#999;font-style:italic}</style>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(STABILITY_NOTE.replace('*rounding*', 'in grey italics'))}</p>",
    ]
    for h in heads:
        rows = "".join(
            ("<tr class=rounding title='decided by rounding'>" if _unstable(h, i) else "<tr>")
            + f"<td>{i + 1}</td><td>{html.escape(t)}</td><td class=v>{s:.2%}</td></tr>"
            for i, (t, s) in enumerate(zip(h["texts"], h["explained_each"], strict=True))
        )
        parts.append(
            f"<table><caption><b>L{h['layer']}.H{h['head']}</b> "
            f"({h['explained']:.1%} explained)</caption>"
            f"<tr><th>#</th><th>text</th><th>var.</th></tr>{rows}</table>"
        )
    return "\n".join(parts)
