"""`textspan toy-data waterbirds DIR`: a Waterbirds-shaped dataset from the toy world, in the
real layout, for the readers and the spurious-feature repair."""

from __future__ import annotations

import argparse

NAME = "toy-data"
ORDER = 12  # its place in `textspan --help`
HELP = "write a toy dataset in a real benchmark's layout (waterbirds)"
DESCRIPTION = (
    "Write the toy world as a benchmark is distributed: `waterbirds` gives class folders of "
    "images and a metadata.csv (img_filename, y, split, place) with the toy spurious pair "
    "(shape, background) as class and place, 95% correlated in train, even in val and test. "
    "Commands read it as the images waterbirds:DIR:SPLIT (e.g. `textspan extract "
    "waterbirds:DIR:test OUT`), or `textspan reproduce --waterbirds DIR`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["waterbirds"], help="the benchmark whose layout to write")
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=200, help="images per class in train")
    p.add_argument("--val", type=int, default=60, help="images per class in val")
    p.add_argument("--test", type=int, default=120, help="images per class in test")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from ..toy.waterbirds import write_waterbirds

    meta = write_waterbirds(args.out, args.train, args.val, args.test, args.size, args.seed)
    print(f"toy waterbirds written: {meta}")
    return 0
