"""A static site to browse a store's heads, their texts and images (`textspan explore`).

Plain files that open from disk, or from any web server, and need nothing from the network:

    index.html           the model and data, the mean-ablation summary, a grid of every
                         analysed head coloured by the topic of its TextSpan texts, and a
                         search box that filters heads by the words of their texts
    heads/L<l>H<h>.html  one page per head: its texts with the variance each explains, the
                         images at both ends of its first directions, its mean-ablation effect,
                         nearest neighbours by the head for a few images
    samples/<i>.html     one page per sample image: heatmaps of where each layer, and the
                         strongest heads, write along the image's own representation
    thumbs/, maps/       small JPEG files, each made once

Everything the pages show comes from one pass over the store (`_one_pass`) and, for the
sample pages, one decomposition of the sample images.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .analysis.sources import chunks, rows_f32
from .core.pools import topic_of
from .core.span import SpanResult, text_span_heads
from .datasets import reader_of
from .errors import FewerTextsWarning, InputError, RoundingWarning
from .store.images import MEMBER_SEPARATOR

__all__ = ["Site", "build_site", "make_server", "serve"]

PALETTE = (
    "#e07b39 #c73e6b #7f63b8 #2f8fb8 #4b9b4b #b8a02f #8c564b #e377c2 #17becf #bcbd22 "
    "#1f77b4 #ff7f0e #9467bd #d62728 #2ca02c #7f7f7f"
).split()
THUMB = 96
TEXTS_PER_HEAD = 10
DIRECTIONS = 2  # directions per head shown with the images at their ends
ENDS = 5  # images at each end
QUERIES = 3  # query images per head for the nearest neighbours
NEIGHBOURS = 5
FEATURES = 10  # TextSpan directions a head's neighbours are found in


@dataclass
class Site:
    """What `build_site` wrote."""

    path: Path
    pages: int
    files: int
    bytes: int
    seconds: float


@dataclass
class _Head:
    key: tuple[int, int]
    span: SpanResult
    topic: str
    topic_share: float
    variance_share: float
    ends: list[tuple[list[int], list[int]]] = field(default_factory=list)
    neighbours: list[tuple[int, list[int]]] = field(default_factory=list)
    ablated_accuracy: float | None = None

    @property
    def name(self) -> str:
        return f"L{self.key[0]}.H{self.key[1]}"

    @property
    def page(self) -> str:
        return f"L{self.key[0]}H{self.key[1]}.html"


def _percent(x: float) -> str:
    """A share with two significant digits: 9.7%, 0.41%, 0.032%."""
    return f"{100 * x:.2g}%"


def _topic(span: SpanResult, topics: dict[str, list[str]]) -> tuple[str, float]:
    """The topic most of the head's first five texts' explained variance is about."""
    weights: dict[str, float] = {}
    for text, share in zip((span.texts or [])[:5], span.explained[:5], strict=False):
        topic = topic_of(text, topics)
        weights[topic] = weights.get(topic, 0.0) + max(float(share), 0.0)
    total = sum(weights.values())
    if not total:
        return "other", 0.0
    best = max(weights, key=weights.get)
    return best, weights[best] / total


def _one_pass(store: Any, heads: list[_Head], classifier: np.ndarray | None) -> float | None:
    """Projections on each head's directions, neighbours' features and mean-ablation
    accuracies, in one pass over the store's rows. Returns the baseline accuracy."""
    n = len(store)
    keys = tuple(np.array([h.key for h in heads]).T)
    means = np.stack([h.span.mean for h in heads]).astype(np.float32)  # [K, D]
    bases = [h.span.directions[:FEATURES].astype(np.float32) for h in heads]
    projections = [np.zeros((n, len(b)), dtype=np.float32) for b in bases]
    labels = np.asarray(store.labels)
    correct = np.zeros(len(heads) + 1, dtype=np.int64)
    for rows in chunks(store, n, False, "explore"):
        every = rows_f32(store.heads, rows)
        x = every[:, keys[0], keys[1]] - means  # [n, K, D]
        for i, b in enumerate(bases):
            projections[i][rows] = x[:, i] @ b.T
        if classifier is not None:
            rep = every.sum((1, 2)) + rows_f32(store.mlps, rows).sum(1)
            y = labels[rows]
            correct[0] += ((rep @ classifier).argmax(-1) == y).sum()
            for i in range(len(heads)):
                correct[i + 1] += (((rep - x[:, i]) @ classifier).argmax(-1) == y).sum()
    rng = np.random.default_rng(0)
    queries = rng.choice(n, min(QUERIES, n), replace=False) if n > 1 else []
    for i, head in enumerate(heads):
        p = projections[i]
        for d in range(min(DIRECTIONS, p.shape[1])):
            order = np.argsort(-p[:, d], kind="stable")
            head.ends.append((order[:ENDS].tolist(), order[::-1][:ENDS].tolist()))
        unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-30)
        for q in queries:
            similarity = unit @ unit[q]
            similarity[q] = -np.inf
            head.neighbours.append((int(q), np.argsort(-similarity)[:NEIGHBOURS].tolist()))
        if classifier is not None:
            head.ablated_accuracy = float(correct[i + 1] / n)
    return None if classifier is None else float(correct[0] / n)


