"""The store's one writer, without a model: rows appended here, or written elsewhere as parts
(in any order, any grouping) and absorbed, make the same store; a strict store stops just
before its first unreadable image; the reader refuses what it cannot read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textspan import HeadStats, StoreError, UnreadableImageError, open_store
from textspan.store import Manifest, PartWriter, StoreWriter
from textspan.store.manifest import ROW_KINDS
from textspan.store.writer import PARTS

FILES = 20
UNREADABLE = {5: "image 05.png cannot be read: truncated", 13: "image 13.png cannot be read"}


def manifest(**changes) -> Manifest:
    fields = dict(
        model="toy",
        pretrained=None,
        precision="fp32",
        dtype="float32",
        convention="textspan",
        images="/nowhere",
        layers=2,
        heads=3,
        dim=4,
        terms=("embedding", "layer 0 MLP", "layer 1 MLP"),
        classes=("a", "b"),
        files=tuple(f"{i:02d}.png" for i in range(FILES)),
        labels=tuple(i % 2 for i in range(FILES)),
    )
    return Manifest(**{**fields, **changes})


def decomposed(m: Manifest) -> dict[str, np.ndarray]:
    """A row of every decomposed kind for every file (the unreadable ones' are never used)."""
    rng = np.random.default_rng(0)
    return {
        k.name: rng.normal(size=(m.count, *k.shape(m))).astype(np.float32)
        for k in ROW_KINDS
        if k.decomposed
    }


def batch(rows, indices):
    readable = [i for i in indices if i not in UNREADABLE]
    unreadable = [(i, UNREADABLE[i]) for i in indices if i in UNREADABLE]
    return {k: v[readable] for k, v in rows.items()}, readable, unreadable


def write_here(out, m, rows, batches):
    with StoreWriter.open(out, m) as writer:
        for indices in batches:
            r, readable, unreadable = batch(rows, indices)
            writer.append(r, readable, unreadable=unreadable, upto=max(indices) + 1)
        return writer.finish()


def write_part(out, m, rows, indices, strict=False):
    part = PartWriter(out, m, device="cpu", strict=strict)
    part.add(*batch(rows, indices))
    part.commit()


@pytest.fixture
def reference(tmp_path):
    m = manifest()
    with pytest.warns(UserWarning, match="2 unreadable images skipped"):
        return write_here(tmp_path / "ref", m, decomposed(m), [range(i, i + 6) for i in (0, 6, 12)]
                          + [range(18, 20)])  # fmt: skip


def assert_same(store, reference):
    assert store.files == reference.files
    assert store.skipped == reference.skipped
    for name, a in reference.arrays.items():
        np.testing.assert_array_equal(store.arrays[name], a, err_msg=name)
    np.testing.assert_allclose(store.stats.mean, reference.stats.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        store.stats.covariance, reference.stats.covariance, rtol=1e-10, atol=1e-12
    )


def test_the_reference_holds_a_row_per_readable_image_and_their_statistics(reference):
    assert len(reference) == FILES - len(UNREADABLE)
    assert set(reference.skipped) == {f"{i:02d}.png" for i in UNREADABLE}
    direct = HeadStats.from_outputs(np.asarray(reference.heads, dtype=np.float64))
    np.testing.assert_allclose(reference.stats.covariance, direct.covariance, atol=1e-12)
    open_store(reference.path, verify=True)


@pytest.mark.parametrize(
    "groups",
    [
        [range(0, 7), range(7, 10), range(10, 20)],
        [range(10, 20), range(0, 10)],  # written in another order
        [range(0, 20, 2), range(1, 20, 2)],  # interleaved, as WebDataset samples come
        [[i] for i in range(20)][::-1],
    ],
    ids=["ranges", "reversed", "interleaved", "one-by-one"],
)
def test_parts_in_any_order_and_grouping_make_the_same_store(reference, tmp_path, groups):
    m = manifest()
    rows = decomposed(m)
    out = tmp_path / "s"
    with StoreWriter.open(out, m) as writer:
        for g in groups:
            write_part(out, m, rows, list(g))
        writer.absorb()
        assert writer.files == FILES and not any((out / PARTS).iterdir())
        with pytest.warns(UserWarning, match="2 unreadable"):
            store = writer.finish()
    assert_same(store, reference)
    open_store(out, verify=True)


def test_a_store_begun_here_is_finished_from_parts_and_the_reverse(reference, tmp_path):
    m = manifest()
    rows = decomposed(m)
    # Begun here (8 files, checkpointed), stopped; the rest arrive as parts.
    out = tmp_path / "here-then-parts"
    with StoreWriter.open(out, m) as writer:
        r, readable, unreadable = batch(rows, range(8))
        writer.append(r, readable, unreadable=unreadable, upto=8)
        writer.checkpoint()
    write_part(out, m, rows, list(range(8, 14)))
    write_part(out, m, rows, list(range(14, 20)))
    with StoreWriter.open(out, m) as writer:
        assert writer.pending(4) == []
        writer.absorb()
        with pytest.warns(UserWarning):
            assert_same(writer.finish(), reference)
    # Begun as parts with a gap; the writer absorbs the part that continues it, and says
    # what is left to do.
    out = tmp_path / "parts-then-here"
    with StoreWriter.open(out, m):
        pass
    write_part(out, m, rows, list(range(0, 6)))
    write_part(out, m, rows, list(range(12, 20)))
    with StoreWriter.open(out, m) as writer:
        writer.absorb()
        assert (writer.rows, writer.files) == (5, 6)
        assert writer.pending(4) == [(6, 10), (10, 12)]
        r, readable, unreadable = batch(rows, range(6, 20))
        writer.append(r, readable, unreadable=unreadable, upto=20)
        with pytest.warns(UserWarning):
            store = writer.finish()
    assert_same(store, reference)
    assert not (out / PARTS).exists()


def test_an_interruption_between_absorbing_and_removing_parts_loses_and_repeats_nothing(
    reference, tmp_path, monkeypatch
):
    m = manifest()
    rows = decomposed(m)
    out = tmp_path / "s"
    with StoreWriter.open(out, m):
        pass
    write_part(out, m, rows, list(range(0, 10)))
    write_part(out, m, rows, list(range(10, 20)))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with StoreWriter.open(out, m) as writer:
        monkeypatch.setattr("textspan.store.writer.shutil.rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            writer.absorb()  # checkpointed, then stopped before a part was removed
        monkeypatch.undo()
    assert json.loads((out / "progress.json").read_text())["files_done"] == FILES
    with StoreWriter.open(out, m) as writer:
        writer.absorb()  # the parts behind the checkpoint are removed, not absorbed again
        assert writer.rows == FILES - len(UNREADABLE)
        with pytest.warns(UserWarning):
            assert_same(writer.finish(), reference)


def test_strict_stops_just_before_the_first_unreadable_image_and_resumes(reference, tmp_path):
    m = manifest()
    rows = decomposed(m)
    out = tmp_path / "s"
    with StoreWriter.open(out, m):
        pass
    for g in (range(0, 4), range(4, 10), range(10, 20)):
        write_part(out, m, rows, list(g), strict=True)
    with StoreWriter.open(out, m) as writer:
        with pytest.raises(UnreadableImageError, match=r"05\.png cannot be read.*the 5 images"):
            writer.absorb(strict=True)
        assert (writer.rows, writer.files) == (5, 5)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["failed"] == "05.png" and progress["skipped"] == {}
    # The parts absorbed are gone, and those holding an unreadable image (a rerun reads
    # them again: it may have been repaired).
    assert not any((out / PARTS).iterdir())
    # 05.png removed: the rerun records it as skipped and goes on from the file after it.
    files = tuple(f for f in m.files if f != "05.png")
    smaller = manifest(files=files, labels=tuple(m.labels[i] for i in range(FILES) if i != 5))
    with StoreWriter.open(out, smaller) as writer:
        assert writer.files == 6 and "05.png" in writer.skipped
        assert writer.manifest.files == m.files  # the store's own listing governs


def test_a_store_of_another_version_or_with_a_corrupt_manifest_is_named(reference, tmp_path):
    data = json.loads((reference.path / "manifest.json").read_text())
    (reference.path / "manifest.json").write_text(json.dumps({**data, "version": 1}))
    with pytest.raises(StoreError, match="version 1, expected 2"):
        open_store(reference.path)
    (reference.path / "manifest.json").write_text(json.dumps({**data, "layers": "two"}))
    with pytest.raises(StoreError, match="expected 'layers' to be a int, got 'two'"):
        open_store(reference.path)


def test_resuming_with_other_arguments_is_refused_naming_them(reference, tmp_path):
    with pytest.raises(StoreError, match=r"dtype: 'float32' there, 'float16' now"):
        StoreWriter.open(reference.path, manifest(dtype="float16"))


def test_resuming_after_the_metadata_changed_a_per_image_field_is_refused(tmp_path):
    places = tuple(i % 2 for i in range(FILES))
    m = manifest(attributes={"place": places})
    out = tmp_path / "s"
    with StoreWriter.open(out, m):
        pass
    flipped = tuple(1 - p if i in (3, 7) else p for i, p in enumerate(places))
    with pytest.raises(StoreError, match=r"given another 'place' \(2, e\.g\. 03\.png"):
        StoreWriter.open(out, manifest(attributes={"place": flipped}))
    with StoreWriter.open(out, m) as writer:  # the same metadata resumes
        assert writer.files == 0
