"""Soft targets: the data type and its checks, nested labelled subsets, and no leakage end to end (a training
row's probe or calibrated-teacher target never depends on its own label)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probekd.errors import ProbekdError
from probekd.probes.pipeline import ProbeConfig, load_inputs
from probekd.targets import SoftTargets, from_logits, hard_targets, labelled_subset, signal_targets


def test_soft_targets_roundtrip_and_align(tmp_path: Path) -> None:
    mask = np.array([[True, True, False], [True, True, True]])
    t = from_logits(["a", "b"], np.array([[0.0, 1.0, -np.inf], [1.0, 1.0, 1.0]]), mask, "teacher", 2.0)
    assert t.probs[0].tolist() == pytest.approx([1 / (1 + np.exp(0.5)), 1 / (1 + np.exp(-0.5)), 0.0])
    t.save(tmp_path / "t.npz")
    back = SoftTargets.load(tmp_path / "t.npz")
    assert back.ids == ["a", "b"] and back.source == "teacher" and back.meta == {"temperature": 2.0}
    np.testing.assert_array_equal(back.probs, t.probs)
    np.testing.assert_array_equal(back.align(["b", "a"], mask[::-1]), t.probs[::-1])
    with pytest.raises(ProbekdError, match=r"no row for 1 example\(s\), e.g. \['c'\]"):
        back.align(["a", "c"], mask)
    with pytest.raises(ProbekdError, match="K=3 options, the task has K=4"):
        back.align(["a"], np.ones((1, 4), dtype=bool))
    with pytest.raises(ProbekdError, match="disagree on the options of 'a'"):
        back.align(["a"], np.ones((1, 3), dtype=bool))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ProbekdError, match="is not a soft-target file"):
        SoftTargets.load(tmp_path / "bad.npz")


def test_soft_targets_reject_non_distributions() -> None:
    mask = np.ones((1, 2), dtype=bool)
    with pytest.raises(ProbekdError, match="row 'x' is not a distribution"):
        SoftTargets(["x"], np.array([[0.7, 0.7]]), mask, "probe")
    with pytest.raises(ProbekdError, match="row 'x' is not a distribution"):
        SoftTargets(["x"], np.array([[0.5, 0.5]]), np.array([[True, False]]), "probe")  # mass on a missing option
    with pytest.raises(ProbekdError, match="duplicate"):
        SoftTargets(["x", "x"], np.full((2, 2), 0.5), np.ones((2, 2), dtype=bool), "probe")
    h = hard_targets(["a", "b", "c"], np.array([1, -1, 0]), np.ones((3, 2), dtype=bool))
    assert h.ids == ["a", "c"] and h.probs.tolist() == [[0, 1], [1, 0]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(0, 3))
def test_labelled_subsets_are_nested_and_seeded(n: int, seed: int) -> None:
    ids = [f"id{i}" for i in range(n)]
    subsets = [labelled_subset(ids, f, seed) for f in (0.05, 0.25, 0.5, 1.0)]
    for small, big in itertools.pairwise(subsets):
        assert not (small & ~big).any()  # nested
    assert [int(s.sum()) for s in subsets] == [int(np.ceil(f * n - 1e-9)) for f in (0.05, 0.25, 0.5, 1.0)]
    assert (labelled_subset(ids[::-1], 0.5, seed)[::-1] == subsets[2]).all()  # a function of the ids, not order
    if n >= 20:
        assert (labelled_subset(ids, 0.5, seed + 10) != subsets[2]).any()


def test_fraction_must_be_valid() -> None:
    with pytest.raises(ProbekdError, match=r"in \(0, 1\]"):
        labelled_subset(["a"], 0.0, 0)


@pytest.mark.parametrize("signal", ["probe", "teacher_calibrated"])
def test_targets_never_come_from_a_model_that_saw_the_label(tiny_run: Path, signal: str) -> None:
    cfg = ProbeConfig(l2_grid=[0.01, 0.1], max_iter=50)
    caches, _, layer_idx = load_inputs(tiny_run, cfg)
    train = caches["train"]
    labelled = np.ones(len(train.ids), dtype=bool)
    labelled[-5:] = False  # an unlabelled pool
    base = signal_targets(signal, caches, labelled, cfg, layer_idx)["train"]
    i = 3
    answers = train.answers.copy()
    answers[i] = (answers[i] + 1) % int(train.mask[i].sum())
    flipped = dict(caches, train=dataclasses.replace(train, answers=answers))
    moved = signal_targets(signal, flipped, labelled, cfg, layer_idx)["train"]
    from probekd.probes.crossfit import fold_ids

    folds = fold_ids([x for x, lab in zip(train.ids, labelled, strict=True) if lab], cfg.n_folds, cfg.seed)
    same_fold = np.flatnonzero(folds == folds[i])
    # The row's logits come from probes fitted without its fold; only the dev-fitted temperature (one scalar for
    # all rows, from the full-data probe) may move. So the logits T * log p, up to a per-row constant, are unmoved.
    assert moved.meta.get("layer") == base.meta.get("layer")

    def logits(t: SoftTargets) -> np.ndarray:
        lp = np.log(np.where(t.mask, t.probs, 1.0))
        return t.meta["temperature"] * (lp - lp[:, :1]) * t.mask

    np.testing.assert_allclose(logits(moved)[same_fold], logits(base)[same_fold], atol=1e-4)
    others = np.setdiff1d(np.flatnonzero(labelled), same_fold)
    assert np.abs(logits(moved)[others] - logits(base)[others]).max() > 1e-4  # they trained on the flipped label
    assert np.abs(logits(moved)[-5:] - logits(base)[-5:]).max() > 1e-4  # so did the pool's full-data model
    assert base.meta["dev_accuracy"] >= 0 and base.source == signal


def test_hard_and_teacher_signals(tiny_run: Path) -> None:
    cfg = ProbeConfig()
    caches, _, layer_idx = load_inputs(tiny_run, cfg)
    train = caches["train"]
    labelled = labelled_subset(train.ids, 0.5, 0)
    hard = signal_targets("hard", caches, labelled, cfg, layer_idx)
    assert list(hard) == ["train"] and len(hard["train"].ids) == int(labelled.sum())
    teacher = signal_targets("teacher", caches, labelled, cfg, layer_idx, teacher_temperature=2.0)["test"]
    test = caches["test"]
    expected = np.exp(test.scores / 2.0 - (test.scores / 2.0).max(1, keepdims=True)) * test.mask
    np.testing.assert_allclose(
        teacher.probs[:, : test.mask.shape[1]], expected / expected.sum(1, keepdims=True), rtol=1e-5
    )
    with pytest.raises(ProbekdError, match="unknown signal 'logits'"):
        signal_targets("logits", caches, labelled, cfg, layer_idx)
