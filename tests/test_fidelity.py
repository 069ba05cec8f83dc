"""Fidelity metrics (`probekd.fidelity`): golden values by hand and from scipy, and properties (the report's
columns are tested in test_report.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import entropy

from probekd.evaluate import option_softmax
from probekd.fidelity import fidelity

STUDENT = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
REFERENCE = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.9, 0.0], [0.1, 0.1, 0.8]])
MASK = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=bool)
ANSWERS = np.array([0, 0, 1, -1])  # the last question has no gold answer: left out


def test_golden_values_by_hand_and_scipy() -> None:
    f = fidelity(STUDENT, REFERENCE, ANSWERS, MASK)
    # top options: student 0, 1, 0; reference 0, 2, 1 -> they agree on question 0 only
    assert f["agreement"] == pytest.approx(1 / 3)
    # both wrong on question 1 only (gold 0; student 1, reference 2): different wrong options
    assert f["wrong_fidelity"] == 0.0
    expected = np.mean([entropy(REFERENCE[i, MASK[i]], STUDENT[i, MASK[i]]) for i in range(3)])
    assert f["kl"] == pytest.approx(expected) and f["kl"] == pytest.approx(0.244002, abs=1e-6)


def test_same_wrong_choice_counts_and_nan_without_shared_errors() -> None:
    ref = REFERENCE.copy()
    ref[1] = [0.2, 0.7, 0.1]  # now the reference makes the student's mistake on question 1
    assert fidelity(STUDENT, ref, ANSWERS, MASK)["wrong_fidelity"] == 1.0
    gold = np.array([0, 1, 1, -1])  # question 1 is now right for both: no question is wrong for both
    assert np.isnan(fidelity(STUDENT, ref, gold, MASK)["wrong_fidelity"])
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(STUDENT[:, :2], REFERENCE, ANSWERS, MASK)


def test_option_softmax_is_a_softmax_over_the_valid_options() -> None:
    scores = np.array([[1.0, 2.0, 99.0], [0.0, np.log(3.0), 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)
    p = option_softmax(scores, mask)
    e = np.exp(1.0)
    np.testing.assert_allclose(p, [[1 / (1 + e), e / (1 + e), 0.0], [0.2, 0.6, 0.2]])


@given(arrays(np.float64, (6, 4), elements=st.floats(-5, 5)), st.integers(0, 2**31 - 1))
def test_a_student_is_fully_faithful_to_itself(logits: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.ones((6, 4), dtype=bool)
    mask[:, 3] = rng.random(6) < 0.5
    p = option_softmax(logits, mask)
    answers = rng.integers(0, 3, 6)
    f = fidelity(p, p, answers, mask)
    assert f["agreement"] == 1.0 and f["kl"] == pytest.approx(0.0, abs=1e-9)
    assert f["wrong_fidelity"] == 1.0 or np.isnan(f["wrong_fidelity"])
    other = option_softmax(logits[::-1].copy(), mask[::-1].copy())
    assert fidelity(p, other, answers, mask)["kl"] >= -1e-12  # a KL is never negative
