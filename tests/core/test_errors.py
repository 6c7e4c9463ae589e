"""The exception and warning classes a caller catches or filters by kind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import textspan


def test_a_numerical_failure_is_not_bad_input():
    assert issubclass(textspan.NumericalError, textspan.TextspanError)
    assert issubclass(textspan.NumericalError, ArithmeticError)
    assert not issubclass(textspan.NumericalError, ValueError)
    assert issubclass(textspan.InputError, ValueError)


def test_one_kind_of_warning_is_filtered_and_the_others_still_given():
    rng = np.random.default_rng(0)
    # 30 outputs in a 3-dimensional subspace of D = 8: the span is used up after 3 texts.
    outputs = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 8))
    pool = rng.standard_normal((20, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", textspan.FewerTextsWarning)
        found = textspan.text_span(outputs, pool, n_texts=6, rank=8)
    assert len(found) == 3
    with pytest.warns(textspan.FewerTextsWarning, match="fewer than n_texts=6"):
        textspan.text_span(outputs, pool, n_texts=6, rank=8)
    for kind in (
        textspan.SkippedImagesWarning,
        textspan.RoundingWarning,
        textspan.FewerTextsWarning,
        textspan.DataWarning,
        textspan.SettingWarning,
        textspan.AnalysisWarning,
    ):
        assert issubclass(kind, textspan.TextspanWarning)
