"""The Ray engine on a local Ray instance started here: the store equals a single-process
extraction; a killed actor is retried; a killed driver resumes from its shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from datafiles import write_shards
from extraction import extract_killed_after, extract_options

import textspan
from textspan.engines import LocalEngine, RayEngine
from textspan.engines import ray as ray_engine
from textspan.store.writer import PARTS

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


class KillOnce:
    """Kills the process it is called in (SIGKILL) when it reaches the shard that starts at
    `row`, once: the marker file records that it did. Handed to the actors as `before_shard`
    (pickled by value: the actors cannot import this test module)."""

    def __init__(self, row: int, marker: Path) -> None:
        self.row, self.marker = row, str(marker)

    def __call__(self, start: int) -> None:
        if start == self.row and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def options(tiny, **extra):
    """The tiny model's arguments, without an engine."""
    arguments = extract_options(tiny, **extra)
    del arguments["engine"]
    return arguments


LOCAL = LocalEngine(workers=0, device="cpu", checkpoint_every=8)


@pytest.fixture(scope="module")
def reference(image_folder, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    return textspan.extract(image_folder, out, engine=LOCAL, **options(tiny))


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
        image_folder, tmp_path / "store", engine=RayEngine(workers=2, shard_size=8), **options(tiny)
    )
    assert_same(store, reference)
    textspan.open_store(store.path, verify=True)  # every range's checksum
    assert not (store.path / PARTS).exists()
    again = textspan.extract(
        image_folder, tmp_path / "store", engine=RayEngine(workers=2, shard_size=8), **options(tiny)
    )  # complete: nothing to do
    assert_same(again, reference)


def test_webdataset_shards_through_ray_datas_reader_equal_the_local_store(cluster, tiny, tmp_path):
    write_shards(tmp_path / "shards", per_shard=5, shards=3)
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"
    local = textspan.extract(spec, tmp_path / "local", engine=LOCAL, **options(tiny))
    store = tmp_path / "ray"
    done = textspan.extract(spec, store, engine=RayEngine(workers=2), **options(tiny))
    assert_same(done, local)
    textspan.open_store(done.path, verify=True)
    assert not (done.path / PARTS).exists()
    again = textspan.extract(spec, store, engine=RayEngine(workers=2), **options(tiny))
    assert_same(again, local)


def test_strict_over_webdataset_samples_is_refused_not_ignored(tiny, tmp_path):
    write_shards(tmp_path / "shards", per_shard=2, shards=1)
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"
    with pytest.raises(textspan.InputError, match="strict: the Ray engine reads WebDataset"):
        textspan.extract(spec, tmp_path / "s", engine=RayEngine(), strict=True, **options(tiny))
    assert not (tmp_path / "s").exists()  # refused before the store was touched


