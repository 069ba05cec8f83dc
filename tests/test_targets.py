"""Soft targets: the data type and its checks, nested labelled and dev subsets, no leakage end to end (a training
row's probe or calibrated-teacher target never depends on its own label), dev labels outside a cell's subset never
matter, label smoothing matched to the probe's entropy, a calibrated teacher at least as accurate as the raw one."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probekd.errors import ProbekdError
from probekd.evaluate import normalized_entropy
from probekd.probes.pipeline import ProbeConfig, load_inputs
from probekd.probes.score_calibration import calibrate_scores
from probekd.targets import (
    SoftTargets,
    dev_subset,
    from_logits,
    hard_targets,
    labelled_subset,
    signal_targets,
    smoothed_targets,
    smoothing_for_entropy,
)


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
    assert moved.meta.get("calibration") == base.meta.get("calibration")

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


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 80), st.integers(0, 3), st.integers(0, 30))
def test_dev_subsets_are_nested_deterministic_and_at_least_the_minimum(n: int, seed: int, minimum: int) -> None:
    ids = [f"dev{i}" for i in range(n)]
    fractions = (0.05, 0.1, 0.25, 0.5, 1.0)
    subsets = [dev_subset(ids, f, seed, minimum) for f in fractions]
    for small, big in itertools.pairwise(subsets):
        assert not (small & ~big).any()  # nested
    want = [min(n, max(int(np.ceil(f * n - 1e-9)), minimum)) for f in fractions]
    assert [int(s.sum()) for s in subsets] == want
    assert all((dev_subset(ids, f, seed, minimum) == s).all() for f, s in zip(fractions, subsets, strict=True))
    assert (dev_subset(ids[::-1], 0.25, seed, minimum)[::-1] == subsets[2]).all()  # a function of the ids
    if minimum == 0:  # the same rule as the training subset
        assert all((labelled_subset(ids, f, seed) == s).all() for f, s in zip(fractions, subsets, strict=True))
    if n >= 40 and minimum <= 10:
        assert (dev_subset(ids, 0.5, seed + 10, minimum) != subsets[3]).any()


def test_smoothed_targets_are_distributions_with_the_stated_entropy() -> None:
    mask = np.array([[True, True, True, True], [True, True, True, False], [True, True, False, False]])
    answers = np.array([2, 0, 1])
    t = smoothed_targets(["a", "b", "c"], answers, mask, 0.3)
    np.testing.assert_allclose(t.probs.sum(1), 1.0, rtol=1e-6)
    assert t.probs[0].tolist() == pytest.approx([0.075, 0.075, 0.775, 0.075])
    assert t.probs[2].tolist() == pytest.approx([0.15, 0.85, 0, 0]) and t.meta["smoothing"] == 0.3
    for want in (0.05, 0.5, 0.7091, 0.99):
        eps = smoothing_for_entropy(mask, want)
        got = normalized_entropy(smoothed_targets(["a", "b", "c"], answers, mask, eps).probs, mask)
        assert got == pytest.approx(want, abs=1e-5)
    assert smoothing_for_entropy(mask, 0.0) == 0.0 and smoothing_for_entropy(mask, 1.0) == 1.0
    with pytest.raises(ProbekdError, match=r"smoothing weight must be in \[0, 1\]"):
        smoothed_targets(["a"], np.array([0]), mask[:1], 1.5)


def test_smoothed_signal_is_as_soft_as_the_probe_and_always_right(tiny_run: Path) -> None:
    """`match_probe`: the smoothed targets' mean normalized entropy on the labelled rows is the probe targets' of the
    same labels (given, or fitted inside); a fixed weight is used as given. Every signal records its targets'
    accuracy and entropy on the labelled training rows."""
    cfg = ProbeConfig(l2_grid=[0.01, 0.1], max_iter=50)
    caches, _, layer_idx = load_inputs(tiny_run, cfg)
    train = caches["train"]
    labelled = labelled_subset(train.ids, 0.5, 0)
    probe = signal_targets("probe", caches, labelled, cfg, layer_idx)["train"]
    given_probe = signal_targets("smoothed", caches, labelled, cfg, layer_idx, probe_targets=probe)["train"]
    fitted_inside = signal_targets("smoothed", caches, labelled, cfg, layer_idx)["train"]
    for smoothed in (given_probe, fitted_inside):
        assert smoothed.source == "smoothed" and len(smoothed.ids) == int(labelled.sum())
        np.testing.assert_allclose(smoothed.probs.sum(1), 1.0, rtol=1e-6)
        assert smoothed.meta["target_entropy"] == pytest.approx(probe.meta["target_entropy"], abs=2e-4)
        assert smoothed.meta["matched_entropy"] == probe.meta["target_entropy"]
        assert smoothed.meta["target_accuracy"] == 1.0 and 0 < smoothed.meta["smoothing"] < 1
    fixed = signal_targets("smoothed", caches, labelled, cfg, layer_idx, smoothing=0.2)["train"]
    assert fixed.meta["smoothing"] == 0.2 and fixed.meta["smoothing_rule"] == "fixed"
    for signal in ("hard", "teacher", "teacher_calibrated"):
        meta = signal_targets(signal, caches, labelled, cfg, layer_idx)["train"].meta
        assert 0 <= meta["target_accuracy"] <= 1 and 0 <= meta["target_entropy"] <= 1, signal
    assert 0 <= probe.meta["target_accuracy"] <= 1


@pytest.mark.parametrize("signal", ["probe", "teacher_calibrated"])
def test_dev_labels_outside_the_cells_subset_change_nothing(tiny_run: Path, signal: str) -> None:
    """What a cell selects on dev (the probe's layer and temperature, the calibration) reads its dev subset only:
    other dev labels may change without moving its targets; the subset's own labels do move them."""
    cfg = ProbeConfig(l2_grid=[0.01, 0.1], max_iter=50)
    caches, _, layer_idx = load_inputs(tiny_run, cfg)
    labelled = labelled_subset(caches["train"].ids, 1.0, 0)
    dev = caches["dev"]
    subset = dev_subset(dev.ids, 0.5, 0)
    base = signal_targets(signal, caches, labelled, cfg, layer_idx, dev_labelled=subset)["train"]
    answers = dev.answers.copy()
    k = dev.mask.sum(1)
    answers[~subset] = (answers[~subset] + 1) % k[~subset]
    other = dict(caches, dev=dataclasses.replace(dev, answers=answers))
    same = signal_targets(signal, other, labelled, cfg, layer_idx, dev_labelled=subset)["train"]
    np.testing.assert_array_equal(same.probs, base.probs)
    assert same.meta == base.meta
    answers = dev.answers.copy()
    answers[subset] = (answers[subset] + 1) % k[subset]
    inside = dict(caches, dev=dataclasses.replace(dev, answers=answers))
    moved = signal_targets(signal, inside, labelled, cfg, layer_idx, dev_labelled=subset)["train"]
    assert moved.meta["dev_accuracy"] != base.meta["dev_accuracy"]


def test_calibrated_teacher_is_at_least_as_accurate_as_the_raw_one_on_dev() -> None:
    """A weak, over-confident teacher: calibration keeps its argmax (temperature only, whose dev accuracy is the raw
    teacher's) unless position biases are strictly more accurate on dev; a teacher that prefers the first letter gets
    the biases, and beats its raw self."""
    rng = np.random.default_rng(0)

    def split(n: int, prefer_first: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        scores = rng.normal(0, 2, (n, 4))
        scores[np.arange(n), y] += 2.0  # some knowledge, at an over-confident scale
        scores[:, 0] += prefer_first
        return scores, y

    for prefer, variant in ((0.0, None), (4.0, "temperature+bias")):
        (st_, yt), (sd, yd) = split(400, prefer), split(300, prefer)
        mask = np.ones((400, 4), dtype=bool)
        cal = calibrate_scores(
            {"train": st_, "dev": sd}, {"train": mask, "dev": mask[:300]}, [f"q{i}" for i in range(400)], yt, yd
        )
        raw = float((sd.argmax(1) == yd).mean())
        assert cal.dev_accuracy >= raw and cal.candidates["temperature"]["dev_accuracy"] == pytest.approx(raw, abs=1e-4)
        assert variant is None or cal.variant == variant
        probs = cal.probs("dev").numpy()
        raw_probs = np.exp(sd - sd.max(1, keepdims=True))
        raw_probs /= raw_probs.sum(1, keepdims=True)
        # calibrated: a better log-loss than the over-confident raw scores on dev
        nll = -np.log(probs[np.arange(300), yd]).mean()
        assert nll < -np.log(raw_probs[np.arange(300), yd]).mean()
        if cal.variant == "temperature":
            assert (probs.argmax(1) == sd.argmax(1)).all() and cal.scale < 1  # the same answers, less confident
        else:
            assert cal.dev_accuracy > cal.candidates["temperature"]["dev_accuracy"]  # biases kept: strictly better
        if variant is not None:
            assert cal.dev_accuracy > raw + 0.05 and cal.bias[0] < min(cal.bias[1:])
    with pytest.raises(ProbekdError, match="only 6 labelled training examples"):
        calibrate_scores({"train": st_[:6], "dev": sd}, {"train": mask[:6], "dev": mask[:300]},
                         [f"q{i}" for i in range(6)], yt[:6], yd)  # fmt: skip
