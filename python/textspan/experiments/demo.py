"""`textspan demo` (`make demo`): the paper's method on the embedded toy CLIP, checked against
the toy world's ground truth, printed and written to one self-contained HTML report."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..core.checks import CONVENTIONS
from ..engines import LocalEngine, extract
from ..explorer import Site
from ..toy.model import describe
from ..toy.results import StudyResult
from ..toy.study import study
from . import explore

EXPLORER = "explorer/index.html"

NAME = "demo"
ORDER = 1  # its place in `textspan --help`
HELP = "the method on the embedded toy CLIP, checked against ground truth"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder of the report and its PNGs")
    p.add_argument("--images", type=int, default=2000, help="toy images to analyse")
    p.add_argument(
        "--model", default=None, help="a folder from `textspan toy-train` (default: embedded)"
    )
    p.add_argument(
        "--spurious-model",
        default=None,
        help="the toy-train folder of the model the spurious-feature repair runs on "
        "(default: the embedded one trained to lean on the background)",
    )
    p.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        default="textspan",
        help="the decomposition's convention for every experiment: textspan's (default) or "
        "the paper code's (README: Conventions)",
    )


def main(args: argparse.Namespace) -> int:
    print("textspan demo: the paper's method on the embedded toy CLIP, checked against the toy")
    print("world's ground truth (decomposition, TextSpan for every head, mean-ablations,")
    print("segmentation, spurious-feature repair, retrieval by a head)")
    start = time.perf_counter()
    r = study(
        args.out,
        model_dir=args.model,
        images=args.images,
        spurious_dir=args.spurious_model,
        explorer=EXPLORER,
        convention=args.convention,
    )
    site = toy_explorer(Path(args.out), r, args.model)
    print()
    print_summary(r)
    print(f"explorer: {site.path} ({site.pages} pages, {site.bytes / 1e6:.1f} MB)")
    print(f"report: {r.report}  ({time.perf_counter() - start:.0f} s)")
    return 0


def toy_explorer(out: Path, r: StudyResult, model_dir: str | None) -> Site:
    """The explorer of the toy model: the study's images written to a folder, extracted to a
    store, the site built from it (`out/explorer/`)."""
    from PIL import Image

    data = out / "explorer-data"
    shutil.rmtree(data, ignore_errors=True)  # made afresh: a rerun must not resume on it
    images = data / "images"
    images.mkdir(parents=True)
    for i, image in enumerate(r.world.images):
        Image.fromarray(image).save(images / f"{i:04d}.png")
    store = extract(
        images,
        data / "store",
        model="toy",
        pretrained=model_dir,
        convention=r.convention,
        engine=LocalEngine(workers=0, device="cpu"),
        progress=False,
    )
    return explore.run(store, out / "explorer", samples=6, device="cpu", progress=False)


def print_summary(r: StudyResult) -> None:
    print(f"convention: {r.convention}")
    print(describe({"zero_shot": r.zero_shot}))
    print(f"decomposition identity: largest relative error {r.identity_error:.1e}")
    specific = sorted((h for h in r.heads if h.purity >= 0.8), key=lambda h: -h.purity)
    print(
        f"{len(specific)} heads with a purity >= 80% (their top-5 TextSpan texts, weighted by "
        f"variance explained, about one factor; random texts: {r.chance_purity:.0%}):"
    )
    for h in specific:
        print(
            f"  L{h.head[0]}.H{h.head[1]} {h.factor:<10} {h.purity:.0%}  {' | '.join(h.texts[:3])}"
        )
    print(
        f"TextSpan: {r.unstable_heads()} of {len(r.heads)} heads have picks among their top 5 "
        "that rounding decided"
    )
    for factor, a in r.ablation.items():
        print(
            f"mean-ablation, {factor}: baseline {a.conditions['baseline']:.1%}, MLPs "
            f"{a.conditions['MLPs mean-ablated']:.1%}, all attention layers but the last "
            f"{a.layers[-2]:.1%}"
        )
    for method, check in r.segmentation.items():
        scores = check.scores
        print(
            f"segmentation by {method}: pixel accuracy {scores['pixel_accuracy']:.1%}, "
            f"mIoU {scores['miou']:.1%}, mAP {scores['map']:.1%}"
        )
    res = r.spurious.result
    strength = r.spurious.trained["train"]["spurious_strength"]
    print(
        f"spurious background (model trained at {strength:.0%}): worst-group "
        f"{res.before.worst:.1%} -> {res.after.worst:.1%} ablating {len(res.heads)} background "
        f"heads (best random: {res.random_best.worst:.1%})"
    )
    for c in r.retrieval:
        print(
            f"retrieval by L{c.head[0]}.H{c.head[1]} ({c.factor} head): neighbours sharing "
            f"the query's {c.factor} {c.by_head[c.factor]:.0%} (whole representation "
            f"{c.by_all[c.factor]:.0%}, chance {c.chance[c.factor]:.0%})"
        )
