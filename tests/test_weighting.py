"""PACED weights, pass rates, normalization, the hard filter, weight statistics, the two-stage loss schedule, and
the weights reaching the trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probekd.errors import ProbekdError
from probekd.student.heads import StudentConfig, build_student
from probekd.student.train import train_student
from probekd.student.train_config import TrainConfig
from probekd.weighting import (
    WeightingConfig,
    ddk_gaps,
    ddk_mixture,
    domain_weights,
    hard_filter_weights,
    normalize,
    paced_weights,
    pass_rates,
    weight_stats,
    weights_for,
)


def test_paced_weights_at_known_points() -> None:
    p = np.array([0.0, 0.25, 0.5, 1.0])
    assert paced_weights(p).tolist() == pytest.approx([0.0, 0.1875, 0.25, 0.0])
    assert paced_weights(p, alpha=2.0, beta=0.5).tolist() == pytest.approx(
        [0.0, 0.0625 * 0.75**0.5, 0.25 * 0.5**0.5, 0.0]
    )
    assert paced_weights(p, alpha=0.0, beta=0.0).tolist() == [1.0, 1.0, 1.0, 1.0]  # unweighted as a special case
    with pytest.raises(ProbekdError, match=r"in \[0, 1\]"):
        paced_weights(np.array([1.5]))


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0.1, 4), st.floats(0.1, 4))
def test_paced_weight_is_largest_at_alpha_over_alpha_plus_beta(p: float, alpha: float, beta: float) -> None:
    best = alpha / (alpha + beta)
    w, w_best = paced_weights(np.array([p, best]), alpha, beta)
    assert 0 <= w <= w_best + 1e-12


def test_normalization_hard_filter_and_stats() -> None:
    w = normalize(np.array([0.0, 1.0, 3.0, 0.0]))
    assert w.mean() == pytest.approx(1.0) and w.tolist() == pytest.approx([0.0, 1.0, 3.0, 0.0])
    with pytest.raises(ProbekdError, match="every training example has weight 0"):
        normalize(np.zeros(3))
    p = np.array([0.0, 0.5, 1.0, 0.999])
    assert hard_filter_weights(p).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert hard_filter_weights(p, tol=0.01).tolist() == [0.0, 1.0, 0.0, 0.0]
    s = weight_stats(np.array([1.0, 1.0, 0.0, 2.0]), p=np.array([0.2, 0.4, 0.6, 0.8]), bins=2)
    assert s["ess"] == pytest.approx(16 / 6, abs=0.01) and s["ess_share"] == pytest.approx(16 / 24, abs=1e-4)
    assert s["zero_share"] == 0.25 and s["histogram"]["counts"] == [1, 3] and s["mean_pass_rate"] == 0.5


def test_pass_rates_exact_and_sampled() -> None:
    probs = np.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]])
    gold = np.array([1, 0, 1])
    assert pass_rates(probs, gold).tolist() == pytest.approx([0.9, 0.5, 0.0])
    sampled = pass_rates(probs, gold, "sampled", samples=8, seed=3)
    assert set((sampled * 8).round(6).tolist()) <= set(range(9)) and sampled[2] == 0.0
    assert np.array_equal(sampled, pass_rates(probs, gold, "sampled", samples=8, seed=3))  # seeded
    many = pass_rates(np.tile(probs[:1], (4000, 1)), np.ones(4000, dtype=int), "sampled", samples=8)
    assert many.mean() == pytest.approx(0.9, abs=0.01)  # unbiased
    with pytest.raises(ProbekdError, match=r"gold options must lie in \[0, K\)"):
        pass_rates(probs, np.array([1, 0, 2]))
    cfg = WeightingConfig(scheme="paced")
    assert weights_for(cfg, probs, gold).tolist() == pytest.approx([0.09, 0.25, 0.0] / np.mean([0.09, 0.25, 0.0]))


def test_two_stage_schedule_switch_step() -> None:
    cfg = TrainConfig(loss="fkl>rkl", switch_at=0.3)
    assert [cfg.loss_at(s, 10) for s in range(10)] == ["fkl"] * 3 + ["rkl"] * 7
    assert TrainConfig(loss="akl").loss_at(9, 10) == "akl"
    with pytest.raises(ValueError, match="is not a loss or `first>second`"):
        TrainConfig(loss="fkl>rkl>js")


def test_paced_weights_reach_the_trainer(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """With PACED after a warm-up, the rows carry mean-1 weights from the student's pass rates, recomputed every
    `refresh_epochs`, and the history says what they were."""
    from test_student import mammal_task, rows_for

    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    rows = rows_for(student, mammal_task(24), 4)
    weighting = WeightingConfig(scheme="paced", warmup_epochs=1 / 3, refresh_epochs=2 / 3)  # 3 steps per epoch
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, weighting=weighting)
    history = train_student(student, rows, rows, cfg, tmp_path / "ck", 0)
    stats = [h["weighting"] for h in history if "weighting" in h]
    assert [s["step"] for s in stats] == [1, 3, 5]  # after the warm-up step, then every 2 of the 6 steps
    w = np.array([r["weights"] for r in rows.rows])
    assert w.mean() == pytest.approx(1.0) and w.std() > 0
    assert 0 < stats[-1]["ess_share"] <= 1 and stats[-1]["n"] == 24


class _Killed(Exception):
    """Stands for the process being killed mid-training."""


@pytest.mark.parametrize("scheme", ["paced", "ddk"])
def test_resumed_weighted_student_keeps_its_weights(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """A PACED (or DDK) student killed after its first checkpoint and rerun resumes with the weights and statistics
    it had (from the warm-up model at step 1; DDK also its domain mixture, in full precision), not weights
    recomputed from the model it resumes with, and ends as an uninterrupted student does."""
    from transformers import TrainerCallback

    import probekd.student.train as train_mod
    from test_student import mammal_task, rows_for

    weighting = WeightingConfig(scheme=scheme, warmup_epochs=1 / 3)  # weights once, after step 1 of 3 per epoch
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, weighting=weighting)

    def run(out: Path) -> tuple[list[float], list[dict], list[float]]:
        student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
        rows = rows_for(student, mammal_task(24), 4)
        rows.domains = ["farm" if i % 3 == 0 else "zoo" for i in range(24)]
        history = train_student(student, rows, rows, cfg, out, 0)
        params = [float(p.detach().sum()) for p in student.model.parameters()]
        return [r["weights"] for r in rows.rows], [h["weighting"] for h in history if "weighting" in h], params

    w_full, stats_full, params_full = run(tmp_path / "full")
    assert [s["step"] for s in stats_full] == [1]

    class Kill(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == 4:  # type: ignore[attr-defined]  # after the checkpoint of epoch 1 (step 3)
                raise _Killed

    original = train_mod.make_trainer

    def killing(*args: object, **kwargs: object) -> object:
        trainer = original(*args, **kwargs)
        trainer.add_callback(Kill())
        return trainer

    monkeypatch.setattr(train_mod, "make_trainer", killing)
    with pytest.raises(_Killed):
        run(tmp_path / "killed")
    monkeypatch.undo()
    assert (tmp_path / "killed" / "checkpoint-3" / train_mod.WEIGHTS_FILE).is_file()
    if scheme == "ddk":  # the mixture the next update would move from, unrounded
        saved = json.loads((tmp_path / "killed" / "checkpoint-3" / train_mod.WEIGHTS_FILE).read_text())
        assert saved["mixture"] == pytest.approx(stats_full[0]["mixture"], abs=1e-6)
        assert saved["mixture"] != stats_full[0]["mixture"]  # more digits than the logged statistics
    shutil.copytree(tmp_path / "killed", tmp_path / "old")
    w_resumed, stats_resumed, params_resumed = run(tmp_path / "killed")
    assert stats_resumed == stats_full  # computed once, at step 1, before the kill
    np.testing.assert_allclose(w_resumed, w_full, rtol=0, atol=0)
    np.testing.assert_allclose(params_resumed, params_full, rtol=1e-5, atol=1e-5)
    # a checkpoint past the warm-up without saved weights (made before they were saved) is not resumed: the student
    # starts again rather than be weighted by the later model, and ends as the uninterrupted one
    (tmp_path / "old" / "checkpoint-3" / train_mod.WEIGHTS_FILE).unlink()
    w_old, stats_old, params_old = run(tmp_path / "old")
    assert stats_old == stats_full and w_old == w_full
    np.testing.assert_allclose(params_old, params_full, rtol=1e-5, atol=1e-5)


def test_ddk_gaps_and_smooth_update_by_hand() -> None:
    """DDK on two domains: the gaps are mean student loss minus mean target loss per domain; one update moves the
    mixture a step towards the data's shares scaled by exp(gap) (numbers by hand)."""
    domains = np.array([0, 0, 1, 1, 1])
    student = np.array([1.0, 3.0, 2.0, 2.0, 5.0])  # means 2 and 3
    target = np.array([1.0, 1.0, 1.0, 0.5, 1.5])  # means 1 and 1: gaps 1 and 2
    gaps = ddk_gaps(student, target, domains, 3)
    np.testing.assert_allclose(gaps, [1.0, 2.0, 0.0])  # a domain without rows: 0
    shares = np.array([0.4, 0.6])
    r = ddk_mixture(shares, gaps[:2], shares, smoothing=0.5)
    star = np.array([0.4 * np.e, 0.6 * np.e**2]) / (0.4 * np.e + 0.6 * np.e**2)
    np.testing.assert_allclose(r, 0.5 * star + 0.5 * shares)
    np.testing.assert_allclose(ddk_gaps(np.array([0.7, 0.3]), np.zeros(2), np.array([0, 1]), 2), [0.7, 0.3])


