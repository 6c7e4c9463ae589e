"""`textspan reproduce`: the paper's experiments for one model and tag, on the data given, under
both conventions, in one report → reproduce.md, reproduce.html (and every experiment's own
outputs beside them)."""

from __future__ import annotations

import argparse
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import datasets, report
from ..analysis import ablation, rank_heads, repair, repair_head_count
from ..analysis.repair import GroupAccuracy, group_sizes
from ..analysis.sources import chunks, correct_counts, rows_f32
from ..core.checks import CONVENTIONS, Convention
from ..core.pools import load_texts
from ..engines import LocalEngine, encode_texts, extract
from ..errors import InputError
from ..models import imagenet_names, load
from ..store.reader import StoreReader
from . import segment, span
from .common import head_spans, last_layers, pool_texts, zero_shot_weights

NAME = "reproduce"
ORDER = 8  # its place in `textspan --help`
HELP = "the paper's tables for a model and tag, on ImageNet / Waterbirds / ImageNet-seg"
DESCRIPTION = (
    "Run every experiment of the paper the given data allows — mean-ablations and TextSpan "
    "with the replacement curve on ImageNet, the Waterbirds repair, ImageNet-segmentation "
    "with the raw-attention baseline — under the paper's convention and textspan's, and "
    "write one report. Stores are reused when rerun with the same arguments."
)

# Figures the paper publishes, by (model, pretrained tag): experiment → metric → (value,
# where it is printed). None are recorded yet: the report shows "not recorded" for them.
PUBLISHED: dict[tuple[str, str], dict[str, dict[str, tuple[float, str]]]] = {}

REPLACEMENT_TEXTS = (10, 20, 30, 40, 50, 60)
PLACE_WORDS = "water,ocean,lake,sea,river,beach,forest,bamboo,woods,land,field,background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="open_clip model name, config .json or toy")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint")
    p.add_argument("--imagenet", default=None, help="ImageNet validation: ROOT or ROOT:LABELS")
    p.add_argument(
        "--imagenet-classes",
        default="imagenet",
        help="class names for ImageNet, one per line for the first classes (default: "
        "open_clip's 1000); the classifier covers the classes named",
    )
    p.add_argument("--waterbirds", default=None, help="waterbird_complete95_forest2water2 root")
    p.add_argument("--imagenet-seg", default=None, help="gtsegs_ijcv.mat")
    p.add_argument("--out", default="out/reproduce", help="output folder (a sub-folder per tag)")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--templates", default="openai", help="as in `textspan ablate`")
    p.add_argument("--pool", default=None, help="TextSpan's text pool (default: the built-in)")
    p.add_argument("--words", default=None, help="the replacement's word pool (default built-in)")
    p.add_argument("--layers", type=int, default=4, help="TextSpan over the last K layers")
    p.add_argument("--rank", type=int, default=80)
    p.add_argument("--keywords", default=PLACE_WORDS, help="words of the spurious feature")
    p.add_argument(
        "--conventions",
        default=",".join(CONVENTIONS[::-1]),
        help="conventions to run, comma-separated (default: paper,textspan)",
    )
    p.add_argument(
        "--force", action="store_true", help="go on past an implausibly low baseline accuracy"
    )


def main(args: argparse.Namespace) -> int:
    result = run(
        args.model,
        args.pretrained,
        args.out,
        imagenet=args.imagenet,
        imagenet_classes=args.imagenet_classes,
        waterbirds=args.waterbirds,
        imagenet_seg=args.imagenet_seg,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        templates=args.templates,
        pool=args.pool,
        words=args.words,
        layers=args.layers,
        rank=args.rank,
        keywords=[k for k in args.keywords.split(",") if k.strip()],
        conventions=[c.strip() for c in args.conventions.split(",") if c.strip()],
        force=args.force,
    )
    print(f"report: {result.markdown}")
    return 0


@dataclass
class Reproduction:
    """Per experiment, metric → convention → value; and the report's paths."""

    model: str
    pretrained: str | None
    tables: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    markdown: Path | None = None
    html: Path | None = None

    def put(self, experiment: str, metric: str, convention: Convention, value: float) -> None:
        self.tables.setdefault(experiment, {}).setdefault(metric, {})[convention] = float(value)


