"""Metrics against scipy and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from probekd.evaluate import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    mean_ci,
    normalized_entropy,
)


def test_bootstrap_matches_scipy_percentile_interval() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.6).astype(float)
    mean, lo, hi = bootstrap_ci(x, n_boot=4000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    assert lo < mean < hi


def test_ece_hand_value() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    answers = np.array([0, 1, 0, 1])
    # bins (15 equal-width): 0.9 -> bin 13 (acc 0.5, conf 0.9), 0.6 -> bin 9 (1, 0.6), 0.7 -> bin 10 (1, 0.7)
    expected = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.6) + 0.25 * abs(1 - 0.7)
    assert expected_calibration_error(probs, answers) == pytest.approx(expected)


def test_classification_metrics_agreement_and_unlabelled_rows() -> None:
    probs = np.array([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]])
    answers = np.array([0, 0, 2, -1])
    m = classification_metrics(probs, answers, {"teacher": np.array([0, 1, 1, 0]), "probe": probs})
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["agreement_teacher"] == pytest.approx(2 / 3) and m["agreement_probe"] == 1.0
    assert m["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.3) + np.log(0.8)) / 3)


def test_mean_ci_is_the_t_interval() -> None:
    x = [0.61, 0.64, 0.58, 0.66]
    mean, half = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and half == pytest.approx((hi - lo) / 2)
    assert np.isnan(mean_ci([0.5])[1])


def test_normalized_entropy_against_scipy() -> None:
    """Entropy over each question's own options, divided by ln K: 1 for uniform, 0 for certain; masked options and
    one-option questions take no part."""
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3, 0.0], [1.0, 0, 0, 0], [0.7, 0.2, 0.1, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    want = np.mean([1.0, 1.0, 0.0, stats.entropy([0.7, 0.2, 0.1]) / np.log(3)])
    assert normalized_entropy(probs, mask) == pytest.approx(want)
    one = np.array([[1, 0, 0, 0]], dtype=bool)
    assert normalized_entropy(np.vstack([probs, [[1.0, 0, 0, 0]]]), np.vstack([mask, one])) == pytest.approx(want)
    assert np.isnan(normalized_entropy(np.array([[1.0, 0.0]]), np.array([[True, False]])))
