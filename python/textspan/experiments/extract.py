"""`textspan extract`: decompose an image folder into a store (resumes when rerun)."""

from __future__ import annotations

import argparse

from ..core.checks import CONVENTIONS
from ..engines import engine_named, extract

NAME = "extract"
ORDER = 2  # its place in `textspan --help`
HELP = "decompose an image folder into a store (resumes when rerun)"
DESCRIPTION = (
    "Decompose every image of a folder (ImageFolder layout or flat) into an on-disk store of "
    "head and MLP contributions with per-head statistics. Interrupted and rerun with the same "
    "arguments, it resumes where it stopped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", help="image folder: one sub-folder per class, or flat")
    p.add_argument("out", help="output folder of the store")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or config .json")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes (local engine) or Ray actors (ray engine)",
    )
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage")
    p.add_argument("--precision", default="fp32", help="model precision (open_clip's names)")
    p.add_argument("--checkpoint-every", type=int, default=4096, help="images between checkpoints")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: a Ray Data pipeline (pip install 'textspan[ray]')",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (ray engine)")
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per Ray actor (default: 1 when the cluster has GPUs)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip it, name it in a warning)",
    )
    p.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        default="textspan",
        help="the decomposition's convention: textspan's (default) or the paper's code's "
        "(README: Conventions)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="images per shard, the unit of work and of resumption (ray engine)",
    )


def main(args: argparse.Namespace) -> int:
    local = args.engine == "local"
    engine = engine_named(
        args.engine,
        workers=args.workers,
        **(
            {"device": args.device, "checkpoint_every": args.checkpoint_every}
            if local
            else {
                "address": args.address,
                "num_gpus_per_worker": args.num_gpus_per_worker,
                "shard_size": args.shard_size,
            }
        ),
    )
    store = extract(
        args.images,
        args.out,
        model=args.model,
        pretrained=args.pretrained,
        precision=args.precision,
        dtype=args.dtype,
        convention=args.convention,
        batch_size=args.batch_size,
        strict=args.strict,
        engine=engine,
    )
    skipped = f", {len(store.skipped)} unreadable skipped" if store.skipped else ""
    print(f"store: {store.path} ({len(store)} images{skipped}, heads {list(store.heads.shape)})")
    return 0
