"""The experiment commands end to end on a tiny store: what they write, and that it equals the
library functions they are built on."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import textspan
from textspan.cli import main
from textspan.experiments.segment import read_mask
from textspan.store import list_images


@pytest.fixture(scope="module")
def store(image_folder, tiny, tmp_path_factory):
    config, checkpoint = tiny
    out = tmp_path_factory.mktemp("store") / "store"
    return textspan.extract(
        image_folder,
        out,
        model=str(config),
        pretrained=str(checkpoint),
        batch_size=8,
        engine=textspan.LocalEngine(workers=0, device="cpu"),
        dtype="float32",
        progress=False,
    )


def classifier_of(store):
    model, _, tokenizer = textspan.load(
        store.manifest.model, pretrained=store.manifest.pretrained, device="cpu"
    )
    names = textspan.experiments.class_names(store.classes)
    return (
        model,
        tokenizer,
        textspan.zero_shot_classifier(
            model, tokenizer, names, ["a photo of a {}."], progress=False
        ),
    )


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ablate_writes_the_table_curve_and_plot(store, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert (
        main(
            [
                "ablate",
                str(store.path),
                "--out",
                str(out),
                "--templates",
                "simple",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "baseline" in printed and f"written: {out}" in printed
    _, _, w = classifier_of(store)
    expected = textspan.ablation(store, w, progress=False)
    table = {r["condition"]: float(r["accuracy"]) for r in rows(out / "ablation.csv")}
    assert table == pytest.approx(expected.conditions)
    assert len(table) == 4
    curve = [float(r["accuracy"]) for r in rows(out / "ablation_layers.csv")]
    assert curve == pytest.approx(expected.layers.tolist()) and len(curve) == 4
    assert (out / "ablation.png").stat().st_size > 1000


def test_span_writes_texts_and_the_replacement_study(store, tmp_path):
    out = tmp_path / "span"
    assert (
        main(
            [
                "span",
                str(store.path),
                "--out",
                str(out),
                "--layers",
                "2",
                "--texts",
                "5",
                "--max-texts",
                "6",
                "--rank",
                "16",
                "--templates",
                "simple",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    data = json.loads((out / "span.json").read_text())
    assert data["pool_size"] == len(textspan.default_pool())
    assert [(h["layer"], h["head"]) for h in data["heads"]] == [
        (layer, h) for layer in (1, 2) for h in range(4)
    ]
    pool = set(textspan.default_pool())
    for head in data["heads"]:
        assert len(head["texts"]) == 5 and set(head["texts"]) <= pool
        assert head["explained"] == pytest.approx(sum(head["explained_each"]))
    assert "L2.H3" in (out / "span.html").read_text()
    assert "## Layer 1, head 0" in (out / "span.md").read_text()
    table = rows(out / "replacement.csv")
    assert [int(r["n_texts"]) for r in table] == list(range(7))
    assert set(table[0]) == {"n_texts", "text pool", "common words", "random directions"}
    # The text-pool column equals the library's replacement with the same spans.
    model, tokenizer, w = classifier_of(store)
    texts = textspan.default_pool()
    emb = textspan.encode_texts(model, tokenizer, texts, progress=False)
    keys = [(layer, h) for layer in (1, 2) for h in range(4)]
    spans = dict(
        zip(
            keys,
            textspan.text_span_heads(
                [store.stats[k] for k in keys], emb, n_texts=6, rank=16, texts=texts, progress=False
            ),
            strict=True,
        )
    )
    expected = textspan.replacement(store, w, spans, progress=False)
    assert [float(r["text pool"]) for r in table] == pytest.approx(expected.accuracy.tolist())
    assert (out / "replacement.png").stat().st_size > 1000


def test_repair_ranks_heads_by_keywords_and_reports_groups(store, tmp_path, capsys):
    attribute = tmp_path / "attribute.txt"
    attribute.write_text("\n".join(str(i % 2) for i in range(len(store))))
    out = tmp_path / "repair"
    assert (
        main(
            [
                "repair",
                str(store.path),
                "--out",
                str(out),
                "--attribute",
                str(attribute),
                "--keywords",
                "red,blue,green,circle",
                "--top",
                "2",
                "--layers",
                "2",
                "--draws",
                "3",
                "--templates",
                "simple",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "worst-group" in printed and "heads ablated: L" in printed
    report = json.loads((out / "repair.json").read_text())
    assert len(report["heads"]) == 2 and len(report["random_draws"]) == 3
    assert report["random_best"]["worst_group"] == max(
        d["worst_group"] for d in report["random_draws"]
    )
    scores = rows(out / "head_scores.csv")
    assert len(scores) == 8 and sum(r["chosen"] == "True" for r in scores) == 2
    groups = rows(out / "repair.csv")
    assert len(groups) == 6  # 3 classes × 2 attribute values
    assert min(float(g["before"]) for g in groups) == pytest.approx(report["before"]["worst_group"])


def test_retrieve_by_image_and_by_text(store, tmp_path):
    out = tmp_path / "retrieval"
    assert (
        main(
            [
                "retrieve",
                str(store.path),
                "--out",
                str(out),
                "--head",
                "2.1",
                "--head",
                "L2.H3",
                "--image",
                "0",
                "--k",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    found = json.loads((out / "retrieval.json").read_text())
    expected = textspan.retrieve(store, [(2, 1), (2, 3)], 0, k=4, progress=False)
    assert [r["index"] for r in found["results"]] == expected.indices.tolist()
    assert found["results"][0]["file"] == store.files[expected.indices[0]]
    assert (out / "retrieval.png").stat().st_size > 1000
    assert (
        main(
            [
                "retrieve",
                str(store.path),
                "--out",
                str(out),
                "--head",
                "2.1",
                "--text",
                "a red circle",
                "--project",
                "3",
                "--rank",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "retrieval.json").read_text())["results"]) == 9


def test_segment_with_masks_writes_overlays_and_metrics(image_folder, tiny, tmp_path, capsys):
    config, checkpoint = tiny
    masks = tmp_path / "masks"
    files, _, _ = list_images(image_folder)
    rng = np.random.default_rng(0)
    for f in files:
        (masks / f).parent.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((40, 40)) < 0.4).astype(np.uint8) * 255
        Image.fromarray(pixels).save((masks / f).with_suffix(".png"))
    out = tmp_path / "seg"
    assert (
        main(
            [
                "segment",
                str(image_folder),
                "--out",
                str(out),
                "--model",
                str(config),
                "--pretrained",
                str(checkpoint),
                "--masks",
                str(masks),
                "--templates",
                "simple",
                "--overlays",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    heatmaps = np.load(out / "heatmaps.npy")
    assert heatmaps.shape == (len(files), 4, 4)
    truth = np.stack(
        [read_mask((masks / f).with_suffix(".png"), (32, 32), (40, 40)) for f in files]
    )
    expected = textspan.segmentation_scores(heatmaps, truth)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert (out / "overlays.png").stat().st_size > 1000
    assert len(rows(out / "classes.csv")) == len(files)
    # A mask of another size than its image (here transposed) is refused before any work.
    first = (masks / files[0]).with_suffix(".png")
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(first)
    argv = ["segment", str(image_folder), "--out", str(tmp_path / "seg2"), "--model",
            str(config), "--pretrained", str(checkpoint), "--masks", str(masks), "--device",
            "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "it is 30×40 px, its image 40×40" in capsys.readouterr().err


def test_bad_input_ends_in_one_line_before_any_work(store, image_folder, tmp_path, capsys):
    assert main(["span", str(store.path), "--layers", "4", "--device", "cpu"]) == 2
    assert "layers: expected 1..3 (the model's layers), got 4" in capsys.readouterr().err
    attribute = tmp_path / "attribute.txt"
    attribute.write_text("0\n1\n")
    assert (
        main(
            [
                "repair",
                str(store.path),
                "--attribute",
                str(attribute),
                "--keywords",
                "red",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert f"expected {len(store)} integers (one per image of the store)" in (
        capsys.readouterr().err
    )
    assert main(["ablate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist: expected a folder made by" in capsys.readouterr().err
    bad = tmp_path / "bad_masks"
    files, _, _ = list_images(image_folder)
    for f in files:
        (bad / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40), 7, np.uint8)).save((bad / f).with_suffix(".png"))
    config, checkpoint = store.manifest.model, store.manifest.pretrained
    assert (
        main(
            [
                "segment",
                str(image_folder),
                "--model",
                config,
                "--pretrained",
                checkpoint,
                "--masks",
                str(bad),
                "--out",
                str(tmp_path / "seg"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "expected a binary mask (0/1 or 0/255), got values [7]" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()


def test_flat_store_refuses_accuracy(tiny, tmp_path):
    config, checkpoint = tiny
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / f"{i}.png")
    store = textspan.extract(
        flat,
        tmp_path / "s",
        model=str(config),
        pretrained=str(checkpoint),
        engine=textspan.LocalEngine(workers=0, device="cpu"),
        progress=False,
    )
    result = subprocess.run(
        [sys.executable, "-m", "textspan.cli", "ablate", str(store.path), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "extracted from a flat folder (labels -1)" in result.stderr


def test_an_imagenet_segmentation_mask_of_another_size_than_its_image_is_named(
    tiny, tmp_path, capsys
):
    from datafiles import pixels, write_gtsegs

    config, checkpoint = tiny
    images = [pixels(i, (20, 24)) for i in range(2)]
    masks = [np.ones((20, 24), np.uint8), np.ones((24, 20), np.uint8)]  # the second transposed
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    argv = ["segment", f"imagenet-seg:{tmp_path / 'gtsegs_ijcv.mat'}", "--out",
            str(tmp_path / "seg"), "--model", str(config), "--pretrained", str(checkpoint),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "item 1: its mask is [24, 20], its image [20, 24]" in capsys.readouterr().err


def test_retrieval_and_thumbnails_read_images_inside_webdataset_shards(tiny, tmp_path):
    from datafiles import write_shards
    from extraction import extract_options

    from textspan.explorer import _Thumbs

    write_shards(tmp_path / "shards", per_shard=3, shards=2)
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"
    store = textspan.extract(spec, tmp_path / "store", **extract_options(tiny))
    out = tmp_path / "retrieval"
    argv = ["retrieve", str(store.path), "--out", str(out), "--head", "L1.H0", "--image", "0",
            "--k", "3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "retrieval.png").stat().st_size > 1000
    root = store.path.parent / "shards"  # where the shards are (the manifest says so)
    assert store.manifest.images == str(root.resolve())
    thumbs = _Thumbs(tmp_path / "site" / "thumbs", root, store.files, store.manifest.dataset)
    with Image.open(tmp_path / "site" / thumbs(1)) as im:
        assert im.size[0] > 0