def _variance_total(store: Any) -> float:
    """The total variance of the representation (trace of its covariance)."""
    n = len(store)
    s1 = s2 = 0.0
    for rows in chunks(store, n, False, "variance"):
        r = rows_f32(store.representation, rows).astype(np.float64)
        s1 = s1 + r.sum(0)
        s2 = s2 + (r * r).sum(0)
    return float((s2 / n - (s1 / n) ** 2).sum())


class _Thumbs:
    """Small JPEGs of the store's images, each made once. A thumbnail is named by what
    identifies its image (the path, size and modification time), so a site rebuilt into the
    same folder from another store, or after an image changed, never shows a stale one."""

    def __init__(self, folder: Path, root: Path, files: list[str], dataset: str = "folder"):
        self.folder, self.root, self.files = folder, root, files
        self.read = reader_of(dataset)
        folder.mkdir(parents=True, exist_ok=True)

    def name(self, row: int) -> str:
        file = self.files[row]
        container = self.root / file.split(MEMBER_SEPARATOR, 1)[0]  # a shard, for a member
        stat = container.stat()
        identity = f"{container.resolve()}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return hashlib.blake2b(identity.encode(), digest_size=10).hexdigest() + ".jpg"

    def __call__(self, row: int) -> str:
        name = self.name(row)
        path = self.folder / name
        if not path.exists():
            im = self.read(self.root, self.files[row])
            im.thumbnail((THUMB, THUMB))
            im.save(path, quality=85)
        return f"thumbs/{name}"


STYLE = """
body{font-family:sans-serif;margin:1.5em auto;max-width:70em;color:#222;line-height:1.4}
a{color:#1f5fa8;text-decoration:none} a:hover{text-decoration:underline}
.grid{display:grid;gap:4px;margin:1em 0}
.cell{display:block;padding:6px;border-radius:4px;color:#111;font-size:12px;min-height:3.2em}
.cell.hidden{opacity:0.12}
.bar{display:inline-block;height:10px;background:#4b7bbf;vertical-align:middle}
tr.rounding td{color:#999;font-style:italic}
table{border-collapse:collapse} td,th{padding:2px 8px;font-size:13px;text-align:left}
.thumbs img{width:96px;height:96px;object-fit:cover;margin:2px;border:1px solid #ddd}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
input{font-size:15px;padding:4px 8px;width:22em}
.maps figure{display:inline-block;margin:4px;text-align:center;font-size:12px}
.maps img{width:160px;height:160px}
"""

SEARCH = """
const box = document.getElementById('search');
const count = document.getElementById('count');
function filter() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(w => w);
  let shown = 0;
  document.querySelectorAll('.cell').forEach(cell => {
    const texts = cell.dataset.texts;
    const hit = words.every(w => texts.includes(w));
    cell.classList.toggle('hidden', !hit);
    if (hit) shown += 1;
  });
  count.textContent = shown + ' heads';
}
box.addEventListener('input', filter);
filter();
"""


def _page(title: str, body: str, depth: int = 0, script: str = "") -> str:
    up = "../" * depth
    return (
        f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><link rel='stylesheet' href='{up}style.css'><body>"
        f"<p><a href='{up}index.html'>textspan explorer</a></p>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>"
    )


