"""`textspan toy-train`: train the toy CLIP (the embedded default model) on the toy world."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..toy.model import ToyConfig, describe

NAME = "toy-train"
ORDER = 11  # its place in `textspan --help`
HELP = "train the toy CLIP on the toy world (the embedded default model)"
DESCRIPTION = (
    "Train a tiny open_clip CLIP from scratch on the toy world. The defaults and seed 0 made "
    "the embedded checkpoint; rerun, they reproduce it byte for byte. Interrupted and rerun "
    "with the same arguments, it resumes."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/toy", help="output folder")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long")
    for f in fields(ToyConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)


def main(args: argparse.Namespace) -> int:
    from ..toy.train import train

    options = {f.name: getattr(args, f.name) for f in fields(ToyConfig)}
    meta = train(args.out, ToyConfig(**options), minutes=args.minutes)
    print(
        f"toy CLIP written to {args.out} after {meta['steps_done']} steps, "
        f"{meta['minutes']:.1f} min; {describe(meta)}"
    )
    return 0