@settings(max_examples=40, deadline=None)
@given(gap=st.floats(0.1, 3.0), smoothing=st.floats(0.05, 1.0), d=st.integers(2, 6), steps=st.integers(1, 8))
def test_ddk_mixture_moves_toward_the_domain_with_the_larger_gap(
    gap: float, smoothing: float, d: int, steps: int
) -> None:
    """The largest domain trails its targets by `gap` nats more than the others: every update raises its share above
    its share of the data, towards share exp(gap) / normalizer; with equal gaps the mixture stays the data's own and
    every row keeps weight 1; the row weights give each domain its share of the loss, with mean 1."""
    domains = np.repeat(np.arange(d), np.arange(d, 0, -1))  # domain 0 the largest
    shares = np.bincount(domains) / len(domains)
    student = np.where(domains == 0, 1.0 + gap, 1.0)
    gaps = ddk_gaps(student, np.zeros(len(domains)), domains, d)
    target0 = shares[0] * np.exp(gap) / (shares[0] * np.exp(gap) + 1 - shares[0])
    r = shares
    for _ in range(steps):
        new = ddk_mixture(r, gaps, shares, smoothing)
        assert new[0] > r[0] - 1e-12 and new[0] <= target0 + 1e-12
        np.testing.assert_allclose(new.sum(), 1.0)
        r = new
    assert r[0] > shares[0]
    w = domain_weights(domains, r)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(np.bincount(domains, weights=w) / len(domains), r)
    same = ddk_mixture(shares, np.full(d, 0.8), shares, smoothing)
    np.testing.assert_allclose(domain_weights(domains, same), 1.0)


