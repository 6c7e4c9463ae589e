"""The Ray engine on a local Ray instance started here: the store equals a single-process
extraction; a killed actor is retried; a killed driver resumes from its shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import ray

import textspan
from textspan import distributed

ARRAYS = ("heads", "mlps", "class_token", "representation")

# Ray's own noise, not ours, so not errors here: starting a node leaves its handles on
# /dev/null unclosed (ResourceWarning, reported by pytest as unraisable; pyproject.toml
# ignores those in every test, as they may be collected later), and Ray Data reads a
# deprecated setting of its own (DeprecationWarning from ray.*).
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]


@pytest.fixture(scope="module")
def cluster():
    # Ray warns (FutureWarning) that it will stop hiding GPUs from zero-GPU workers unless
    # this is set; the actors choose their device themselves, so either way is right here.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def options(tiny, **extra):
    config, checkpoint = tiny
    return {
        "model": str(config),
        "pretrained": str(checkpoint),
        "batch_size": 4,
        "dtype": "float32",
        "progress": False,
        **extra,
    }


@pytest.fixture(scope="module")
def reference(image_folder, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    return textspan.extract(image_folder, out, workers=0, device="cpu", **options(tiny))


def assert_same(store, reference):
    assert store.files == reference.files
    np.testing.assert_array_equal(store.labels, reference.labels)
    for name in ARRAYS:
        np.testing.assert_allclose(
            getattr(store, name), getattr(reference, name), atol=2e-6, rtol=1e-5, err_msg=name
        )
    assert store.stats.count == reference.stats.count
    # Float tolerance: other batch compositions round the float32 contributions differently.
    np.testing.assert_allclose(store.stats.mean, reference.stats.mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        store.stats.covariance, reference.stats.covariance, rtol=1e-4, atol=1e-8
    )


def test_ray_store_equals_the_single_process_store(
    cluster, image_folder, tiny, reference, tmp_path
):
    store = textspan.extract(
        image_folder, tmp_path / "store", engine="ray", workers=2, shard_size=8, **options(tiny)
    )
    assert_same(store, reference)
    textspan.open_store(store.path, verify=True)  # every range's checksum
    assert not (store.path / distributed.SHARDS).exists()
    again = textspan.extract(
        image_folder, tmp_path / "store", engine="ray", workers=2, shard_size=8, **options(tiny)
    )  # complete: nothing to do
    assert_same(again, reference)


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_retried_and_every_image_lands_once(
    cluster, image_folder, tiny, reference, tmp_path, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv(distributed.KILL_SHARD_ENV, "8")
    monkeypatch.setenv(distributed.KILL_MARKER_ENV, str(marker))
    store = textspan.extract(
        image_folder, tmp_path / "store", engine="ray", workers=2, shard_size=8, **options(tiny)
    )
    assert marker.exists(), "the actor never reached the shard it was to die on"
    assert_same(store, reference)
    # Exactly once: every stored row is the reference row of the same image, none repeated.
    rows = store.representation
    assert len(np.unique(rows.round(5), axis=0)) == len(reference)


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_shards_already_written(
    cluster, image_folder, tiny, reference, tmp_path
):
    config, checkpoint = tiny
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "textspan.cli",
        "extract",
        str(image_folder),
        str(out),
        "--model",
        str(config),
        "--pretrained",
        str(checkpoint),
        "--engine",
        "ray",
        "--address",
        cluster,
        "--workers",
        "2",
        "--shard-size",
        "3",
        "--batch-size",
        "3",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, distributed.KILL_DRIVER_ENV: "2"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -9, first.stderr[-2000:]
    written = [p for p in (out / distributed.SHARDS).iterdir() if p.is_dir()]
    assert len(written) >= 2 and not (out / "progress.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    # Actors may finish a shard or two after the driver died; those are kept as well.
    kept = re.search(r"(\d+) shards, (\d+) done before", second.stdout)
    assert kept and int(kept.group(2)) >= len(written), second.stdout
    assert_same(textspan.open_store(out, verify=True), reference)


def test_ray_text_encoding_equals_local(cluster, tiny):
    config, checkpoint = tiny
    model, _, tokenizer = textspan.load(config, pretrained=checkpoint, device="cpu")
    texts = textspan.default_pool()[:50]
    local = textspan.encode_texts(model, tokenizer, texts, progress=False)
    distributed_ = textspan.distributed.encode_texts_ray(
        model, tokenizer, texts, batch_size=8, workers=2, chunk=16, progress=False
    )
    np.testing.assert_allclose(distributed_, local, atol=1e-6)
    via_api = textspan.encode_texts(
        model, tokenizer, texts, engine="ray", workers=1, progress=False
    )
    np.testing.assert_allclose(via_api, local, atol=1e-6)


def test_without_ray_the_engine_says_how_to_install_it(image_folder, tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'textspan\[ray\]'"):
        textspan.extract(image_folder, tmp_path / "s", engine="ray", **options(tiny))
    with pytest.raises(ValueError, match="engine: expected 'local' or 'ray', got 'spark'"):
        textspan.extract(image_folder, tmp_path / "s", engine="spark", **options(tiny))
