"""The demo's report on the toy CLIP: PNGs and one self-contained HTML page (images inlined),
written to teach what the method does and show what this model's heads do."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from .. import report
from ..core.metrics import foreground
from . import world as tw
from .model import describe
from .results import StudyResult

__all__ = ["write"]

FACTOR_COLOURS = {
    "shape": "#e07b39",
    "colour": "#c73e6b",
    "size": "#7f63b8",
    "position": "#2f8fb8",
    "background": "#4b9b4b",
}


def _heads_plot(path: Path, heads: list[Any], layers: int, per_layer: int) -> Path:
    """One cell per head, coloured by its factor, shaded and labelled by its purity."""
    plt = report.pyplot()
    from matplotlib.colors import to_rgb

    grid = np.ones((layers, per_layer, 3))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * per_layer, 0.9 + 0.75 * layers), dpi=120)
    for hf in heads:
        layer, head = hf.head
        colour = np.array(to_rgb(FACTOR_COLOURS[hf.factor]))
        grid[layer, head] = 1 - (1 - colour) * (0.25 + 0.75 * hf.purity)
        ax.text(head, layer, f"{hf.factor}\n{hf.purity:.0%}", ha="center", va="center", fontsize=7)
    ax.imshow(grid, aspect="auto")
    ax.set_xticks(range(per_layer), [f"H{h}" for h in range(per_layer)])
    ax.set_yticks(range(layers), [f"L{layer}" for layer in range(layers)])
    ax.set_title("Each head's factor and purity: what its top-5 TextSpan texts are about")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _inline(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(path.stem)}'>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c if str(c).startswith('<') else html.escape(str(c))}</td>" for c in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def write(out: str | Path, r: StudyResult, explorer: str | None = None) -> Path:
    """Writes the PNGs and `report.html` into `out` and returns the HTML's path; `explorer`
    (a path relative to `out`) is linked from the introduction."""
    folder = report.output_folder(out)
    pngs = _pictures(folder, r)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items())
    convention = (
        "the paper code's (its shares of the final norm's mean and bias, terms divided by "
        "‖r‖, TextSpan at exactly the asked rank)"
        if r.convention == "paper"
        else "textspan's (each term centred by its own mean)"
    )
    sections = [
        *_introduction(explorer),
        f"<p><b>Convention</b>: {convention}; README, “Conventions”.</p>",
        *_world_section(r, pngs),
        *_span_section(r, pngs),
        *_ablation_section(r, pngs),
        *_segmentation_section(r, pngs),
        *_repair_section(r, pngs),
        *_retrieval_section(r, pngs),
        f"<p style='color:#777;font-size:12px'>Timings: {timing}.</p>",
    ]
    path = folder / "report.html"
    path.write_text("\n".join(sections))
    return path


def _pictures(folder: Path, r: StudyResult) -> dict[str, Path]:
    world, held_out = r.world, r.held_out
    layers = 1 + max(hf.head[0] for hf in r.heads)
    per_layer = 1 + max(hf.head[1] for hf in r.heads)
    pngs = {}
    pngs["world"] = report.image_grid(
        folder / "world.png",
        list(world.images[:10]),
        [c.replace(" on ", "\non ").replace(" at ", "\nat ") for c in world.full_captions[:10]],
        "The toy world: every factor of every image is known",
    )
    pngs["heads"] = _heads_plot(folder / "heads.png", r.heads, layers, per_layer)
    pngs["ablation"] = report.line_plot(
        folder / "ablation.png",
        {f: (np.arange(len(a.layers)), a.layers) for f, a in r.ablation.items()},
        "attention layers mean-ablated, from the first",
        "zero-shot accuracy",
        "Accuracy per factor as attention layers are mean-ablated",
    )
    seg = r.segmentation["decomposition"].segmentation
    shown = 6
    normalised = seg.normalised()[:shown]
    pngs["segmentation"] = report.overlays(
        folder / "segmentation.png",
        list(held_out.images[:shown]),
        normalised,
        foreground(normalised),
        [tw.SHAPES[c] for c in seg.classes[:shown]],
    )
    pngs["repair"] = report.repair_plot(folder / "repair.png", r.spurious.result)
    retrieval_images, retrieval_captions = [], []
    for ret in r.retrieval:
        values = world.names(ret.factor)
        retrieval_images.append(world.images[0])
        retrieval_captions.append(f"query\nL{ret.head[0]}.H{ret.head[1]} ({ret.factor})")
        for i in ret.example.indices[:4]:
            retrieval_images.append(world.images[i])
            retrieval_captions.append(str(values[i]))
    if retrieval_images:
        pngs["retrieval"] = report.image_grid(
            folder / "retrieval.png",
            retrieval_images,
            retrieval_captions,
            "Nearest neighbours of one image by one head's contribution",
        )
    return pngs


def _introduction(explorer: str | None) -> list[str]:
    link = (
        f"<p>Every head, its texts and the images at the ends of its directions can be browsed "
        f"in <a href='{html.escape(explorer)}'>the explorer of this model</a>.</p>"
        if explorer
        else ""
    )
    return [
        "<!doctype html><meta charset='utf-8'><title>textspan on the toy CLIP</title>",
        "<style>body{font-family:sans-serif;max-width:62em;margin:2em auto;line-height:1.45;"
        "color:#222}table{border-collapse:collapse;margin:0.6em 0 1.2em}td,th{border:1px solid "
        "#ccc;padding:3px 8px;font-size:13px;text-align:left}img{max-width:100%;"
        "border:1px solid #eee;margin:0.4em 0}h2{margin-top:1.8em;border-bottom:1px solid #ddd}"
        "code{background:#f4f4f4;padding:0 3px}</style>",
        "<h1>What each head of a CLIP writes, in words — checked against ground truth</h1>",
        "<p>This report is what <code>make demo</code> / <code>textspan demo</code> makes. It runs "
        "the method of Gandelsman, Efros and Steinhardt, <i>Interpreting CLIP's Image "
        "Representation via Text-Based Decomposition</i> (ICLR 2024), on a tiny CLIP that this "
        "project trained from scratch on a toy world of its own. In that world every image's "
        "shape, colour, size, position and background are known, so what the method says about "
        "the model can be checked, not just believed.</p>",
        link,
    ]


def _world_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    zero_shot = _table(
        ["factor", "values", "held-out zero-shot accuracy", "chance"],
        [
            [f, ", ".join(tw.NAMES[f]), _pct(a), _pct(1 / len(tw.NAMES[f]))]
            for f, a in r.zero_shot.items()
        ],
    )
    return [
        "<h2>1. The world and the model</h2>",
        "<p>Images of one object on a background, with captions that name a random subset of "
        "the factors. In training, circles were mostly on grass and triangles mostly on water "
        "(90%), a spurious correlation like Waterbirds'. The model (a 4-layer ViT with 8 heads "
        "per layer, and a text transformer) learned every factor: below, the zero-shot accuracy "
        "of choosing among captions that name only that factor, on images it never saw.</p>",
        _inline(pngs["world"]),
        zero_shot,
        "<h2>2. The decomposition</h2>",
        "<p>The image embedding is a sum of direct contributions: one per attention head of "
        "each layer, one per MLP, and the embedding term. The sum of the parts equals the "
        f"model's own embedding up to float rounding: largest relative error "
        f"<b>{r.identity_error:.1e}</b> over 200 images.</p>",
    ]


def _span_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    head_rows = []
    for hf in sorted(r.heads, key=lambda h: -h.purity):
        swatch = f"<span style='color:{FACTOR_COLOURS[hf.factor]}'>&#9632;</span> {hf.factor}"
        head_rows.append(
            [
                f"L{hf.head[0]}.H{hf.head[1]}",
                swatch,
                _pct(hf.purity),
                _pct(hf.explained),
                " · ".join(hf.texts),
            ]
        )
    specific = [hf for hf in r.heads if hf.purity >= 0.8]
    covered = sorted({hf.factor for hf in specific})
    return [
        "<h2>3. TextSpan: what each head writes, in words</h2>",
        "<p>For each head, TextSpan picks from a pool of descriptions of the world (the 19 "
        "texts that each name one value of one factor, such as <i>a red object</i> or <i>an "
        "object at the top left</i>) the texts whose directions explain most of the variance "
        "of the head's contributions, one at a time, removing each chosen direction before the "
        "next. A head is about a factor when its top-5 texts are: its <i>purity</i> is the share "
        "of the variance they explain that goes to texts about that factor (the plain share of "
        "the five texts is beside it; it understates factors with few values, whose variance "
        "is spent after two or three texts). "
        f"<b>{len(specific)}</b> heads have a purity of at least 80%, covering "
        f"<b>{len(covered)}</b> factors ({', '.join(covered) or 'none'}); five texts drawn at "
        f"random would have {_pct(r.chance_purity)} of them about one factor on average.</p>",
        _inline(pngs["heads"]),
        _table(
            ["head", "factor", "purity (top 5)", "variance explained", "top-5 texts"], head_rows
        ),
    ]


def _ablation_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    rows = [
        [
            f,
            _pct(a.conditions["baseline"]),
            _pct(a.conditions["MLPs mean-ablated"]),
            _pct(a.layers[-2]),
        ]
        for f, a in r.ablation.items()
    ]
    return [
        "<h2>4. Which layers matter: mean-ablation</h2>",
        "<p>Replacing a term by its mean over the images removes what it says about each image "
        "while keeping its average. Ablating attention layers from the first shows where each "
        "factor is written; ablating every MLP shows how much goes through them.</p>",
        _inline(pngs["ablation"]),
        _table(
            ["factor", "baseline", "MLPs mean-ablated", "all but the last attention layer ablated"],
            rows,
        ),
    ]


def _segmentation_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    rows = [
        [method, _pct(c.scores["pixel_accuracy"]), _pct(c.scores["miou"]), _pct(c.scores["map"])]
        for method, c in r.segmentation.items()
    ]
    return [
        "<h2>5. Zero-shot segmentation from patch contributions</h2>",
        "<p>The same decomposition split over image patches says where in the image the "
        "contribution to the true shape's text comes from. On 500 held-out images, scored against "
        "the exact object masks, beside the raw-attention baseline (the last layer's class-token "
        "attention averaged over heads, scored the same way):</p>",
        _table(["method", "pixel accuracy", "mIoU", "mAP"], rows),
        _inline(pngs["segmentation"]),
    ]


def _repair_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    spurious = r.spurious
    res = spurious.result
    chosen = ", ".join(f"L{a}.H{b}" for a, b in res.heads)
    strength = spurious.trained["train"]["spurious_strength"]
    random_mean, _ = res.random_mean
    group_rows = [
        [
            f"{spurious.classes[y]} on {spurious.backgrounds[a]}",
            _pct(res.before.groups[(y, a)]),
            _pct(res.after.groups[(y, a)]),
            _pct(res.random_best.groups[(y, a)]),
        ]
        for (y, a) in res.before.groups
    ]
    group_rows.append(
        ["worst group", _pct(res.before.worst), _pct(res.after.worst), _pct(res.random_best.worst)]
    )
    return [
        "<h2>6. Removing a spurious feature by ablating heads</h2>",
        "<p>On balanced groups like those below, the model above has a worst-group accuracy "
        f"of {_pct(r.spurious_on_this_model.worst)}: it reads shape despite its training "
        "correlation. To see a spurious feature removed, the same recipe was trained with "
        "circles on grass and triangles on water "
        f"<b>{strength:.0%}</b> of the time (<code>textspan toy-train --spurious-strength "
        f"{strength:g}</code>; {describe(spurious.trained)}). Shape zero-shot "
        "(circle or triangle) on test groups where every (shape, background) pair is equally "
        "frequent: the groups against the correlation suffer. <code>rank_heads</code> orders "
        "this model's heads by how much of their TextSpan variance texts that mention the "
        "background explain; <code>repair_head_count</code> ablates the first 1, 2, 3, … of "
        "them on one draw of the groups and keeps the count with the best worst-group accuracy "
        f"(<b>{len(res.heads)}</b> heads, {_pct(spurious.validation[len(res.heads)])} on that "
        f"draw); <code>repair</code> then scores them (<b>{chosen}</b>) on a fresh draw, beside "
        f"{len(res.random_draws)} random draws of as many heads (their best, and their mean "
        f"worst-group accuracy: {_pct(random_mean)}).</p>",
        _table(["group", "before", "background heads ablated", "best random heads"], group_rows),
        _inline(pngs["repair"]),
    ]


def _retrieval_section(r: StudyResult, pngs: dict[str, Path]) -> list[str]:
    rows = []
    for x in r.retrieval:
        for source, shares in (("by the head", x.by_head), ("by all heads", x.by_all)):
            cells = [
                f"<b>{_pct(shares[f])}</b>" if f == x.factor else _pct(shares[f])
                for f in tw.FACTORS
            ]
            rows.append([f"L{x.head[0]}.H{x.head[1]} ({x.factor})", source, *cells])
    if r.retrieval:
        chance = r.retrieval[0].chance
        rows.append(["", "chance", *(_pct(chance[f]) for f in tw.FACTORS)])
    return [
        "<h2>7. Retrieval by a head's property</h2>",
        "<p>Representing each image by one head's contribution alone, projected on the head's "
        "first two TextSpan directions (<code>textspan retrieve --project 2</code>), its nearest "
        "neighbours are alike in that head's factor far more than chance; by the whole "
        "representation they are alike in everything the model encodes. Share of the 8 nearest "
        "neighbours of 50 query images that have the query's value of each factor (a head's "
        "contribution is scaled by the image's final LayerNorm, which depends on the "
        "background, so background leaks into every head's neighbours):</p>",
        _table(["head", "neighbours", *tw.FACTORS], rows),
        _inline(pngs["retrieval"]) if "retrieval" in pngs else "",
    ]