def tag_folder(model: str, pretrained: str | None) -> str:
    """A folder name naming the model and the tag (or checkpoint)."""
    tag = Path(pretrained).stem if pretrained and os.sep in str(pretrained) else pretrained
    name = f"{Path(model).stem}-{tag or 'untrained'}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def plausible_floor(classes: int) -> float:
    """The lowest baseline accuracy that is plausible for a CLIP: 5× chance, or for few
    classes (where that exceeds what is possible) a tenth of the way from chance to 100%."""
    chance = 1.0 / max(classes, 1)
    return min(5 * chance, chance + 0.1 * (1 - chance))


def check_plausible(accuracy: float, classes: int, what: str, force: bool) -> None:
    """Stops before any ablation when the baseline is implausibly low (`plausible_floor`)."""
    floor = plausible_floor(classes)
    if accuracy >= floor or force:
        return
    raise InputError(
        f"{what}: baseline zero-shot accuracy {accuracy:.2%} is under {floor:.2%}, implausible "
        f"for {classes} classes. Likely causes: labels not matching the images (file order, a "
        "wrong label file), class names in another order than the labels, or a preprocessing "
        "that is not the model's. Check them, or pass --force to go on."
    )


def run(
    model: str,
    pretrained: str | None,
    out: str | os.PathLike,
    *,
    imagenet: str | None = None,
    imagenet_classes: str = "imagenet",
    waterbirds: str | None = None,
    imagenet_seg: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    templates: str | None = "openai",
    pool: str | None = None,
    words: str | None = None,
    layers: int = 4,
    rank: int = 80,
    keywords: list[str] | None = None,
    conventions: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Reproduction:
    """Every experiment the data allows, under each convention → one report."""
    conventions = list(conventions or CONVENTIONS[::-1])
    for c in conventions:
        if c not in CONVENTIONS:
            raise InputError(f"conventions: expected some of {', '.join(CONVENTIONS)}, got {c!r}")
    if not (imagenet or waterbirds or imagenet_seg):
        raise InputError("reproduce: expected data: --imagenet, --waterbirds and/or --imagenet-seg")
    # Every input is read once now, so that a bad one fails before the long work.
    pool_texts(pool)
    if words:
        load_texts(words)
    if imagenet:
        datasets.open_images(f"imagenet:{imagenet}")
    if waterbirds:
        for split in datasets.WATERBIRDS_SPLITS:
            datasets.waterbirds(waterbirds, split)
    if imagenet_seg:
        datasets.imagenet_segmentation(imagenet_seg)
    if imagenet_classes != "imagenet":
        load_texts(imagenet_classes)
    folder = report.output_folder(Path(out) / tag_folder(model, pretrained))
    net, _, tokenizer = load(model, pretrained=pretrained, device=device)
    study = _Study(
        result=Reproduction(model, pretrained),
        net=net,
        tokenizer=tokenizer,
        folder=folder,
        model=model,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        workers=workers,
        templates=templates,
        pool=pool,
        words=words,
        layers=layers,
        rank=rank,
        force=force,
        progress=progress,
    )
    for convention in conventions:
        if imagenet:
            study.imagenet(imagenet, imagenet_classes, convention)
        if waterbirds:
            study.waterbirds(waterbirds, keywords or PLACE_WORDS.split(","), convention)
        if imagenet_seg:
            study.segmentation(imagenet_seg, imagenet_classes, convention)
    result = study.result
    result.markdown, result.html = _write_report(result, folder)
    return result


@dataclass
class _Study:
    """What every experiment of a reproduction shares: where results go, the model, and the
    options of `run`."""

    result: Reproduction
    net: Any
    tokenizer: Any
    folder: Path
    model: str
    pretrained: str | None
    device: str | None
    batch_size: int
    workers: int
    templates: str | None
    pool: str | None
    words: str | None
    layers: int
    rank: int
    force: bool
    progress: bool

    def extract(self, spec: str, name: str, convention: Convention) -> StoreReader:
        """The store of `spec`'s images in this convention (resumed or reused if there)."""
        return extract(
            spec,
            self.folder / "stores" / convention / name,
            model=self.model,
            pretrained=self.pretrained,
            batch_size=self.batch_size,
            convention=convention,
            engine=LocalEngine(workers=self.workers, device=self.device),
            progress=self.progress,
        )

    def imagenet(self, root: str, classes_file: str, convention: Convention) -> None:
        result, layers = self.result, self.layers
        store = self.extract(f"imagenet:{root}", "imagenet", convention)
        names = imagenet_class_names(classes_file)
        w = zero_shot_weights(self.net, self.tokenizer, names, self.templates)
        check_plausible(baseline_accuracy(store, w), len(names), "ImageNet", self.force)
        table = ablation(store, w, progress=self.progress)
        experiment = "ImageNet mean-ablation (means from the same set)"
        for condition, value in table.conditions.items():
            result.put(experiment, condition, convention, value)
        for k in (len(table.layers) - 1 - layers, len(table.layers) - 1):
            if k > 0:
                name = f"attention layers 0..{k - 1} mean-ablated"
                result.put(experiment, name, convention, table.layers[k])
        result.notes[experiment] = (
            "ImageNet's validation set is the only split given, so the means come from it, as "
            "in the paper. In the paper's convention 'MLPs' includes the embedding term."
        )
        study = span.run(
            store,
            self.folder / f"imagenet-span-{convention}",
            layers=layers,
            rank=self.rank,
            pool=self.pool,
            words=self.words,
            max_texts=max(REPLACEMENT_TEXTS),
            templates=self.templates,
            progress=self.progress,
            classifier=w,
        )
        curve = study.replacement["text pool"] if study.replacement else None
        if curve is not None:
            for n in REPLACEMENT_TEXTS:
                if n < len(curve.accuracy):
                    result.put(
                        f"ImageNet: last {layers} layers' heads replaced by n TextSpan texts",
                        f"n = {n}",
                        convention,
                        curve.accuracy[n],
                    )
        stable = [s.stable for s in study.spans.values() if s.stable is not None]
        if stable:
            result.put(
                "TextSpan lists",
                "median picks that survive rounding",
                convention,
                np.median(stable),
            )

    def waterbirds(self, root: str, keywords: list[str], convention: Convention) -> None:
        splits = {
            s: self.extract(f"waterbirds:{root}:{s}", f"waterbirds-{s}", convention)
            for s in ("train", "val", "test")
        }
        train, val, test = splits["train"], splits["val"], splits["test"]
        w = zero_shot_weights(self.net, self.tokenizer, train.classes, self.templates)
        check_plausible(baseline_accuracy(test, w), len(train.classes), "Waterbirds", self.force)
        heads = range(train.heads.shape[2])
        keys = [(layer, h) for layer in last_layers(train, self.layers) for h in heads]
        texts = pool_texts(self.pool)
        embeddings = encode_texts(self.net, self.tokenizer, texts, progress=self.progress)
        spans = head_spans(
            train,
            keys,
            embeddings,
            texts=texts,
            n_texts=10,
            rank=self.rank,
            progress=self.progress,
            stability=False,
        )
        order = [k for k, _ in rank_heads(spans, keywords=keywords)]
        train_sizes = group_sizes(np.asarray(train.labels), train.attributes["place"])
        # Clean protocol: means from train, the number of heads chosen on val, figures on test.
        count, _ = repair_head_count(val, w, val.attributes["place"], order, means=train)
        clean = repair(
            test, w, test.attributes["place"], order[:count], candidates=keys, means=train,
            progress=False,
        )  # fmt: skip
        experiment = "Waterbirds repair, clean protocol (means: train; heads: val; figures: test)"
        self._group_rows(experiment, convention, "before", clean.before, train_sizes)
        self._group_rows(experiment, convention, "heads ablated", clean.after, train_sizes)
        self.result.put(experiment, "heads ablated", convention, count)
        # The paper's protocol: everything on the test set.
        count_p, _ = repair_head_count(test, w, test.attributes["place"], order)
        paper = repair(
            test, w, test.attributes["place"], order[:count_p], candidates=keys, progress=False
        )
        experiment = "Waterbirds repair, the paper's protocol (everything on test)"
        self._group_rows(experiment, convention, "before", paper.before, train_sizes)
        self._group_rows(experiment, convention, "heads ablated", paper.after, train_sizes)
        self.result.put(experiment, "heads ablated", convention, count_p)

    def _group_rows(
        self,
        experiment: str,
        convention: Convention,
        label: str,
        g: GroupAccuracy,
        train_sizes: Any,
    ) -> None:
        put = self.result.put
        put(experiment, f"{label}: worst group", convention, g.worst)
        put(experiment, f"{label}: average over the test images", convention, g.average)
        put(experiment, f"{label}: average, groups balanced", convention, g.balanced)
        put(
            experiment,
            f"{label}: average, weighted like train",
            convention,
            g.weighted(train_sizes),
        )

    def segmentation(self, path: str, classes_file: str, convention: Convention) -> None:
        for method in ("decomposition", "attention"):
            if method == "attention" and convention != "textspan":
                continue  # raw attention has no convention: computed once
            study = segment.run(
                f"imagenet-seg:{path}",
                self.folder / f"segmentation-{method}-{convention}",
                model=self.model,
                pretrained=self.pretrained,
                classes_file=classes_file,
                templates=self.templates,
                method=method,
                batch_size=self.batch_size,
                workers=self.workers,
                overlays=4,
                device=self.device,
                progress=self.progress,
                convention=convention,
            )
            for protocol, scores in (study.protocols or {}).items():
                experiment = f"ImageNet-segmentation, {protocol} masks"
                for metric, value in scores.items():
                    column = convention if method == "decomposition" else "raw attention"
                    self.result.put(experiment, metric, column, value)
        self.result.notes["ImageNet-segmentation, paper masks"] = (
            "The paper's protocol: the image resized and centre-cropped, its mask resized to "
            "the crop size (they disagree on images that are not square); heatmaps of the "
            "predicted class, normalised per image."
        )
        self.result.notes["ImageNet-segmentation, aligned masks"] = (
            "The mask resized and centre-cropped exactly like its image."
        )


def imagenet_class_names(classes_file: str) -> list[str]:
    """open_clip's 1000 names, or those of a file for the first classes (a subset study)."""
    return imagenet_names() if classes_file == "imagenet" else load_texts(classes_file)


def baseline_accuracy(store: StoreReader, w: np.ndarray) -> float:
    """Zero-shot accuracy of the store's representations (in checked chunks)."""
    labels = np.asarray(store.labels)
    correct = 0
    for rows in chunks(store, len(store), False, "baseline"):
        rep = rows_f32(store.representation, rows)
        correct += int(correct_counts(rep[None], w, labels[rows])[0])
    return correct / max(len(store), 1)


def _columns(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The published column, then the columns one experiment's table has, in order."""
    seen: list[str] = []
    for values in metrics.values():
        seen += [c for c in values if c not in seen]
    return ["published", *seen]


def _published(result: Reproduction, experiment: str, metric: str) -> str:
    known = PUBLISHED.get((result.model, result.pretrained or ""), {}).get(experiment, {})
    if metric in known:
        value, where = known[metric]
        return f"{_format(metric, value)} ({where})"
    return "not recorded"


def _format(metric: str, value: float) -> str:
    if metric == "heads ablated" or "picks" in metric:
        return f"{value:g}"
    return f"{value:.2%}"


def _write_report(result: Reproduction, folder: Path) -> tuple[Path, Path]:
    title = f"textspan reproduce: {result.model} {result.pretrained or '(untrained)'}"
    lines = [f"# {title}", ""]
    lines.append(
        "Columns: the paper's published figure for this model and tag (where recorded), then "
        "ours under each convention (README, 'Conventions'): 'paper' is the paper code's, "
        "'textspan' is textspan's."
    )
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:3px 8px}td.v{text-align:right}</style>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(lines[-1])}</p>",
    ]
    for experiment, metrics in result.tables.items():
        columns = _columns(metrics)
        lines += ["", f"## {experiment}", ""]
        parts.append(f"<h2>{html.escape(experiment)}</h2>")
        if experiment in result.notes:
            lines += [result.notes[experiment], ""]
            parts.append(f"<p>{html.escape(result.notes[experiment])}</p>")
        lines.append("| | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        rows = []
        for metric, values in metrics.items():
            cells = [_published(result, experiment, metric)] + [
                _format(metric, values[c]) if c in values else "—" for c in columns[1:]
            ]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
            rows.append(
                f"<tr><td>{html.escape(metric)}</td>"
                + "".join(f"<td class=v>{html.escape(c)}</td>" for c in cells)
                + "</tr>"
            )
        header = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
        parts.append(f"<table><tr>{header}</tr>{''.join(rows)}</table>")
    markdown = folder / "reproduce.md"
    markdown.write_text("\n".join(lines) + "\n")
    page = folder / "reproduce.html"
    page.write_text("\n".join(parts))
    return markdown, page
