"""Models, texts, classifiers, and extraction to a store: resume, refusal, corruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from extraction import extract_killed_after, extract_options
from PIL import Image

import textspan
from textspan import HeadStats, StoreError, extract, open_store
from textspan.models import Decomposer


def run_extract(images, out, tiny, **kwargs):
    return extract(images, out, **extract_options(tiny, **kwargs))


def cli(images, out, tiny):
    config, checkpoint = tiny
    cmd = [
        sys.executable,
        "-m",
        "textspan.cli",
        "extract",
        str(images),
        str(out),
        "--model",
        str(config),
        "--pretrained",
        str(checkpoint),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--checkpoint-every",
        "8",
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def assert_same_store(a, b):
    for name in ("heads", "mlps", "class_token", "representation", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.stats.count == b.stats.count
    np.testing.assert_array_equal(a.stats.covariance, b.stats.covariance)


@pytest.fixture(scope="module")
def reference(image_folder, tiny, tmp_path_factory):
    return run_extract(image_folder, tmp_path_factory.mktemp("ref") / "store", tiny)


def test_load_from_a_checkpoint_path_gives_the_saved_weights(tiny):
    config, checkpoint = tiny
    model, _, tokenizer = textspan.load(config, pretrained=checkpoint, device="cpu")
    saved = torch.load(checkpoint)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, saved[name])
    assert not model.training
    assert tokenizer(["a red circle"]).shape == (1, 16)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        textspan.load(config, pretrained="missing/weights.pt", device="cpu")
    with pytest.raises(ValueError, match="open_clip model name"):
        textspan.load("ViT-Q-99", device="cpu")


def test_random_weights_are_the_same_in_every_load(tiny):
    config, _ = tiny
    torch.manual_seed(1)
    first, _, _ = textspan.load(config, device="cpu")
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    second, _, _ = textspan.load(config, device="cpu")
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    torch.manual_seed(1)
    textspan.load(config, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_texts_and_zero_shot_classifier(tiny):
    config, checkpoint = tiny
    model, _, tokenizer = textspan.load(config, pretrained=checkpoint, device="cpu")
    texts = ["a red circle", "a blue square", "a photo of a dog"]
    emb = textspan.encode_texts(model, tokenizer, texts, batch_size=2, progress=False)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    with torch.no_grad():
        direct = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)
    classifier = textspan.zero_shot_classifier(
        model, tokenizer, ["cat", "dog"], ["a photo of a {}.", lambda c: f"a {c}"], progress=False
    )
    assert classifier.shape == (32, 2)
    per_class = emb = textspan.encode_texts(
        model, tokenizer, ["a photo of a cat.", "a cat"], progress=False
    ).mean(0)
    np.testing.assert_allclose(classifier[:, 0], per_class / np.linalg.norm(per_class), rtol=1e-5)
    imagenet = textspan.zero_shot_classifier(model, tokenizer, templates=["{}"], progress=False)
    assert imagenet.shape == (32, 1000)


def test_store_holds_the_decomposition_and_its_statistics(reference, tiny, image_folder):
    store = open_store(reference.path, verify=True)
    assert len(store) == 30 and store.classes == ["cat", "dog", "fish"]
    assert store.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert store.files[0] == os.path.join("cat", "00.png")
    total = store.heads.sum((1, 2)) + store.mlps.sum(1)
    np.testing.assert_allclose(total, store.representation, rtol=1e-4, atol=1e-5)
    expected = HeadStats.from_outputs(np.asarray(store.heads))
    np.testing.assert_allclose(store.stats.mean, expected.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(store.stats.covariance, expected.covariance, rtol=1e-8, atol=1e-12)
    # The same rows as decomposing the images directly.
    model, preprocess, _ = textspan.load(tiny[0], pretrained=tiny[1], device="cpu")
    batch = torch.stack([preprocess(Image.open(image_folder / f)) for f in store.files[:4]])
    with Decomposer(model) as d:
        parts = d.decompose(batch)
    np.testing.assert_allclose(store.heads[:4], parts.heads.numpy(), rtol=1e-5, atol=1e-6)


def test_resumes_after_kill_9_in_the_middle_of_a_chunk(reference, image_folder, tiny, tmp_path):
    out = tmp_path / "store"
    # Killed after 14 rows: one checkpoint (8 rows) done, the next chunk half written.
    killed = extract_killed_after(
        14,
        image_folder,
        out,
        tiny,
        batch_size=4,
        dtype="float32",
        engine=textspan.LocalEngine(workers=0, device="cpu", checkpoint_every=8),
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / "progress.json").read_text())["done"] == 8
    with pytest.raises(StoreError, match="incomplete: 8 of 30"):
        open_store(out)
    resumed = cli(image_folder, out, tiny)
    assert resumed.returncode == 0, resumed.stderr
    assert "(8 done before)" in resumed.stdout
    assert_same_store(open_store(out, verify=True), reference)


def test_resumes_after_ctrl_c_keeping_finished_batches(
    reference, image_folder, tiny, tmp_path, monkeypatch
):
    out = tmp_path / "store"
    calls = {"n": 0}
    original = Decomposer.decompose

    def interrupted(self, images, **options):
        calls["n"] += 1
        if calls["n"] == 4:  # after 3 batches = 12 rows, one checkpoint at 8
            raise KeyboardInterrupt
        return original(self, images, **options)

    monkeypatch.setattr(Decomposer, "decompose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_extract(image_folder, out, tiny)
    assert json.loads((out / "progress.json").read_text())["done"] == 12
    monkeypatch.setattr(Decomposer, "decompose", original)
    assert_same_store(run_extract(image_folder, out, tiny), reference)


def test_other_arguments_into_the_same_folder_are_refused(reference, image_folder, tiny):
    with pytest.raises(StoreError, match="dtype: 'float32' there, 'float16' now"):
        run_extract(image_folder, reference.path, tiny, dtype="float16")


def test_corrupt_or_truncated_stores_are_detected(reference, tmp_path):
    import shutil

    def copy(name):
        target = tmp_path / name
        shutil.copytree(reference.path, target)
        return target

    truncated = copy("truncated")
    with open(truncated / "heads.npy", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "heads.npy") // 2)
    with pytest.raises(StoreError, match=r"heads\.npy is truncated or corrupt"):
        open_store(truncated)

    flipped = copy("flipped")
    with open(flipped / "mlps.npy", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 8)
    open_store(flipped)  # the structure is intact
    with pytest.raises(StoreError, match="do not match their checksum"):
        open_store(flipped, verify=True)

    manifest = copy("manifest")
    (manifest / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json is corrupt"):
        open_store(manifest)

    stats = copy("stats")
    next(stats.glob("stats-*.npz")).write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"stats-30.npz is corrupt"):
        open_store(stats)


def test_flat_folders_and_bad_arguments(tiny, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 32, 3), i * 40, dtype=np.uint8)).save(flat / f"{i}.jpg")
    store = run_extract(flat, tmp_path / "store", tiny)
    assert store.labels.tolist() == [-1] * 5 and store.classes == []
    with pytest.raises(ValueError, match="no image files"):
        run_extract(tmp_path / "store", tmp_path / "other", tiny)
    with pytest.raises(ValueError, match="dtype: expected 'float16' or 'float32', got 'int8'"):
        run_extract(flat, tmp_path / "x", tiny, dtype="int8")
