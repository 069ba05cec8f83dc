"""PACED weights, pass rates, normalization, the hard filter, weight statistics, the two-stage loss schedule, and
the weights reaching the trainer."""

from __future__ import annotations

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


def test_resumed_weighted_student_keeps_its_weights(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACED student killed after its first checkpoint and rerun resumes with the weights and statistics it had
    (from the warm-up model at step 1), not weights recomputed from the model it resumes with, and ends as an
    uninterrupted student does."""
    from transformers import TrainerCallback

    import probekd.student.train as train_mod
    from test_student import mammal_task, rows_for

    weighting = WeightingConfig(scheme="paced", warmup_epochs=1 / 3)  # weights once, after step 1 of 3 per epoch
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, weighting=weighting)

    def run(out: Path) -> tuple[list[float], list[dict], list[float]]:
        student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
        rows = rows_for(student, mammal_task(24), 4)
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
