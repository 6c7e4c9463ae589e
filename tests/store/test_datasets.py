"""The readers of `textspan.datasets` on small fixtures written in each real layout: every
reader returns exactly what was written, and bad inputs are one clear error each."""

from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import pytest
from datafiles import pixels, write_gtsegs, write_shards
from extraction import extract_options
from PIL import Image

import textspan
from textspan import InputError, MissingFileError
from textspan.datasets import (
    imagenet,
    imagenet_segmentation,
    open_images,
    waterbirds,
    webdataset,
)
from textspan.models import imagenet_synsets

SYNSETS = imagenet_synsets()


def save(path, array) -> None:
    """PNG content (lossless) under any name, as PIL reads by content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture
def flat_imagenet(tmp_path):
    """Six flat validation images, labelled in LOC_val_solution.csv out of file order."""
    root = tmp_path / "val"
    labels = [999, 0, 417, 0, 5, 640]
    rows = []
    for i, label in enumerate(labels, 1):
        save(root / f"ILSVRC2012_val_{i:08d}.JPEG", pixels(i))
        rows.append(
            (f"ILSVRC2012_val_{i:08d}", f"{SYNSETS[label]} 1 2 30 40 {SYNSETS[label]} 3 4 5 6")
        )
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(reversed(rows))
    return root, labels


def test_flat_imagenet_with_the_solution_csv(flat_imagenet):
    root, labels = flat_imagenet
    ds = imagenet(root)
    assert ds.files == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.classes == SYNSETS and ds.classes[0] == "n01440764" and ds.classes[-1] == "n15075141"
    image, target = ds[2]
    np.testing.assert_array_equal(np.asarray(image), pixels(3))
    assert target == 417


def test_a_solution_file_with_a_bom_reads_and_one_with_conflicting_labels_is_refused(
    flat_imagenet, tmp_path
):
    root, labels = flat_imagenet
    csv_file = tmp_path / "LOC_val_solution.csv"
    text = csv_file.read_text()
    csv_file.write_text("\ufeff" + text, encoding="utf-8")  # as a spreadsheet saves it
    np.testing.assert_array_equal(imagenet(root).labels, labels)
    other = f"ILSVRC2012_val_00000001,{SYNSETS[3]} 1 2 3 4\n"
    csv_file.write_text(text + other, encoding="utf-8")
    with pytest.raises(InputError, match=r"ILSVRC2012_val_00000001 is listed twice"):
        imagenet(root)


def test_a_solution_file_that_is_not_utf8_is_named(flat_imagenet, tmp_path):
    root, _ = flat_imagenet
    csv_file = tmp_path / "LOC_val_solution.csv"
    csv_file.write_bytes(
        csv_file.read_bytes() + "ILSVRC2012_val_0000009,caf\xe9\n".encode("latin-1")
    )
    with pytest.raises(InputError, match=r"LOC_val_solution.csv: expected UTF-8 text"):
        imagenet(root)


def test_flat_imagenet_with_the_devkit(tmp_path):
    from scipy.io import savemat

    root, devkit = tmp_path / "val", tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # meta.mat numbers synsets in its own order (ILSVRC2012_ID), not the sorted one.
    order = np.random.default_rng(0).permutation(1000)
    synsets = np.zeros(1000, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for k, s in enumerate(order):
        synsets[k] = (k + 1, SYNSETS[s])
    savemat(devkit / "meta.mat", {"synsets": synsets})
    labels = [3, 999, 3, 0]
    ids = [int(np.flatnonzero(order == label)[0]) + 1 for label in labels]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)))
    for i in range(1, 5):
        save(root / f"ILSVRC2012_val_{i:08d}.JPEG", pixels(i))
    np.testing.assert_array_equal(imagenet(root).labels, labels)
    np.testing.assert_array_equal(imagenet(root, devkit).labels, labels)
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("\n".join([str(ids[0]), "12x", *map(str, ids[2:])]))
    with pytest.raises(InputError, match=r"line 2: expected an ILSVRC2012_ID, got '12x'"):
        imagenet(root)
    (devkit / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, but nothing after")
    with pytest.raises(InputError, match=r"meta.mat: expected the devkit's meta.mat"):
        imagenet(root)


def test_imagenet_class_folders_take_the_standard_indices(tmp_path):
    for synset, n in (("n15075141", 2), ("n01440764", 1), ("n02085620", 2)):
        for i in range(n):
            save(tmp_path / synset / f"{i}.png", pixels(i))
    ds = open_images(f"imagenet:{tmp_path}")
    np.testing.assert_array_equal(ds.labels, [0, 151, 151, 999, 999])
    assert ds.files[0].startswith("n01440764/")
    save(tmp_path / "extra" / "0.png", pixels(9))  # a stray folder of images beside them
    with pytest.raises(InputError, match=r"not ImageNet-1k synsets, e.g. 'extra'"):
        open_images(f"imagenet:{tmp_path}")


def test_imagenet_label_problems_are_named(flat_imagenet, tmp_path):
    root, _ = flat_imagenet
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text(solution.read_text().replace(SYNSETS[417], "n99999999", 1))
    with pytest.raises(InputError, match="n99999999"):
        imagenet(root)
    solution.unlink()
    with pytest.raises(MissingFileError, match=r"LOC_val_solution\.csv"):
        imagenet(root)


def test_a_full_validation_set_with_wrong_counts_warns(tmp_path):
    """50,000 images whose labels are not 50 per class: a warning (the files are empty,
    since only the labels are read)."""
    root = tmp_path / "val"
    root.mkdir()
    rows = []
    for i in range(1, 50_001):
        (root / f"ILSVRC2012_val_{i:08d}.JPEG").touch()
        rows.append((f"ILSVRC2012_val_{i:08d}", f"{SYNSETS[i % 999]} 0 0 1 1"))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    with pytest.warns(textspan.DataWarning, match="50 images per class"):
        imagenet(root)


def test_waterbirds_round_trips_the_toy_layout(tmp_path):
    from textspan.cli import main

    assert main(["toy-data", "waterbirds", str(tmp_path), "--train", "20", "--val", "4",
                 "--test", "6"]) == 0  # fmt: skip
    with open(tmp_path / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for split, index in (("train", 0), ("val", 1), ("test", 2)):
        expected = [r for r in rows if int(r["split"]) == index]
        ds = waterbirds(tmp_path, split)
        assert ds.files == [r["img_filename"] for r in expected]
        np.testing.assert_array_equal(ds.labels, [int(r["y"]) for r in expected])
        np.testing.assert_array_equal(ds.places, [int(r["place"]) for r in expected])
        np.testing.assert_array_equal(ds.groups, ds.labels * 2 + ds.places)
        image, _ = ds[0]
        np.testing.assert_array_equal(
            np.asarray(image), np.asarray(Image.open(tmp_path / ds.files[0]).convert("RGB"))
        )
    assert ds.classes == ["circle", "triangle"]
    assert np.bincount(waterbirds(tmp_path, "train").groups).tolist() == [19, 1, 1, 19]
    text = (tmp_path / "metadata.csv").read_text().replace(",place", ",where")
    (tmp_path / "metadata.csv").write_text(text)
    with pytest.raises(InputError, match="missing place"):
        waterbirds(tmp_path, "test")


def test_waterbirds_metadata_that_is_malformed_or_escapes_the_root_is_named(tmp_path):
    from textspan.cli import main

    assert main(["toy-data", "waterbirds", str(tmp_path), "--train", "20", "--val", "4",
                 "--test", "6"]) == 0  # fmt: skip
    meta = tmp_path / "metadata.csv"
    good = meta.read_text()
    header, first, *rest = good.splitlines()
    train = len(waterbirds(tmp_path, "train"))
    meta.write_text("\ufeff" + good, encoding="utf-8")  # a spreadsheet's byte-order mark
    assert len(waterbirds(tmp_path, "train")) == train
    cells = first.split(",")
    column = header.split(",").index("split")
    for bad, message in (
        ("train", r"line 2: expected an integer split, got 'train'"),
        ("", r"line 2: expected an integer split, got ''"),
    ):
        row = cells.copy()
        row[column] = bad
        meta.write_text("\n".join([header, ",".join(row), *rest]) + "\n")
        with pytest.raises(InputError, match=message):
            waterbirds(tmp_path, "train")
    row = cells.copy()
    row[header.split(",").index("img_filename")] = "../outside.png"
    meta.write_text("\n".join([header, ",".join(row), *rest]) + "\n")
    with pytest.raises(InputError, match=r"must name a file under .*'\.\./outside\.png'"):
        waterbirds(tmp_path, "train")


def test_dataset_specs_expand_the_home_folder(tmp_path, monkeypatch):
    from textspan.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["toy-data", "waterbirds", str(tmp_path / "wb"), "--train", "20", "--val",
                 "4", "--test", "6"]) == 0  # fmt: skip
    direct = waterbirds(tmp_path / "wb", "test")
    assert open_images("waterbirds:~/wb:test").files == direct.files


def test_imagenet_segmentation_round_trips_a_v73_file(tmp_path):
    rng = np.random.default_rng(0)
    images = [pixels(i, (18 + i, 25)) for i in range(3)]
    masks = [rng.integers(0, 2, im.shape[:2], dtype=np.uint8) for im in images]
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    ds = imagenet_segmentation(tmp_path / "gtsegs_ijcv.mat")
    assert len(ds) == 3
    for i in range(3):
        image, mask = ds[i]
        np.testing.assert_array_equal(np.asarray(image), images[i])
        np.testing.assert_array_equal(mask, masks[i])
    write_gtsegs(tmp_path / "broken.mat", images, masks, with_images=False)
    with pytest.raises(InputError, match="/value/img"):
        imagenet_segmentation(tmp_path / "broken.mat")
    assert [ds.image_shape(i) for i in range(3)] == [im.shape[:2] for im in images]


def test_imagenet_segmentation_items_that_cannot_be_scored_are_named(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)  # real ImageNet holds some
    mask = rng.integers(0, 2, (20, 24), dtype=np.uint8)
    write_gtsegs(tmp_path / "gray.mat", [gray], [mask])
    image = imagenet_segmentation(tmp_path / "gray.mat").image(0)
    np.testing.assert_array_equal(np.asarray(image), np.repeat(gray[:, :, None], 3, axis=2))
    write_gtsegs(tmp_path / "float.mat", [rng.random((20, 24, 3))], [mask])
    with pytest.raises(InputError, match=r"image 0: expected integer pixels in 0..255"):
        imagenet_segmentation(tmp_path / "float.mat").image(0)
    write_gtsegs(tmp_path / "grey-mask.mat", [pixels(1, (20, 24))], [mask * 100])
    with pytest.raises(
        InputError, match=r"mask 0: expected a binary mask .* got values \[0, 100\]"
    ):
        imagenet_segmentation(tmp_path / "grey-mask.mat").mask(0)


@pytest.mark.parametrize("text", [b"--5", b"99999999999999999999", b"1.5"])
def test_a_class_sidecar_that_is_not_a_plain_integer_is_named(tmp_path, text):
    write_shards(tmp_path / "shards", per_shard=1, shards=1)
    with tarfile.open(tmp_path / "shards" / "00000.tar", "a") as tar:
        info = tarfile.TarInfo("000000001.cls")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    with pytest.raises(InputError, match=r"000000001.cls: expected a class index"):
        webdataset(str(tmp_path / "shards" / "*.tar"))


def test_webdataset_shards_round_trip_and_extract(tmp_path, tiny):
    written = write_shards(tmp_path / "shards")
    ds = webdataset(str(tmp_path / "shards" / "*.tar"))
    assert len(ds) == 6 and ds.files[0] == "00000.tar//000000000.png"
    for i, (array, label) in enumerate(written):
        image, target = ds[i]
        np.testing.assert_array_equal(np.asarray(image), array)
        assert target == label
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"
    store = textspan.extract(spec, tmp_path / "store", **extract_options(tiny))
    assert len(store) == 6 and store.files == ds.files
    np.testing.assert_array_equal(store.labels, ds.labels)
    again = textspan.extract(spec, tmp_path / "store", **extract_options(tiny))  # resumes
    np.testing.assert_array_equal(again.heads[:], store.heads[:])
    write_shards(tmp_path / "captions", images=False)
    with pytest.raises(InputError, match="no image members"):
        webdataset(str(tmp_path / "captions" / "*.tar"))


def test_extract_over_a_dataset_spec_keeps_its_labels(flat_imagenet, tmp_path, tiny):
    root, labels = flat_imagenet
    store = textspan.extract(f"imagenet:{root}", tmp_path / "s", **extract_options(tiny))
    np.testing.assert_array_equal(store.labels, labels)
    assert store.manifest.dataset == "imagenet" and store.classes == SYNSETS


def test_a_class_sidecar_that_is_not_an_index_is_named(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in (("a.png", b"x"), ("a.cls", b"cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match=r"a\.cls: expected a class index, got b'cat'"):
        webdataset(str(tmp_path / "bad.tar"))


def test_the_reason_an_image_in_a_shard_is_skipped_is_the_same_in_every_run(tmp_path, tiny):
    import json

    write_shards(tmp_path / "shards", per_shard=3, shards=1)
    with tarfile.open(tmp_path / "shards" / "00000.tar", "a") as tar:
        info = tarfile.TarInfo("broken0001.png")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"garbage"))
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"
    reasons = []
    for run in ("a", "b"):
        with pytest.warns(textspan.SkippedImagesWarning, match="1 unreadable"):
            textspan.extract(spec, tmp_path / run, **extract_options(tiny))
        skipped = json.loads((tmp_path / run / "progress.json").read_text())["skipped"]
        reasons.append(list(skipped.values()))
    assert reasons[0] == reasons[1] and len(reasons[0]) == 1
    assert "object at 0x" not in reasons[0][0] and "cannot be read" in reasons[0][0]


def test_a_shard_pattern_that_matches_nothing_is_named_and_a_repeated_shard_read_once(tmp_path):
    write_shards(tmp_path / "shards", per_shard=2, shards=2)
    first = tmp_path / "shards" / "00000.tar"
    with pytest.raises(MissingFileError, match=r"no shard matches '.*typo\*\.tar'"):
        webdataset(f"{first},{tmp_path / 'shards' / 'typo*.tar'}")
    twice = webdataset(f"{first},{tmp_path / 'shards' / '*.tar'}")
    once = webdataset(str(tmp_path / "shards" / "*.tar"))
    assert twice.files == once.files and len(once) == 4


def test_a_truncated_shard_or_a_repeated_member_is_named_not_read_short(tmp_path):
    write_shards(tmp_path / "whole", per_shard=8, shards=1)
    shard = tmp_path / "whole" / "00000.tar"
    assert len(webdataset(str(shard))) == 8
    data = shard.read_bytes()
    for cut in (len(data) // 2, len(data) // 2 + 100, len(data) // 2 + 700):
        (tmp_path / "cut").mkdir(exist_ok=True)
        short = tmp_path / "cut" / "00000.tar"
        short.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"00000.tar is (not a tar archive, or is )?trunc"):
            webdataset(str(short))
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        for name, seed in (("000001.png", 1), ("000002.png", 2), ("000001.png", 3)):
            buffer = io.BytesIO()
            Image.fromarray(pixels(seed)).save(buffer, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    with pytest.raises(InputError, match=r"holds the member '000001.png' twice"):
        webdataset(str(twice))