def test_ddk_weights_reach_the_trainer_and_need_domains(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`weighting.scheme: ddk` with the rows' domains: the first computation moves the mixture from the data's shares
    by the gaps of the untrained student's losses to the targets (by hand), later ones log the mixture; the rows'
    weights are constant within a domain, mean 1; rows without domains, or of one domain, are refused."""
    from probekd.student.train import Rows, predict
    from test_student import mammal_task, rows_for

    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    exs = mammal_task(24)
    plain = rows_for(student, exs, 4)
    domains = ["zoo" if i % 3 else "farm" for i in range(24)]  # 8 farm, 16 zoo
    m = np.stack([r["option_mask"].numpy() for r in plain.rows])
    soft = np.stack([r["targets"].numpy() for r in plain.rows])
    rows = Rows([student.encode(e) for e in exs], m, np.array([e.answer for e in exs]), soft, domains=domains)
    weighting = WeightingConfig(scheme="ddk", refresh_epochs=1 / 3, ddk_smoothing=0.8)  # 3 steps per epoch
    cfg = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, weighting=weighting)
    probs = predict(student, rows, 32)
    gold = np.array([e.answer for e in exs])
    loss_s = -np.log(probs[np.arange(24), gold])
    loss_t = -np.log(soft[np.arange(24), gold])
    farm = np.array(domains) == "farm"
    gaps = np.array([(loss_s - loss_t)[farm].mean(), (loss_s - loss_t)[~farm].mean()])
    first = ddk_mixture(np.array([1 / 3, 2 / 3]), gaps, np.array([1 / 3, 2 / 3]), 0.8)
    history = train_student(student, rows, rows, cfg, tmp_path / "ck", 0)
    stats = [h["weighting"] for h in history if "weighting" in h]
    assert [s["step"] for s in stats] == [0, 1, 2, 3]  # at the start, then after every step
    mix = [s["mixture"] for s in stats]
    assert all(sorted(x) == ["farm", "zoo"] and sum(x.values()) == pytest.approx(1.0, abs=1e-5) for x in mix)
    assert mix[0] == pytest.approx({"farm": first[0], "zoo": first[1]}, abs=2e-6)
    assert abs(first[0] - 1 / 3) > 1e-3  # it moved
    w = np.array([r["weights"] for r in rows.rows])
    assert w.mean() == pytest.approx(1.0)
    for name in ("farm", "zoo"):
        dw = w[np.array(domains) == name]
        assert np.ptp(dw) == 0 and dw[0] == pytest.approx(mix[-1][name] / (np.mean(np.array(domains) == name)), 1e-4)
    with pytest.raises(ProbekdError, match="needs a domain for every training question"):
        train_student(student, plain, plain, cfg, tmp_path / "none", 0)
    plain.domains = ["zoo"] * 24
    with pytest.raises(ProbekdError, match="the training questions have one"):
        train_student(student, plain, plain, cfg, tmp_path / "one", 0)
