"""Patch-map reductions and segmentation metrics (Rust) against direct NumPy, PyTorch and
scikit-learn computations; zero-shot segmentation on a random open_clip model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import textspan
from textspan import Decomposer, class_heatmaps, normalised_heatmaps, segmentation_scores


def bilinear_numpy(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling, written out: columns first, then rows."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.where(i0 + 1 < n_in, i0 + 1, i0)
        return i0, i1, src - i0

    c0, c1, tc = taps(maps.shape[2], width)
    r0, r1, tr = taps(maps.shape[1], height)
    columns = maps[:, :, c0] * (1.0 - tc) + maps[:, :, c1] * tc
    return columns[:, r0] * (1.0 - tr)[:, None] + columns[:, r1] * tr[:, None]


def normalise_numpy(up: np.ndarray) -> np.ndarray:
    up = np.where(up > 0, up, 0.0)
    lo = up.min((1, 2), keepdims=True)
    span = up.max((1, 2), keepdims=True) - lo
    return np.where(span > 0, (up - lo) / np.where(span > 0, span, 1), 0.0)


def scores_numpy(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The protocol, image by image, with scikit-learn's average precision."""
    s = normalise_numpy(bilinear_numpy(maps, *masks.shape[1:]))
    correct = pixels = 0
    inter, union = np.zeros(2), np.zeros(2)
    aps = []
    for heat, mask in zip(s, masks.astype(bool), strict=True):
        predicted = heat > heat.mean()
        correct += (predicted == mask).sum()
        pixels += mask.size
        for k, (p, t) in enumerate([(~predicted, ~mask), (predicted, mask)]):
            inter[k] += (p & t).sum()
            union[k] += (p | t).sum()
        truth = np.concatenate([~mask.ravel(), mask.ravel()])
        aps.append(average_precision_score(truth, np.concatenate([1 - heat.ravel(), heat.ravel()])))
    iou = inter / (np.finfo(np.float64).eps + union)
    return {"pixel_accuracy": correct / pixels, "miou": iou.mean(), "map": float(np.mean(aps))}


@pytest.mark.parametrize("seed", range(6))
def test_normalised_heatmaps_equal_pytorch_bilinear_then_clip_and_min_max(seed):
    rng = np.random.default_rng(seed)
    n, h, w = rng.integers(1, 5), rng.integers(1, 17), rng.integers(1, 17)
    height, width = rng.integers(h, 80), rng.integers(w, 80)
    maps = rng.standard_normal((n, h, w))
    got = normalised_heatmaps(maps, (height, width))
    up = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[:, None], size=(height, width), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(got, normalise_numpy(up), atol=1e-12)
    assert got.shape == (n, height, width)


@pytest.mark.parametrize("seed", range(8))
def test_segmentation_scores_equal_numpy_and_scikit_learn(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 7))
    h, w = (int(v) for v in rng.integers(2, 17, 2))
    size = (int(rng.integers(h, 60)), int(rng.integers(w, 60)))
    maps = rng.standard_normal((n, h, w))
    if seed % 2:  # coarse values: many ties within and across the two channels
        maps = np.round(maps * 2) / 2
    density = rng.uniform(0.05, 0.9)
    masks = rng.random((n, *size)) < density
    got = segmentation_scores(maps, masks)
    expected = scores_numpy(maps, masks)
    for key in ("pixel_accuracy", "miou", "map"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_metrics_do_not_depend_on_the_number_of_threads():
    rng = np.random.default_rng(7)
    maps, masks = rng.standard_normal((24, 8, 8)), rng.random((24, 40, 40)) < 0.4
    before = textspan.get_num_threads()
    try:
        textspan.set_num_threads(1)
        one = segmentation_scores(maps, masks)
        textspan.set_num_threads(2)
        two = segmentation_scores(maps, masks)
    finally:
        textspan.set_num_threads(before)
    assert one == two


def test_class_heatmaps_subtract_the_mean_class():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((5, 12, 7)).astype(np.float32)
    classes = rng.integers(0, 7, 5)
    expected = scores[np.arange(5), :, classes] - scores.astype(np.float64).mean(-1)
    np.testing.assert_allclose(class_heatmaps(scores, classes), expected, atol=1e-6)


def test_bad_inputs_are_named():
    maps, masks = np.zeros((2, 4, 4)), np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"same number N >= 1 of images.*\[2, 4, 4\].*\[1, 8, 8\]"):
        segmentation_scores(maps, masks[:1])
    bad = masks.copy()
    bad[1, 2, 3] = 2
    with pytest.raises(ValueError, match=r"binary masks \(values 0 and 1\), got values 0, 2"):
        segmentation_scores(maps, bad)
    with pytest.raises(ValueError, match=r"masks: expected shape \[N, H, W\], got \[8, 8\]"):
        segmentation_scores(maps, masks[0])
    nan = maps.copy()
    nan[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match=r"heatmaps: expected finite values.*\[1, 0, 2\]"):
        segmentation_scores(nan, masks)
    with pytest.raises(ValueError, match=r"heatmaps: expected shape \[N, h, w\]"):
        normalised_heatmaps(np.zeros((4, 4)), (8, 8))
    with pytest.raises(ValueError, match=r"classes\[1\]: expected a class index in 0..3, got 3"):
        class_heatmaps(np.zeros((2, 4, 3), np.float32), [0, 3])


TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_model():
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY).eval()


def test_segment_scores_patches_against_the_class_minus_the_mean_class(tiny_model):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    classifier = np.random.default_rng(5).standard_normal((32, 6)).astype(np.float32)
    result = textspan.segment(tiny_model, images, classifier, progress=False)
    assert result.heatmaps.shape == (5, 4, 4) and result.image_size == (32, 32)
    with Decomposer(tiny_model) as d:
        parts = d.decompose(images, spatial=True)
    predicted = (parts.representation.numpy() @ classifier).argmax(-1)
    np.testing.assert_array_equal(result.classes, predicted)
    per_class = parts.scores(torch.from_numpy(classifier.T)).sum((1, 3))[:, 1:].numpy()
    expected = per_class[np.arange(5), :, predicted] - per_class.mean(-1)
    np.testing.assert_allclose(result.heatmaps.reshape(5, -1), expected, atol=1e-4, rtol=1e-4)
    masks = result.masks()
    assert masks.shape == (5, 32, 32) and masks.dtype == bool
    given = textspan.segment(
        tiny_model, images, classifier, classes=[0, 1, 2, 3, 4], progress=False
    )
    np.testing.assert_array_equal(given.classes, [0, 1, 2, 3, 4])
    attention = textspan.segment(tiny_model, images, classifier, method="attention", progress=False)
    last = parts.class_attention(-1)[:, :, 1:].mean(1).numpy().reshape(5, 4, 4)
    np.testing.assert_allclose(attention.heatmaps, last, atol=1e-6)
    with pytest.raises(ValueError, match=r"classes: expected one per image \(5\), got 4"):
        textspan.segment(tiny_model, images, classifier, classes=[0, 1, 2, 3], progress=False)
    with pytest.raises(ValueError, match=r"classifier: expected shape \[32, C\], got \[6, 32\]"):
        textspan.segment(tiny_model, images, classifier.T, progress=False)
