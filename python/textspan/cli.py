"""The `textspan` command."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from .toyclip import describe
    from .toystudy import study

    print("textspan demo: the paper's method on the embedded toy CLIP, checked against the toy")
    print("world's ground truth (decomposition, TextSpan for every head, mean-ablations,")
    print("segmentation, spurious-feature repair, retrieval by a head)")
    start = time.perf_counter()
    r = study(args.out, model_dir=args.model, images=args.images, spurious_dir=args.spurious_model)
    print()
    print(describe(r))
    print(f"decomposition identity: largest relative error {r['identity_error']:.1e}")
    specific = sorted((h for h in r["heads"] if h.purity >= 0.8), key=lambda h: -h.purity)
    print(
        f"{len(specific)} heads with a purity >= 80% (their top-5 TextSpan texts, weighted by "
        f"variance explained, about one factor; random texts: {r['chance_purity']:.0%}):"
    )
    for h in specific:
        print(
            f"  L{h.head[0]}.H{h.head[1]} {h.factor:<10} {h.purity:.0%}  {' | '.join(h.texts[:3])}"
        )
    for method, (scores, _) in r["segmentation"].items():
        print(
            f"segmentation by {method}: pixel accuracy {scores['pixel_accuracy']:.1%}, "
            f"mIoU {scores['miou']:.1%}, mAP {scores['map']:.1%}"
        )
    res = r["spurious"].result
    strength = r["spurious"].trained["train"]["spurious_strength"]
    print(
        f"spurious background (model trained at {strength:.0%}): worst-group "
        f"{res.before.worst:.1%} -> {res.after.worst:.1%} ablating {len(res.heads)} background "
        f"heads (best random: {res.random_best.worst:.1%})"
    )
    print(f"report: {r['report']}  ({time.perf_counter() - start:.0f} s)")
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
        engine=args.engine,
        address=args.address,
        num_gpus_per_worker=args.num_gpus_per_worker,
        shard_size=args.shard_size,
    )
    print(f"store: {store.path} ({len(store)} images, heads {list(store.heads.shape)})")
    return 0


def _open(path: str):
    from .store import open_store

    return open_store(path)


def _out(args: argparse.Namespace, default: str) -> str:
    return args.out or f"{args.store.rstrip('/')}-{default}"


def _ablate(args: argparse.Namespace) -> int:
    from .experiments import ablation_study

    store = _open(args.store)
    means = _open(args.means) if args.means else None
    ablation_study(
        store,
        _out(args, "ablation"),
        means=means,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
    )
    return 0


def _span(args: argparse.Namespace) -> int:
    from .experiments import span_study

    span_study(
        _open(args.store),
        _out(args, "span"),
        layers=args.layers,
        n_texts=args.texts,
        rank=args.rank,
        pool=args.pool,
        words=args.words,
        max_texts=args.max_texts,
        replace=not args.no_replacement,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
        seed=args.seed,
    )
    return 0


def _repair(args: argparse.Namespace) -> int:
    from .experiments import load_attribute, repair_study
    from .pools import load_texts

    store = _open(args.store)
    keywords = args.keywords.split(",") if args.keywords else None
    examples = load_texts(args.examples) if args.examples else None
    repair_study(
        store,
        _out(args, "repair"),
        load_attribute(args.attribute, len(store)),
        keywords=keywords,
        examples=examples,
        layers=args.layers,
        top=args.top,
        min_score=args.min_score,
        n_texts=args.texts,
        rank=args.rank,
        pool=args.pool,
        draws=args.draws,
        classes_file=args.classes,
        templates=args.templates,
        device=args.device,
        seed=args.seed,
    )
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    from .experiments import parse_head, retrieval

    retrieval(
        _open(args.store),
        _out(args, "retrieval"),
        [parse_head(h) for h in args.head],
        image=args.image,
        text=args.text,
        k=args.k,
        project=args.project,
        rank=args.rank,
        pool=args.pool,
        device=args.device,
    )
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .experiments import segmentation

    segmentation(
        args.images,
        args.out or "segmentation",
        model=args.model,
        pretrained=args.pretrained,
        classes_file=args.classes,
        templates=args.templates,
        masks=args.masks,
        given_class=args.given_class,
        method=args.method,
        batch_size=args.batch_size,
        workers=args.workers,
        overlays=args.overlays,
        device=args.device,
        precision=args.precision,
    )
    return 0


def _toy_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .toyclip import ToyConfig, describe, train

    options = {f.name: getattr(args, f.name) for f in fields(ToyConfig)}
    meta = train(args.out, ToyConfig(**options), minutes=args.minutes)
    print(
        f"toy CLIP written to {args.out} after {meta['steps_done']} steps, "
        f"{meta['minutes']:.1f} min; {describe(meta)}"
    )
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or config .json")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--precision", default="fp32", help="model precision (open_clip's names)")


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        p.add_argument("store", help="a store made by `textspan extract`")
    p.add_argument("--out", default=None, help="output folder (default: next to the store)")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument(
        "--classes",
        default=None,
        help="class names, one per line ('imagenet': ImageNet's); default: the class folder names",
    )
    p.add_argument(
        "--templates",
        default="openai",
        help="'openai' (80 ImageNet templates), 'simple', or a file of templates with {}",
    )


def _span_options(p: argparse.ArgumentParser, texts: int) -> None:
    p.add_argument("--layers", type=int, default=4, help="the last K layers' heads")
    p.add_argument("--texts", type=int, default=texts, help="texts per head")
    p.add_argument("--rank", type=int, default=80, help="rank of the span of each head")
    p.add_argument(
        "--pool", default=None, help="text pool, one per line (default: the built-in descriptions)"
    )
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textspan",
        description="Explain in words what each part of a CLIP vision transformer "
        "writes into its image embedding.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the method on the embedded toy CLIP, checked against ground truth"
    )
    demo.add_argument("--out", default="out/demo", help="folder of the report and its PNGs")
    demo.add_argument("--images", type=int, default=2000, help="toy images to analyse")
    demo.add_argument(
        "--model", default=None, help="a folder from `textspan toy-train` (default: embedded)"
    )
    demo.add_argument(
        "--spurious-model",
        default=None,
        help="the toy-train folder of the model the spurious-feature repair runs on "
        "(default: the embedded one trained to lean on the background)",
    )
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
    ex.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes (local engine) or Ray actors (ray engine)",
    )
    ex.add_argument("--device", default=None, help="cuda when available, else cpu")
    ex.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage")
    ex.add_argument("--precision", default="fp32", help="model precision (open_clip's names)")
    ex.add_argument("--checkpoint-every", type=int, default=4096, help="images between checkpoints")
    ex.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: a Ray Data pipeline (pip install 'textspan[ray]')",
    )
    ex.add_argument("--address", default=None, help="Ray cluster address (ray engine)")
    ex.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per Ray actor (default: 1 when the cluster has GPUs)",
    )
    ex.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="images per shard, the unit of work and of resumption (ray engine)",
    )
    ex.set_defaults(run=_extract)

    ab = commands.add_parser(
        "ablate", help="mean-ablation study: accuracy without MLPs, class token, early layers"
    )
    _common(ab)
    ab.add_argument(
        "--means",
        default=None,
        help="a store to take the means from (default: the same store, as in the paper)",
    )
    ab.set_defaults(run=_ablate)

    sp = commands.add_parser(
        "span", help="TextSpan for the last layers' heads, and the replacement study"
    )
    _common(sp)
    _span_options(sp, texts=10)
    sp.add_argument(
        "--words",
        default=None,
        help="word pool of the baseline (default: the built-in pool's vocabulary)",
    )
    sp.add_argument("--max-texts", type=int, default=60, help="replacement: up to n texts per head")
    sp.add_argument("--no-replacement", action="store_true", help="TextSpan only")
    sp.set_defaults(run=_span)

    rp = commands.add_parser("repair", help="remove a spurious feature by ablating heads")
    _common(rp)
    _span_options(rp, texts=10)
    rp.add_argument(
        "--attribute",
        required=True,
        help="spurious attribute per image: .npy of ints or one int per line",
    )
    what = rp.add_mutually_exclusive_group(required=True)
    what.add_argument("--keywords", help="comma-separated words naming the property")
    what.add_argument("--examples", help="file of example texts about the property")
    rp.add_argument("--top", type=int, default=None, help="ablate the N best-scoring heads")
    rp.add_argument(
        "--min-score",
        type=float,
        default=0.5,
        help="else ablate heads scoring at least this (default 0.5)",
    )
    rp.add_argument("--draws", type=int, default=10, help="random-heads baseline draws")
    rp.set_defaults(run=_repair)

    tt = commands.add_parser(
        "toy-train",
        help="train the toy CLIP on the toy world (the embedded default model)",
        description="Train a tiny open_clip CLIP from scratch on textspan.toyworld. The "
        "defaults and seed 0 made the embedded checkpoint; rerun, they reproduce it within "
        "noise. Interrupted and rerun with the same arguments, it resumes.",
    )
    tt.add_argument("--out", default="build/toy", help="output folder")
    tt.add_argument("--minutes", type=float, default=None, help="stop after this long")
    from dataclasses import fields

    from .toyclip import ToyConfig

    for f in fields(ToyConfig):
        tt.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    tt.set_defaults(run=_toy_train)

    rt = commands.add_parser("retrieve", help="images by a head's property")
    _common(rt)
    rt.add_argument("--head", action="append", required=True, help="LAYER.HEAD (repeatable)")
    query = rt.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=int, help="index of the query image in the store")
    query.add_argument("--text", help="a text query")
    rt.add_argument("--k", type=int, default=9, help="results")
    rt.add_argument(
        "--project",
        type=int,
        default=0,
        help="project on the span of each head's first N TextSpan directions",
    )
    rt.add_argument("--rank", type=int, default=80)
    rt.add_argument("--pool", default=None, help="text pool for --project")
    rt.set_defaults(run=_retrieve)

    sg = commands.add_parser("segment", help="zero-shot segmentation of an image folder")
    sg.add_argument("images", help="image folder: one sub-folder per class, or flat")
    _common(sg, store=False)
    _model_options(sg)
    sg.add_argument(
        "--masks",
        default=None,
        help="folder of binary mask PNGs named like the images: adds metrics",
    )
    sg.add_argument(
        "--given-class",
        action="store_true",
        help="use each image's class folder instead of the predicted class",
    )
    sg.add_argument("--method", choices=["decomposition", "attention"], default="decomposition")
    sg.add_argument("--batch-size", type=int, default=16)
    sg.add_argument("--workers", type=int, default=0)
    sg.add_argument("--overlays", type=int, default=8, help="images shown in overlays.png")
    sg.set_defaults(run=_segment)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        # Bad input and broken stores end in one line that says what is wrong, not a trace;
        # any other RuntimeError is a bug and keeps its traceback.
        if isinstance(e, RuntimeError) and type(e).__name__ != "StoreError":
            raise
        print(f"textspan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
