"""`textspan models`: every open_clip pretrained tag with its tower family, pooling and whether
it decomposes exactly (and why not); `--check NAME…` builds each with random weights and checks
the decomposition identity."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

NAME = "models"
ORDER = 10  # its place in `textspan --help`
HELP = "list open_clip's pretrained models: which decompose exactly, and why not"
DESCRIPTION = (
    "List every open_clip architecture that has pretrained tags, with its image tower's "
    "family, its pooling and whether its representation is a sum of attention-head terms "
    "(built on PyTorch's meta device: no download, no memory). --check builds the named "
    "architectures with random weights and checks that the parts sum to the output. Hugging "
    "Face CLIP, SigLIP and MetaCLIP 2 models (textspan.load('hf:…')) decompose too."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--check",
        nargs="+",
        metavar="NAME",
        help="build these models (open_clip architectures with random weights; also config "
        ".json files, toy, hf: names) and check the identity",
    )
    p.add_argument("--csv", help="also write the list (one row per pretrained tag) here")
    p.add_argument("--tags", action="store_true", help="list every tag, not just their count")


def main(args: argparse.Namespace) -> int:
    from ..errors import TextspanError
    from ..models import catalogue, check_identity

    if args.check:
        failed = 0
        print(
            f"{'model':34} {'tower':28} {'pooling':9} {'terms':>5} {'rel. error':>10} "
            f"{'pooler MLP':>10} {'time':>6}"
        )
        for name in args.check:
            try:
                c = check_identity(name)
            except TextspanError as e:  # the others are still checked
                print(f"{name:34} cannot be checked: {e}")
                failed += 1
                continue
            pooler = "" if c.pooler_share is None else f"{c.pooler_share:.2f}"
            print(
                f"{c.name:34} {c.family:28} {c.pooling:9} {c.terms:5d} "
                f"{c.relative_error:10.1e} {pooler:>10} {c.seconds:5.1f}s"
            )
            failed += c.relative_error > 1e-4
        print(
            "(pooler MLP: the mean norm of the attention pooler's MLP term over that of the "
            "representation, random weights)"
        )
        return 1 if failed else 0
    entries = catalogue()
    print(f"{'model':34} {'tags':>4}  {'decomposes':10}  tower / why not")
    for e in entries:
        tags = ", ".join(e.tags) if args.tags else str(len(e.tags))
        what = f"{e.family}, {e.pooling} pooling" if e.decomposes else e.why_not
        print(f"{e.name:34} {tags:>4}  {'yes' if e.decomposes else 'no':10}  {what}")
    total = sum(len(e.tags) for e in entries)
    exact = sum(len(e.tags) for e in entries if e.decomposes)
    print(
        f"\n{exact} of {total} pretrained tags ({exact / total:.0%}) decompose exactly; "
        f"{sum(e.decomposes for e in entries)} of {len(entries)} architectures."
    )
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "tag", "decomposes", "tower", "pooling", "why_not"])
            for e in entries:
                for tag in e.tags:
                    w.writerow([e.name, tag, e.decomposes, e.family, e.pooling, e.why_not])
        print(f"written: {path}")
    return 0
