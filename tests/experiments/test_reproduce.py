"""`textspan reproduce` end to end on the embedded toy CLIP, on fixtures written in each real
layout: flat ImageNet files with LOC_val_solution.csv, the toy Waterbirds, a v7.3-style
gtsegs_ijcv.mat."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from datafiles import write_gtsegs
from PIL import Image

from textspan import InputError
from textspan.cli import main
from textspan.experiments import reproduce
from textspan.models import imagenet_synsets
from textspan.toy import world as tw
from textspan.toy.study import description_pool


def flat_imagenet(folder, n=40, seed=5, shuffled=False):
    """Toy images as flat validation files, labelled by their shape's index (0..3)."""
    world = tw.generate(n, seed=seed, size=32)
    labels = world.values("shape")
    if shuffled:
        labels = np.random.default_rng(0).permutation(labels)
    synsets = imagenet_synsets()
    (folder / "val").mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(world.images, labels, strict=True), 1):
        Image.fromarray(image).save(folder / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", format="PNG")
        rows.append((f"ILSVRC2012_val_{i:08d}", f"{synsets[label]} 0 0 8 8"))
    with open(folder / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return folder / "val"


def toy_files(folder):
    """The toy's class names (its shapes, for the first four ImageNet classes), text pool
    and words: files a user would pass."""
    texts, _ = description_pool()
    (folder / "classes.txt").write_text("\n".join(tw.SHAPES) + "\n")
    (folder / "pool.txt").write_text("\n".join(texts) + "\n")
    (folder / "words.txt").write_text("\n".join(sorted({w for t in texts for w in t.split()})))
    return [
        "--imagenet-classes", str(folder / "classes.txt"), "--pool", str(folder / "pool.txt"),
        "--words", str(folder / "words.txt"), "--templates", "article", "--layers", "2",
        "--rank", "64", "--batch-size", "64", "--workers", "0", "--device", "cpu",
    ]  # fmt: skip


def toy_gtsegs(path, n=10):
    """Toy images made 40 × 32 (not square, like most of ImageNet-segmentation's)."""
    world = tw.generate(n, seed=9, size=32)
    images = [np.asarray(Image.fromarray(im).resize((40, 32))) for im in world.images]
    masks = [
        np.asarray(Image.fromarray(m.astype(np.uint8)).resize((40, 32), Image.NEAREST))
        for m in world.masks
    ]
    write_gtsegs(path, images, masks)


@pytest.mark.slow
def test_reproduce_writes_one_report_on_every_benchmark(tmp_path, capsys):
    root = flat_imagenet(tmp_path / "imagenet")
    assert main(["toy-data", "waterbirds", str(tmp_path / "wb"), "--train", "40", "--val",
                 "10", "--test", "10"]) == 0  # fmt: skip
    toy_gtsegs(tmp_path / "gtsegs_ijcv.mat")
    arguments = [
        "reproduce", "--model", "toy", "--imagenet", str(root), "--waterbirds",
        str(tmp_path / "wb"), "--imagenet-seg", str(tmp_path / "gtsegs_ijcv.mat"), "--out",
        str(tmp_path / "out"), *toy_files(tmp_path),
    ]  # fmt: skip
    assert main(arguments) == 0
    folder = tmp_path / "out" / "toy-untrained"  # named after the model and tag
    report = (folder / "reproduce.md").read_text()
    for section in (
        "## ImageNet mean-ablation",
        "## ImageNet: last 2 layers' heads replaced by n TextSpan texts",
        "## Waterbirds repair, clean protocol",
        "## Waterbirds repair, the paper's protocol",
        "## ImageNet-segmentation, paper masks",
        "## ImageNet-segmentation, aligned masks",
    ):
        assert section in report
    assert "| | published | paper | textspan |" in report
    assert "average, weighted like train" in report and "average, groups balanced" in report
    assert "raw attention" in report
    assert "<h1>textspan reproduce: toy" in (folder / "reproduce.html").read_text()
    for convention in ("paper", "textspan"):
        assert (folder / "stores" / convention / "waterbirds-test" / "manifest.json").is_file()
    # A rerun reuses the stores it extracted.
    capsys.readouterr()
    assert main(arguments) == 0
    assert "(40 done before)" in capsys.readouterr().out


@pytest.mark.slow
def test_reproduce_stops_on_an_implausible_baseline(tmp_path, capsys):
    root = flat_imagenet(tmp_path / "imagenet", shuffled=True)
    arguments = [
        "reproduce", "--model", "toy", "--imagenet", str(root), "--out", str(tmp_path / "o"),
        "--conventions", "textspan", *toy_files(tmp_path),
    ]  # fmt: skip
    assert main(arguments) == 2
    assert "labels not matching the images" in capsys.readouterr().err
    assert not (tmp_path / "o" / "toy-untrained" / "reproduce.md").exists()
    with pytest.raises(InputError, match=r"under 0\.50%, implausible for 1000 classes"):
        reproduce.check_plausible(0.004, 1000, "ImageNet", force=False)
    assert main([*arguments, "--force"]) == 0


def test_bad_data_is_named_before_any_work(tmp_path):
    assert main(["toy-data", "waterbirds", str(tmp_path / "wb"), "--train", "4", "--val", "2",
                 "--test", "2"]) == 0  # fmt: skip
    text = (tmp_path / "wb" / "metadata.csv").read_text().replace(",y,", ",label,")
    (tmp_path / "wb" / "metadata.csv").write_text(text)
    with pytest.raises(InputError, match="missing y"):
        reproduce.run("toy", None, tmp_path / "o", waterbirds=str(tmp_path / "wb"))
    assert not (tmp_path / "o").exists()