def _overview(
    info: dict[str, str],
    heads: list[_Head],
    colours: dict[str, str],
    layers: list[int],
    per_layer: int,
    baseline: float | None,
    samples: list[int],
) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in info.items()
    )
    if baseline is not None:
        worst = sorted(heads, key=lambda h: h.ablated_accuracy)[:5]
        ablation = (
            f"<p>Zero-shot accuracy {baseline:.1%}; mean-ablating one head at a time, the "
            "heads it depends on most: "
            + ", ".join(
                f"<a href='heads/{h.page}'>{h.name}</a> {h.ablated_accuracy - baseline:+.1%}"
                for h in worst
            )
            + ".</p>"
        )
    else:
        ablation = "<p>No mean-ablation summary: the store's images have no class labels.</p>"
    cells = []
    by_key = {h.key: h for h in heads}
    for layer in layers:
        for h in range(per_layer):
            head = by_key[(layer, h)]
            texts = " | ".join((head.span.texts or [])[:5])
            cells.append(
                f"<a class='cell' href='heads/{head.page}' style='background:"
                f"{colours[head.topic]}{int(40 + 200 * head.topic_share):02x}' "
                f"data-texts='{html.escape(' '.join(head.span.texts or []).lower())}' "
                f"title='{html.escape(texts)}'><b>{head.name}</b><br>{html.escape(head.topic)} "
                f"{head.topic_share:.0%}<br>var {_percent(head.variance_share)}</a>"
            )
    legend = "".join(
        f"<span><span style='color:{c}'>&#9632;</span> {html.escape(t)}</span>"
        for t, c in colours.items()
    )
    sample_links = " · ".join(
        f"<a href='samples/{i}.html'>image {row}</a>" for i, row in enumerate(samples)
    )
    body = (
        "<h1>Heads of the model, in words</h1>"
        f"<table>{rows}</table>{ablation}"
        "<h2>Every head of the analysed layers</h2>"
        "<p>Coloured by the topic most of the variance of its first five TextSpan texts is "
        "about (shade: that share); <i>var</i> is the head's variance relative to the "
        "representation's.</p>"
        "<p><input id='search' placeholder='filter heads by the words of their texts' "
        "aria-label='search'> <span id='count'></span></p>"
        f"<div class='legend'>{legend}</div>"
        f"<div class='grid' style='grid-template-columns:repeat({per_layer},1fr)'>"
        + "".join(cells)
        + "</div>"
        + (f"<h2>Sample images</h2><p>{sample_links}</p>" if samples else "")
    )
    return _page("textspan explorer", body, script=SEARCH)


def _rounding(span: Any, i: int) -> bool:
    return span.stable is not None and i >= span.stable


def _stability_line(span: Any) -> str:
    if span.stable is None or span.stable >= min(len(span), TEXTS_PER_HEAD):
        return ""
    dropped = (
        " (or when the directions beyond their rank were dropped)"
        if span.convention == "paper"
        else ""
    )
    return (
        f"<p class='note'>Texts after the first {span.stable} (in grey) changed when the "
        f"head's outputs were perturbed at rounding level{dropped}: rounding, not the head, "
        "decided them.</p>"
    )


def _head_page(head: _Head, thumb: Any, baseline: float | None) -> str:
    span = head.span
    top = float(span.explained.max()) if len(span) else 1.0
    rows = "".join(
        ("<tr class='rounding' title='decided by rounding'>" if _rounding(span, i) else "<tr>")
        + f"<td>{i + 1}</td><td>{html.escape(text)}</td><td><span class='bar' style="
        f"'width:{int(200 * share / top)}px'></span> {share:.1%}</td></tr>"
        for i, (text, share) in enumerate(
            zip((span.texts or [])[:TEXTS_PER_HEAD], span.explained[:TEXTS_PER_HEAD], strict=False)
        )
    )

    def images(rows: list[int]) -> str:
        return "".join(f"<img src='../{thumb(r)}' alt='image {r}' title='image {r}'>" for r in rows)

    ends = "".join(
        f"<h3>Direction {d + 1} ({html.escape((span.texts or ['?'] * (d + 1))[d])})</h3>"
        f"<p>Furthest along it:</p><div class='thumbs'>{images(top_rows)}</div>"
        f"<p>Furthest against it:</p><div class='thumbs'>{images(bottom_rows)}</div>"
        for d, (top_rows, bottom_rows) in enumerate(head.ends)
    )
    neighbours = "".join(
        f"<div class='thumbs'>{images([q])} &rarr; {images(found)}</div>"
        for q, found in head.neighbours
    )
    effect = (
        f"<p>Mean-ablating this head: zero-shot accuracy {baseline:.1%} &rarr; "
        f"{head.ablated_accuracy:.1%} ({head.ablated_accuracy - baseline:+.1%}).</p>"
        if baseline is not None and head.ablated_accuracy is not None
        else ""
    )
    body = (
        f"<h1>Head {head.name}</h1><p>Topic: {html.escape(head.topic)} "
        f"({head.topic_share:.0%} of its first five texts' variance); variance "
        f"{_percent(head.variance_share)} of the representation's; span of rank {span.rank}.</p>"
        f"{effect}<h2>TextSpan texts</h2>{_stability_line(span)}<table><tr><th></th><th>text</th>"
        f"<th>variance explained</th></tr>{rows}</table>"
        f"<h2>Images at the ends of its first directions</h2>{ends}"
        f"<h2>Nearest neighbours by this head</h2>{neighbours}"
    )
    return _page(f"Head {head.name}", body, depth=1)


