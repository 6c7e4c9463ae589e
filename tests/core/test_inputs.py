"""Inputs at the edges of what the API takes: accepted where they are plain data in another
form, refused with a message where they are not."""

from __future__ import annotations

import numpy as np
import pytest

import textspan


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((50, 8)), rng.standard_normal((6, 8))


def test_big_endian_arrays_are_read_as_their_values(data):
    x, pool = data
    native = textspan.text_span(x, pool, n_texts=2, rank=4)
    swapped = textspan.text_span(x.astype(">f8"), pool.astype(">f4"), n_texts=2, rank=4)
    assert list(swapped.indices) == list(native.indices)


def test_a_text_pool_takes_float16_as_text_span_does_and_names_what_it_refuses(data):
    _, pool = data
    half = pool.astype(np.float16)
    assert textspan.TextPool(half).dtype == "float32" and len(textspan.TextPool(half)) == 6
    with pytest.raises(textspan.InputError, match=r"got int32 of shape \(6, 8\)"):
        textspan.TextPool(np.zeros((6, 8), np.int32))


def test_statistics_of_no_heads_and_boolean_counts_are_refused(data):
    x, pool = data
    with pytest.raises(textspan.InputError, match=r"at least one head .*got shape \(0, 3\)"):
        textspan.text_span_heads(textspan.HeadStats.zeros(8, (0, 3)), pool, n_texts=2, rank=4)
    with pytest.raises(textspan.InputTypeError, match="expected integers, got True"):
        textspan.text_span(x, pool, n_texts=True, rank=4)
