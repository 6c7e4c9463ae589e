"""The paper's experiments end to end: from a store (or an image folder) to an output folder of
tables, plots and images. Each `textspan <command>` is one of these functions; they print
what they write and return the results.

    store = textspan.open_store("stores/val")
    textspan.experiments.span_study(store, "out/span", layers=4)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import analysis, report
from .pools import common_words, default_pool, load_texts
from .span import SpanResult, text_span_heads

__all__ = [
    "ablation_study",
    "class_names",
    "repair_study",
    "retrieval",
    "segmentation",
    "span_study",
]


# model, classes, texts ------------------------------------------------------------------------


def _model_of(store: Any, device: str | None) -> tuple[Any, Any, Any]:
    from .models import load

    m = store.manifest
    return load(m["model"], pretrained=m["pretrained"], device=device, precision=m["precision"])


def class_names(folders: Sequence[str], classes_file: str | os.PathLike | None = None) -> list[str]:
    """Class names for a classifier: one per line of `classes_file` ("imagenet": open_clip's
    ImageNet names), else the folder names — ImageNet synset folders (n01440764 …) become
    ImageNet names, other names have underscores replaced by spaces."""
    import open_clip

    if classes_file is not None:
        if str(classes_file) == "imagenet":
            return list(open_clip.IMAGENET_CLASSNAMES)
        names = load_texts(classes_file)
        if folders and len(names) != len(folders):
            raise ValueError(
                f"classes file {classes_file}: expected {len(folders)} names (one per class "
                f"folder), got {len(names)}"
            )
        return names
    if not folders:
        raise ValueError("classes: the images have no class folders; pass a classes file")
    if len(folders) == 1000 and all(re.fullmatch(r"n\d{8}", f) for f in folders):
        return list(open_clip.IMAGENET_CLASSNAMES)
    return [f.replace("_", " ") for f in folders]


TEMPLATE_SETS = {"simple": ["a photo of a {}."]}


def _templates(templates: str | None) -> list[str] | None:
    if templates in (None, "openai"):
        return None  # open_clip's OpenAI ImageNet templates
    if templates in TEMPLATE_SETS:
        return TEMPLATE_SETS[templates]
    found = load_texts(templates)
    if not all("{}" in t for t in found):
        raise ValueError(f"templates {templates}: expected every line to contain '{{}}'")
    return found


def _classifier(model: Any, tokenizer: Any, names: list[str], templates: str | None) -> np.ndarray:
    from .models import zero_shot_classifier

    return zero_shot_classifier(model, tokenizer, names, _templates(templates))


def _check_labels(store: Any) -> None:
    if len(store) == 0:
        raise ValueError(f"store {store.path} is empty")
    if (np.asarray(store.labels) < 0).any():
        raise ValueError(
            f"store {store.path}: accuracy needs a class label per image, but its images were "
            "extracted from a flat folder (labels -1). Extract an ImageFolder layout."
        )


def _check_layers(store: Any, layers: int) -> range:
    total = store.heads.shape[1]
    if not 1 <= layers <= total:
        raise ValueError(f"layers: expected 1..{total} (the model's layers), got {layers}")
    return range(total - layers, total)


def _pool(pool: str | os.PathLike | None) -> list[str]:
    return default_pool() if pool is None else load_texts(pool)


# ablation -------------------------------------------------------------------------------------


def ablation_study(
    store: Any,
    out: str | os.PathLike,
    means: Any = None,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> analysis.AblationResult:
    """Mean-ablation study → ablation.csv, ablation_layers.csv, ablation.png."""
    _check_labels(store)
    model, _, tokenizer = _model_of(store, device)
    w = _classifier(model, tokenizer, class_names(store.classes, classes_file), templates)
    result = analysis.ablation(store, w, means=means, progress=progress)
    folder = report.output_folder(out)
    report.write_csv(folder / "ablation.csv", ["condition", "accuracy"], result.conditions.items())
    layers = np.arange(len(result.layers))
    report.write_csv(
        folder / "ablation_layers.csv",
        ["attention_layers_mean_ablated", "accuracy"],
        zip(layers, result.layers, strict=True),
    )
    report.line_plot(
        folder / "ablation.png",
        {"attention layers 0..k−1 mean-ablated": (layers, result.layers)},
        "attention layers mean-ablated, from the first",
        "zero-shot accuracy",
        f"Mean-ablation ({result.count} images)",
        hlines={k: v for k, v in result.conditions.items() if k != "baseline"},
    )
    print(result.table())
    print(f"written: {folder}")
    return result


# TextSpan and replacement ---------------------------------------------------------------------


def _spans(
    store: Any,
    heads: list[tuple[int, int]],
    embeddings: np.ndarray,
    texts: list[str] | None,
    n_texts: int,
    rank: int,
    progress: bool,
) -> dict[tuple[int, int], SpanResult]:
    stats = [store.stats[layer, head] for layer, head in heads]
    with warnings.catch_warnings():
        # A head spans at most its value width (64 in ViT-B/16), so asking for more texts
        # than that is expected here; the tables show how many each head yielded.
        warnings.simplefilter("ignore", RuntimeWarning)
        found = text_span_heads(
            stats, embeddings, n_texts=n_texts, rank=rank, texts=texts, progress=progress
        )
    return dict(zip(heads, found, strict=True))


def _head_record(key: tuple[int, int], span: SpanResult, shown: int) -> dict[str, Any]:
    return {
        "layer": key[0],
        "head": key[1],
        "texts": (span.texts or [])[:shown],
        "explained_each": span.explained[:shown].tolist(),
        "explained": float(span.explained[:shown].sum()),
        "total_variance": span.total_variance,
    }


def span_study(
    store: Any,
    out: str | os.PathLike,
    layers: int = 4,
    n_texts: int = 10,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    words: str | os.PathLike | None = None,
    max_texts: int = 60,
    replace: bool = True,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """TextSpan for every head of the last `layers` layers → span.json, span.md, span.html;
    and the replacement study for the text pool, common words and random directions →
    replacement.csv, replacement.png."""
    span_layers = _check_layers(store, layers)
    if n_texts < 1 or max_texts < 1:
        raise ValueError(f"n_texts and max_texts: expected >= 1, got {n_texts} and {max_texts}")
    if replace:
        _check_labels(store)
    texts = _pool(pool)
    word_list = common_words() if words is None else load_texts(words)
    model, _, tokenizer = _model_of(store, device)
    from .models import encode_texts

    dim = store.heads.shape[-1]
    depth = min(max(n_texts, max_texts if replace else 0), rank, dim, len(texts), len(word_list))
    keys = [(layer, h) for layer in span_layers for h in range(store.heads.shape[2])]
    embeddings = encode_texts(model, tokenizer, texts, progress=progress)
    spans = _spans(store, keys, embeddings, texts, max(n_texts, depth), rank, progress)
    folder = report.output_folder(out)
    records = [_head_record(k, s, n_texts) for k, s in spans.items()]
    report.write_json(folder / "span.json", {"pool_size": len(texts), "heads": records})
    (folder / "span.md").write_text(report.span_markdown(records))
    (folder / "span.html").write_text(report.span_html(records, "TextSpan: each head in words"))
    for r in records[: min(4, len(records))]:
        print(f"L{r['layer']}.H{r['head']}: " + "; ".join(r["texts"][:5]))
    result: dict[str, Any] = {"spans": spans}
    if replace:
        w = _classifier(model, tokenizer, class_names(store.classes, classes_file), templates)
        rng = np.random.default_rng(seed)
        random_dirs = rng.standard_normal((len(texts), dim)).astype(np.float32)
        pools = {
            "text pool": spans,
            "common words": _spans(
                store,
                keys,
                encode_texts(model, tokenizer, word_list, progress=progress),
                word_list,
                depth,
                rank,
                progress,
            ),
            "random directions": _spans(store, keys, random_dirs, None, depth, rank, progress),
        }
        # Up to the texts every pool yielded (a head's span may be narrower than `depth`).
        depth = min(max(len(r) for r in s.values()) for s in pools.values())
        curves = {
            name: analysis.replacement(store, w, s, max_texts=depth, progress=progress)
            for name, s in pools.items()
        }
        baseline = next(iter(curves.values())).baseline
        n = curves["text pool"].n_texts
        report.write_csv(
            folder / "replacement.csv",
            ["n_texts", *curves],
            [[int(i), *(float(c.accuracy[i]) for c in curves.values())] for i in n],
        )
        report.line_plot(
            folder / "replacement.png",
            {name: (c.n_texts, c.accuracy) for name, c in curves.items()},
            "texts per head (n)",
            "zero-shot accuracy",
            f"Last {layers} layers' heads replaced by n-text reconstructions",
            hlines={"baseline": baseline},
        )
        print(
            f"replacement with {depth} texts per head: "
            + ", ".join(f"{k} {c.accuracy[-1]:.2%}" for k, c in curves.items())
            + f" (baseline {baseline:.2%})"
        )
        result["replacement"] = curves
    print(f"written: {folder}")
    return result


# repair ---------------------------------------------------------------------------------------


def load_attribute(path: str | os.PathLike, count: int) -> np.ndarray:
    """A spurious attribute per image: a .npy of integers, or a text file of one per line."""
    path = Path(path)
    if path.suffix == ".npy":
        values = np.load(path)
    else:
        values = np.array([int(t) for t in load_texts(path)])
    if values.shape != (count,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"attribute {path}: expected {count} integers (one per image of the store), got "
            f"{values.dtype} {list(values.shape)}"
        )
    return values


def repair_study(
    store: Any,
    out: str | os.PathLike,
    attribute: Any,
    keywords: Sequence[str] | None = None,
    examples: Sequence[str] | None = None,
    layers: int = 4,
    top: int | None = None,
    min_score: float = 0.5,
    n_texts: int = 10,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    draws: int = 10,
    classes_file: str | None = None,
    templates: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> analysis.RepairResult:
    """Removes a spurious feature: ranks the heads of the last `layers` layers by how much
    their TextSpan texts are about the property, mean-ablates the chosen ones (the `top`
    heads, or those scoring at least `min_score`), and reports group accuracies beside the
    random-heads baseline → repair.json, repair.csv, head_scores.csv, repair.png."""
    span_layers = _check_layers(store, layers)
    _check_labels(store)
    attr = np.asarray(attribute)
    if attr.shape != (len(store),):
        raise ValueError(
            f"attribute: expected one value per image ({len(store)}), got {list(attr.shape)}"
        )
    if (keywords is None) == (examples is None):
        raise ValueError("repair: expected keywords or example texts (one of them)")
    texts = _pool(pool)
    model, _, tokenizer = _model_of(store, device)
    from .models import encode_texts

    keys = [(layer, h) for layer in span_layers for h in range(store.heads.shape[2])]
    embeddings = encode_texts(model, tokenizer, texts, progress=progress)
    depth = min(n_texts, rank, store.heads.shape[-1])
    spans = _spans(store, keys, embeddings, texts, depth, rank, progress)
    if keywords is not None:
        ranked = analysis.rank_heads(spans, keywords=keywords)
    else:
        example_emb = encode_texts(model, tokenizer, list(examples), progress=False)
        ranked = analysis.rank_heads(spans, examples=example_emb, pool=embeddings)
    chosen = [k for k, _ in ranked[:top]] if top else [k for k, s in ranked if s >= min_score]
    if not chosen:
        raise ValueError(
            f"no head scored at least {min_score} for the property (best: L{ranked[0][0][0]}."
            f"H{ranked[0][0][1]} at {ranked[0][1]:.2f}); lower --min-score or use --top"
        )
    w = _classifier(model, tokenizer, class_names(store.classes, classes_file), templates)
    result = analysis.repair(
        store, w, attr, chosen, candidates=keys, random_draws=draws, seed=seed, progress=progress
    )
    folder = report.output_folder(out)
    report.write_csv(
        folder / "head_scores.csv",
        ["layer", "head", "score", "chosen", "texts"],
        [[k[0], k[1], s, k in chosen, " | ".join(spans[k].texts or [])] for k, s in ranked],
    )
    report.write_csv(
        folder / "repair.csv",
        ["class", "attribute", "before", "after", "random_best"],
        [
            [
                y,
                a,
                result.before.groups[(y, a)],
                result.after.groups[(y, a)],
                result.random_best.groups[(y, a)],
            ]
            for y, a in result.before.groups
        ],
    )
    report.write_json(
        folder / "repair.json",
        {
            "heads": [list(k) for k in chosen],
            **{
                name: {"worst_group": g.worst, "average": g.average}
                for name, g in [
                    ("before", result.before),
                    ("after", result.after),
                    ("random_best", result.random_best),
                ]
            },
            "random_draws": [
                {"heads": [list(k) for k in d], "worst_group": g.worst, "average": g.average}
                for d, g in result.random_draws
            ],
        },
    )
    report.repair_plot(folder / "repair.png", result)
    print("heads ablated: " + ", ".join(f"L{a}.H{b}" for a, b in chosen))
    print(result.table())
    print(f"written: {folder}")
    return result


# retrieval ------------------------------------------------------------------------------------


def parse_head(text: str) -> tuple[int, int]:
    """ "L.H" or "L,H" → (L, H)."""
    m = re.fullmatch(r"\s*L?(\d+)\s*[.,:]\s*H?(\d+)\s*", text)
    if not m:
        raise ValueError(f"head: expected LAYER.HEAD such as 11.4, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def retrieval(
    store: Any,
    out: str | os.PathLike,
    heads: Sequence[tuple[int, int]],
    image: int | None = None,
    text: str | None = None,
    k: int = 9,
    project: int = 0,
    rank: int = 80,
    pool: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> analysis.Retrieval:
    """Nearest neighbours of an image, or the best images for a text, by the chosen heads'
    contributions (projected on the span of their first `project` TextSpan directions when
    `project` > 0) → retrieval.json, retrieval.png."""
    if (image is None) == (text is None):
        raise ValueError("retrieve: expected an image index or a text query (one of them)")
    heads = [tuple(h) for h in heads]
    model = tokenizer = None
    if text is not None or project:
        model, _, tokenizer = _model_of(store, device)
    from .models import encode_texts

    basis = None
    if project:
        texts = _pool(pool)
        emb = encode_texts(model, tokenizer, texts, progress=progress)
        depth = min(project, rank, store.heads.shape[-1])
        spans = _spans(store, heads, emb, texts, depth, rank, progress)
        basis = np.linalg.qr(np.concatenate([s.directions for s in spans.values()]).T)[0].T
    query = image if text is None else encode_texts(model, tokenizer, [text], progress=False)[0]
    found = analysis.retrieve(store, heads, query, k=k, basis=basis, progress=progress)
    folder = report.output_folder(out)
    root = Path(store.manifest["images"])
    files = [store.files[i] for i in found.indices]
    report.write_json(
        folder / "retrieval.json",
        {
            "heads": [list(h) for h in heads],
            "image": image,
            "text": text,
            "results": [
                {"index": int(i), "file": f, "score": float(s)}
                for i, f, s in zip(found.indices, files, found.scores, strict=True)
            ],
        },
    )
    head_names = ", ".join(f"L{a}.H{b}" for a, b in heads)
    shown = ([root / store.files[image]] if image is not None else []) + [root / f for f in files]
    captions = (["query"] if image is not None else []) + [
        f"#{i}  {s:.3f}" for i, s in zip(found.indices, found.scores, strict=True)
    ]
    try:
        report.image_grid(
            folder / "retrieval.png",
            shown,
            captions,
            f"{head_names}: " + (f"neighbours of image {image}" if text is None else f"“{text}”"),
        )
    except FileNotFoundError as e:
        print(f"no image grid: the store's images are not at {root} ({e})")
    for i, f, s in zip(found.indices, files, found.scores, strict=True):
        print(f"{s:8.4f}  #{i}  {f}")
    print(f"written: {folder}")
    return found


# segmentation ---------------------------------------------------------------------------------


def _mask_for(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask file resized (nearest) and centre-cropped like the model's preprocessing; any
    non-zero pixel is foreground."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        values = np.unique(np.asarray(im))
        if not np.isin(values, (0, 1, 255)).all():
            raise ValueError(
                f"mask {path}: expected a binary mask (0/1 or 0/255), got values "
                f"{values[:6].tolist()}"
            )
        h, w = size
        scale = max(h / im.height, w / im.width)
        im = im.resize(
            (max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.NEAREST
        )
        left, top = (im.width - w) // 2, (im.height - h) // 2
        return np.asarray(im.crop((left, top, left + w, top + h))) > 0


def segmentation(
    images: str | os.PathLike,
    out: str | os.PathLike,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    classes_file: str | None = None,
    templates: str | None = None,
    masks: str | os.PathLike | None = None,
    given_class: bool = False,
    method: str = "decomposition",
    batch_size: int = 16,
    workers: int = 0,
    overlays: int = 8,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot segmentation of an image folder → heatmaps.npy, classes.csv, overlays.png,
    and with `masks` (a folder of mask images named like the images) metrics.json."""
    import torch

    from .heatmaps import foreground, segment, segmentation_scores
    from .models import load
    from .store import _ImageDataset, list_images

    if method not in ("decomposition", "attention"):
        raise ValueError(f"method: expected 'decomposition' or 'attention', got {method!r}")
    root = Path(images)
    files, labels, folders = list_images(root)
    if given_class and folders == []:
        raise ValueError("given_class: the images have no class folders to take the class from")
    mask_files = None
    if masks is not None:
        mask_root = Path(masks)
        mask_files = [mask_root / Path(f).with_suffix(".png") for f in files]
        missing = [str(p) for p in mask_files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"masks: expected a mask per image ({len(files)}), {len(missing)} missing, "
                f"e.g. {missing[0]}"
            )
    names = class_names(folders, classes_file)
    net, preprocess, tokenizer = load(
        model, pretrained=pretrained, device=device, precision=precision
    )
    size = tuple(int(v) for v in net.visual.image_size)
    # Masks are read (and checked) before the long work starts.
    truth = None if mask_files is None else np.stack([_mask_for(p, size) for p in mask_files])
    w = _classifier(net, tokenizer, names, templates)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(root, files, preprocess, 0), batch_size=batch_size, num_workers=workers
    )
    result = segment(
        net,
        loader,
        w,
        classes=np.array(labels) if given_class else None,
        method=method,
        progress=progress,
    )
    folder = report.output_folder(out)
    np.save(folder / "heatmaps.npy", result.heatmaps)
    report.write_csv(
        folder / "classes.csv",
        ["file", "class", "name"],
        [[f, int(c), names[c]] for f, c in zip(files, result.classes, strict=True)],
    )
    shown = min(overlays, len(files))
    if shown:
        size = result.image_size
        pictures = [report._load_rgb(root / f, size[0]) for f in files[:shown]]
        normalised = result.normalised()[:shown]
        report.overlays(
            folder / "overlays.png",
            pictures,
            normalised,
            foreground(normalised),
            [names[c] for c in result.classes[:shown]],
        )
    out_data: dict[str, Any] = {"segmentation": result}
    if truth is not None:
        scores = segmentation_scores(result.heatmaps, truth)
        report.write_json(
            folder / "metrics.json", {"method": method, "images": len(files), **scores}
        )
        print(", ".join(f"{k} {v:.2%}" for k, v in scores.items()))
        out_data["scores"] = scores
    print(f"written: {folder}")
    return out_data
