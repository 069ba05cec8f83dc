"""Which training questions are labelled (`probekd.selection`): farthest-first traversal by hand, PCoreSet subsets
nested, deterministic, label-free and within twice the best covering radius (the greedy k-center guarantee)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from probekd.errors import ProbekdError
from probekd.selection import farthest_first_order, pcoreset_subset


def test_farthest_first_by_hand() -> None:
    # points on a line at 0, 1, 2, 10, 11. From 0: 11 is farthest; then the nearest chosen point is 1 away for 1
    # and 10, 2 away for 2: 2; then 1 and 10 tie at 1: the lower index (1), then 10.
    pts = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert farthest_first_order(pts, 0).tolist() == [0, 4, 2, 1, 3]
    # from 10: 0 is farthest; then 2 (2 away from 0), then 1 and 11 tie at 1: 1, then 11
    assert farthest_first_order(pts, 3).tolist() == [3, 0, 2, 1, 4]


def _radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """The covering radius: the largest distance from a point to its nearest chosen point."""
    d = np.linalg.norm(points[:, None, :] - points[None, chosen, :], axis=-1)
    return float(d.min(1).max())


def _probs(raw: np.ndarray) -> np.ndarray:
    e = np.exp(raw - raw.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (30, 4), elements=st.floats(-4, 4)), st.integers(0, 1000), st.sampled_from([0.1, 0.25, 0.5]))
def test_pcoreset_is_within_twice_the_covering_radius_of_any_subset_of_its_size(
    raw: np.ndarray, seed: int, fraction: float
) -> None:
    probs = _probs(raw)
    ids = [f"q{i}" for i in range(30)]
    keep = pcoreset_subset(ids, probs, fraction, seed)
    n = int(np.ceil(fraction * 30 - 1e-9))
    assert keep.sum() == n
    rng = np.random.default_rng(seed)
    for _ in range(5):  # the greedy radius is at most twice the optimum, so at most twice any subset's
        other = rng.choice(30, size=n, replace=False)
        assert _radius(probs, np.flatnonzero(keep)) <= 2 * _radius(probs, other) + 1e-9


def test_pcoreset_subsets_are_nested_deterministic_and_need_no_labels() -> None:
    rng = np.random.default_rng(0)
    probs = _probs(rng.normal(size=(200, 4)))
    ids = [f"arc/{i}" for i in range(200)]
    subsets = [pcoreset_subset(ids, probs, f, seed=3) for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
    for small, big in itertools.pairwise(subsets):
        assert not (small & ~big).any()  # nested
    assert subsets[-1].all() and subsets[0].sum() == 10
    assert (pcoreset_subset(ids, probs, 0.1, seed=3) == subsets[1]).all()  # deterministic
    assert (pcoreset_subset(ids, probs, 0.1, seed=4) != subsets[1]).any()  # the seed picks the start
    # the start is drawn from the ids, so reordering the rows selects the same questions
    perm = rng.permutation(200)
    again = pcoreset_subset([ids[i] for i in perm], probs[perm], 0.1, seed=3)
    assert sorted(np.array(ids)[perm][again]) == sorted(np.array(ids)[subsets[1]])
    with pytest.raises(ProbekdError, match=r"in \(0, 1\]"):
        pcoreset_subset(ids, probs, 0.0, 0)
    with pytest.raises(ProbekdError, match="200 ids but 3 probability rows"):
        pcoreset_subset(ids, probs[:3], 0.5, 0)