def _colour_map(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> [h, w, 3] uint8, dark blue to yellow."""
    stops = np.array([[48, 18, 59], [33, 145, 140], [253, 231, 37]], dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    t = (x - low)[..., None]
    return ((1 - t) * stops[low] + t * stops[low + 1]).astype(np.uint8)


def _overlay(image: Any, grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    size = (160, 160)
    base = image.convert("RGB").resize(size)
    g = grid - grid.min()
    g = g / g.max() if g.max() > 0 else g
    heat = Image.fromarray(_colour_map(g)).resize(size, Image.BILINEAR)
    Image.blend(base, heat, 0.55).save(path, quality=85)


def _sample_pages(
    folder: Path,
    store: Any,
    root: Path,
    model: Any,
    preprocess: Any,
    samples: list[int],
    heads: list[_Head],
) -> list[str]:
    """One page per sample image: each layer's, and the strongest heads', token maps along
    the image's own representation."""
    import torch

    from .models import Decomposer

    (folder / "maps").mkdir(exist_ok=True)
    (folder / "samples").mkdir(exist_ok=True)
    strongest = sorted(heads, key=lambda h: -h.variance_share)[:4]
    files = store.files
    pages = []
    with Decomposer(model) as decomposer:
        grid = decomposer.tower.grid_size
        device = next(model.parameters()).device
        for i, row in enumerate(samples):
            image = reader_of(store.manifest.dataset)(root, files[row])
            with torch.no_grad():
                parts = decomposer.decompose(preprocess(image)[None].to(device), spatial=True)
                r = parts.representation / parts.representation.norm(dim=-1, keepdim=True)
                patches = slice(parts.prefix_tokens, None)
                scores = parts.scores(r)[0, :, patches, :, 0].cpu().numpy()  # [L, P, H]
            figures = []
            for layer in range(scores.shape[0]):
                name = f"maps/{i}-L{layer}.jpg"
                _overlay(image, scores[layer].sum(-1).reshape(grid), folder / name)
                figures.append((f"layer {layer}", name))
            for head in strongest:
                name = f"maps/{i}-{head.page[:-5]}.jpg"
                layer, h = head.key
                _overlay(image, scores[layer, :, h].reshape(grid), folder / name)
                figures.append((head.name, name))
            thumb = f"maps/{i}.jpg"
            image.resize((160, 160)).save(folder / thumb, quality=85)
            body = (
                f"<h1>Image {row}: {html.escape(files[row])}</h1><p>Where each layer (all its "
                "heads), and the heads with the most variance, write along this image's own "
                "representation (each map scaled to its own range).</p><div class='maps'>"
                f"<figure><img src='../{thumb}' alt='image'><figcaption>the image</figcaption>"
                "</figure>"
                + "".join(
                    f"<figure><img src='../{src}' alt='{html.escape(caption)}'><figcaption>"
                    f"{html.escape(caption)}</figcaption></figure>"
                    for caption, src in figures
                )
                + "</div>"
            )
            (folder / "samples" / f"{i}.html").write_text(_page(f"Image {row}", body, depth=1))
            pages.append(f"samples/{i}.html")
    return pages


def build_site(
    store: Any,
    out: str | Path,
    *,
    pool: list[str],
    pool_embeddings: np.ndarray,
    topics: dict[str, list[str]],
    layers: int = 4,
    samples: int = 6,
    images: str | Path | None = None,
    model: Any = None,
    preprocess: Any = None,
    classifier: np.ndarray | None = None,
    info: dict[str, str] | None = None,
    progress: bool = True,
) -> Site:
    """Writes the explorer of `store` into `out` (see the module docstring).

    Args:
        pool, pool_embeddings: the texts TextSpan chooses from, and their embeddings [M, D].
        topics: topic -> the words that mark a text as about it (`core.pools.topic_of`).
        layers: the last `layers` layers' heads are analysed.
        samples: sample image pages (they need `model` and `preprocess`; 0 for none).
        images: where the store's images are (default: the folder the manifest names).
        classifier: [D, C] zero-shot classifier for the mean-ablation figures (None: none).
        info: lines for the overview (model, tag, data, ...).
    """
    start = time.perf_counter()
    total_layers, per_layer = store.heads.shape[1:3]
    if not 1 <= layers <= total_layers:
        raise InputError(f"layers: expected 1..{total_layers} (the model's layers), got {layers}")
    root = Path(images if images is not None else store.manifest.images)
    if not root.is_dir():
        raise InputError(
            f"images: the store's images are not at {root}; pass --images with their folder"
        )
    if samples and (model is None or preprocess is None):
        raise InputError("samples: sample pages need the model and its preprocessing")
    folder = Path(out)
    (folder / "heads").mkdir(parents=True, exist_ok=True)
    analysed = list(range(total_layers - layers, total_layers))
    keys = [(layer, h) for layer in analysed for h in range(per_layer)]
    with warnings.catch_warnings():
        # Heads narrower than TEXTS_PER_HEAD yield fewer texts, and the paper's convention
        # picks some by rounding: the pages show what each head has, and where it is stable.
        warnings.simplefilter("ignore", FewerTextsWarning)
        warnings.simplefilter("ignore", RoundingWarning)
        spans = text_span_heads(
            [store.stats[k] for k in keys],
            pool_embeddings,
            n_texts=min(TEXTS_PER_HEAD, len(pool)),
            texts=pool,
            progress=progress,
            convention=store.convention,
            stability=True,
        )
    variance = _variance_total(store)
    heads = []
    for key, span in zip(keys, spans, strict=True):
        topic, share = _topic(span, topics)
        heads.append(_Head(key, span, topic, share, span.total_variance / max(variance, 1e-30)))
    baseline = _one_pass(store, heads, classifier)
    thumb = _Thumbs(folder / "thumbs", root, store.files, store.manifest.dataset)
    topic_names = list(dict.fromkeys([*topics, "other"]))
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(topic_names)}
    for head in heads:
        (folder / "heads" / head.page).write_text(_head_page(head, thumb, baseline))
    chosen = np.linspace(0, len(store) - 1, min(samples, len(store))).astype(int).tolist()
    sample_pages = (
        _sample_pages(folder, store, root, model, preprocess, chosen, heads) if samples else []
    )
    (folder / "style.css").write_text(STYLE)
    overview = _overview(
        info or {}, heads, colours, analysed, per_layer, baseline, chosen if samples else []
    )
    (folder / "index.html").write_text(overview)
    (folder / "site.json").write_text(
        json.dumps({"heads": len(heads), "samples": len(sample_pages), "store": str(store.path)})
    )
    files = [p for p in folder.rglob("*") if p.is_file()]
    return Site(
        path=folder / "index.html",
        pages=1 + len(heads) + len(sample_pages),
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - start,
    )


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """An HTTP server of the site's folder and nothing else, read-only (GET and HEAD only;
    anything else is answered 501), bound to `host` (this machine only, by default)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except (OSError, OverflowError) as e:  # in use, not ours, or not a port (0..65535)
        raise InputError(f"port: cannot serve on {host}:{port} ({e})") from None


def serve(server: Any, folder: str | Path) -> None:
    """Serves the site's folder with a server of `make_server` until Ctrl-C."""
    with server:
        host, port = server.server_address[:2]
        print(f"serving {folder} at http://{host}:{port}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
