"""The `textspan` command."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from .span import text_span_heads
    from .synthetic import concept_world

    world = concept_world(n_images=args.images, dim=args.dim, seed=args.seed)
    print(
        f"textspan demo: a synthetic world of {len(world.head_names)} heads, "
        f"{world.outputs.shape[0]} images, {len(world.texts)} texts, D = {world.outputs.shape[-1]}"
    )
    print("Each head encodes known factors; TextSpan should name them.\n")
    start = time.perf_counter()
    results = text_span_heads(
        world.outputs,
        world.text_embeddings,
        n_texts=args.texts,
        rank=args.rank,
        texts=world.texts,
        progress=False,
    )
    elapsed = time.perf_counter() - start
    for name, result in zip(world.head_names, results, strict=True):
        print(f"head encoding {name}: {result.explained.sum():.1%} of its variance explained")
        print(result.table())
        print()
    print(f"TextSpan over {len(results)} heads took {elapsed * 1e3:.1f} ms")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .store import extract

    store = extract(
        args.images,
        args.out,
        model=args.model,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
    )
    print(f"store: {store.path} ({len(store)} images, heads {list(store.heads.shape)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textspan",
        description="Explain in words what each part of a CLIP vision transformer "
        "writes into its image embedding.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run TextSpan on a synthetic world with known heads")
    demo.add_argument("--images", type=int, default=2000, help="images in the world")
    demo.add_argument("--dim", type=int, default=128, help="embedding width D")
    demo.add_argument("--texts", type=int, default=5, help="texts to choose per head")
    demo.add_argument(
        "--rank", type=int, default=80, help="rank of the span the texts are projected on"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    ex = commands.add_parser(
        "extract",
        help="decompose an image folder into a store (resumes when rerun)",
        description="Decompose every image of a folder (ImageFolder layout or flat) into an "
        "on-disk store of head and MLP contributions with per-head statistics. Interrupted "
        "and rerun with the same arguments, it resumes where it stopped.",
    )
    ex.add_argument("images", help="image folder: one sub-folder per class, or flat")
    ex.add_argument("out", help="output folder of the store")
    ex.add_argument("--model", default="ViT-B-16", help="open_clip model name or config .json")
    ex.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag or checkpoint path"
    )
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ex.add_argument("--device", default=None, help="cuda when available, else cpu")
    ex.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage")
    ex.add_argument("--precision", default="fp32", help="model precision (open_clip's names)")
    ex.add_argument("--checkpoint-every", type=int, default=4096, help="images between checkpoints")
    ex.set_defaults(run=_extract)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
