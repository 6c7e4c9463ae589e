"""The toy world's ground truth: deterministic, exact masks, captions that say what is there,
and correlations of the strength asked for."""

from __future__ import annotations

import numpy as np
import pytest

from textspan.toy import world as tw


def test_a_seed_gives_the_same_world():
    a, b = tw.generate(20, seed=3), tw.generate(20, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, tw.generate(20, seed=4).images)


@pytest.mark.parametrize("objects", [1, 2])
def test_masks_are_exactly_the_object_pixels(objects):
    w = tw.generate(40, seed=1, size=48, objects=objects)
    colours = np.array(list(tw.COLOURS.values()))
    for i in range(len(w)):
        for k in range(objects):
            mask = w.object_masks[i, k]
            assert mask.any(), "every object is visible"
            colour = colours[w.factors["colour"][i, k]]
            assert (w.images[i][mask] == colour).all()
            # Inside its quadrant.
            rows, cols = np.nonzero(mask)
            top, left = divmod(int(w.factors["position"][i, k]), 2)
            assert ((rows < 24) if top == 0 else (rows >= 24)).all()
            assert ((cols < 24) if left == 0 else (cols >= 24)).all()
        outside = ~w.masks[i]
        assert not (w.images[i][outside][:, None] == colours[None]).all(-1).any()


def test_captions_name_what_is_there():
    w = tw.generate(200, seed=2)
    for i, (short, full) in enumerate(zip(w.captions, w.full_captions, strict=True)):
        names = {f: w.names(f)[i] for f in tw.FACTORS}
        assert full.startswith(("a ", "an ")) and all(v in full for v in names.values())
        words = set(short.replace(" background", "").split())
        mentioned = [f for f, v in names.items() if set(v.split()) <= words]
        assert mentioned, short  # at least one factor is named
    named = np.mean([len(c.split()) for c in w.captions])
    assert named < np.mean([len(c.split()) for c in w.full_captions])


def test_correlated_training_and_balanced_test_groups():
    pair = tw.Correlation("shape", "background", {"circle": "grass", "triangle": "water"}, 0.9)
    w = tw.generate(3000, seed=5, correlation=pair)
    shape, background = w.names("shape"), w.names("background")
    assert np.mean(background[shape == "circle"] == "grass") == pytest.approx(0.925, abs=0.03)
    assert np.mean(background[shape == "square"] == "grass") == pytest.approx(0.25, abs=0.05)
    test = tw.balanced_groups(15, pair, seed=1)
    groups = list(zip(test.names("shape"), test.names("background"), strict=True))
    assert {g: groups.count(g) for g in set(groups)} == {
        (s, b): 15 for s in ("circle", "triangle") for b in ("grass", "water")
    }


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="1 or 2 objects expected"):
        tw.generate(5, objects=3)
    with pytest.raises(ValueError, match="expected factors among"):
        tw.Correlation("hue", "background", {})
    with pytest.raises(ValueError, match="'star' → 'grass' is not a shape → background pair"):
        tw.Correlation("shape", "background", {"star": "grass"})