def test_webdataset_parts_written_before_a_stop_are_not_computed_again(
    cluster, tiny, tmp_path, monkeypatch, capsys
):
    write_shards(tmp_path / "shards", per_shard=4, shards=2)
    spec = f"webdataset:{tmp_path / 'shards' / '*.tar'}"

    write = RayEngine._write_samples

    def stop(*args):
        write(*args)
        raise KeyboardInterrupt  # the driver stops once every part is written

    with monkeypatch.context() as m:
        m.setattr(RayEngine, "_write_samples", stop)
        with pytest.raises(KeyboardInterrupt):
            textspan.extract(spec, tmp_path / "s", engine=RayEngine(workers=2), **options(tiny))
    assert any((tmp_path / "s" / PARTS).iterdir())
    capsys.readouterr()
    store = textspan.extract(spec, tmp_path / "s", engine=RayEngine(workers=2), **options(tiny))
    assert "8 done before" in capsys.readouterr().out
    local = textspan.extract(spec, tmp_path / "l", engine=LOCAL, **options(tiny))
    assert_same(store, local)


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_retried_and_every_image_lands_once(
    cluster, image_folder, tiny, reference, tmp_path
):
    marker = tmp_path / "killed"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    store = textspan.extract(
        image_folder,
        tmp_path / "store",
        engine=RayEngine(workers=2, shard_size=8, before_shard=KillOnce(8, marker)),
        **options(tiny),
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
    # The same extraction, its driver killed once two shards are written.
    first = extract_killed_after(
        6,
        image_folder,
        out,
        tiny,
        engine=RayEngine(address=cluster, workers=2, shard_size=3),
        batch_size=3,
        dtype="float32",
    )
    assert first.returncode == -9, first.stderr[-2000:]
    # Complete shards only: an actor killed mid-write leaves a `.tmp-<pid>` folder behind,
    # which a rerun ignores (and once failed this count).
    written = [p for p in (out / PARTS).iterdir() if p.is_dir() and ".tmp-" not in p.name]
    # Nothing absorbed yet: the parts are all the driver's writer had not taken in.
    assert len(written) >= 2
    assert json.loads((out / "progress.json").read_text())["files_done"] == 0
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    # Actors may finish a shard or two after the driver died; those are kept as well.
    kept = re.search(r"(\d+) shards, (\d+) done before", second.stdout)
    assert kept and int(kept.group(2)) >= len(written), second.stdout
    assert_same(textspan.open_store(out, verify=True), reference)


def stop_at(files: int):
    """An `on_progress` that interrupts the run once `files` images are done."""

    def stop(done: int) -> None:
        if done >= files:
            raise KeyboardInterrupt

    return stop


def test_a_store_begun_by_the_local_engine_is_finished_by_ray(
    cluster, image_folder, tiny, reference, tmp_path, capsys
):
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        textspan.extract(image_folder, out, engine=LOCAL, on_progress=stop_at(12), **options(tiny))
    capsys.readouterr()
    store = textspan.extract(
        image_folder, out, engine=RayEngine(workers=2, shard_size=5), **options(tiny)
    )
    # The shards start where the local engine stopped (12 images, checkpointed on the stop).
    assert "4 shards, 0 done before" in capsys.readouterr().out
    assert_same(store, reference)
    textspan.open_store(out, verify=True)


def test_a_store_begun_by_ray_is_finished_by_the_local_engine(
    cluster, image_folder, tiny, reference, tmp_path, capsys
):
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        textspan.extract(
            image_folder,
            out,
            engine=RayEngine(workers=1, shard_size=4),
            on_progress=stop_at(1),
            **options(tiny),
        )
    written = sorted(p.name for p in (out / PARTS).iterdir() if ".tmp-" not in p.name)
    assert written
    # The local engine absorbs the shards that continue the store from its first image.
    continued = 0
    for name in written:
        first, end = (int(x) for x in name.split("-"))
        if first == continued:
            continued = end
    capsys.readouterr()
    store = textspan.extract(image_folder, out, engine=LOCAL, **options(tiny))
    # (An actor may still finish a shard after the driver stopped: that one counts too.)
    before = re.search(r"\((\d+) done before\)", capsys.readouterr().out)
    assert before and int(before.group(1)) >= continued > 0
    assert_same(store, reference)
    textspan.open_store(out, verify=True)
    assert not (out / PARTS).exists()


def test_ray_text_encoding_equals_local(cluster, tiny):
    config, checkpoint = tiny
    model, _, tokenizer = textspan.load(config, pretrained=checkpoint, device="cpu")
    texts = textspan.default_pool()[:50]
    local = textspan.encode_texts(model, tokenizer, texts, progress=False)
    distributed_ = ray_engine._encode_texts(
        model,
        tokenizer,
        texts,
        batch_size=8,
        workers=2,
        address=None,
        num_gpus_per_worker=None,
        chunk=16,
        progress=False,
    )
    np.testing.assert_allclose(distributed_, local, atol=1e-6)
    via_api = textspan.encode_texts(
        model, tokenizer, texts, engine=RayEngine(workers=1), progress=False
    )
    np.testing.assert_allclose(via_api, local, atol=1e-6)


def test_without_ray_the_engine_says_how_to_install_it(image_folder, tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'textspan\[ray\]'"):
        textspan.extract(image_folder, tmp_path / "s", engine=RayEngine(), **options(tiny))
    with pytest.raises(ValueError, match=r"engine: expected LocalEngine\(...\) or RayEngine"):
        textspan.extract(image_folder, tmp_path / "s", engine="spark", **options(tiny))


@pytest.mark.slow
def test_the_ray_engine_takes_a_model_known_by_name(cluster, tmp_path):
    from PIL import Image

    from textspan.toy import world as tw

    root = tmp_path / "images"
    root.mkdir()
    for i, image in enumerate(tw.generate(6, seed=1, size=48).images):
        Image.fromarray(image).save(root / f"{i}.png")
    common = {"model": "toy", "batch_size": 3, "dtype": "float32", "progress": False}
    by_ray = textspan.extract(root, tmp_path / "ray", engine=RayEngine(workers=1), **common)
    local = textspan.extract(root, tmp_path / "local", engine=LOCAL, **common)
    np.testing.assert_allclose(by_ray.heads, local.heads, atol=2e-6, rtol=1e-5)
