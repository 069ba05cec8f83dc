"""Hidden-state matching (`train.hidden_match`): the three matching terms against hand-written formulas, Poole et
al.'s interpolated bound at both ends and in between, and the trainer adding the term with a projection that is
trained, resumed with the checkpoints and removed before the student is saved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from probekd.errors import ProbekdError
from probekd.student import hidden_match as hm
from probekd.student.heads import StudentConfig, build_student, detach_training_head
from probekd.student.train import Rows, distill_loss, make_trainer, train_student
from probekd.student.train_config import TrainConfig
from test_student import mammal_task, rows_for


def _poole_by_hand(s: np.ndarray, alpha: float) -> float:
    """I_alpha of Poole et al. (2019, eq. 12) with a(y) = 1, written out with loops over the batch's pairs:
    1 + mean_{i != j} [s_ii - log(alpha m_ij + (1 - alpha))] - mean_{i != j} exp(s_ij) / (alpha m_ii + 1 - alpha),
    m_ij = mean_{k != j} exp(s_ik) (row i's mean with column j left out)."""
    m = len(s)

    def loo(i: int, j: int) -> float:
        return sum(math.exp(s[i, k]) for k in range(m) if k != j) / (m - 1)

    joint = marginal = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                joint += s[i, i] - math.log(alpha * loo(i, j) + (1 - alpha))
                marginal += math.exp(s[i, j]) / (alpha * loo(i, i) + (1 - alpha))
    return 1 + joint / (m * (m - 1)) - marginal / (m * (m - 1))


@settings(max_examples=40, deadline=None)
@given(
    s=arrays(np.float64, st.tuples(st.integers(2, 6)).map(lambda t: (t[0], t[0])), elements=st.floats(-4, 4)),
    alpha=st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]),
)
def test_mi_alpha_bound_equals_pooles_formula_by_hand(s: np.ndarray, alpha: float) -> None:
    got = float(hm.mi_alpha_bound(torch.from_numpy(s), alpha))
    assert got == pytest.approx(_poole_by_hand(s, alpha), rel=1e-6, abs=1e-6)


def test_mi_alpha_ends_are_nwj_and_leave_one_out_infonce() -> None:
    s = torch.tensor([[2.0, 0.1, -1.0], [0.3, 1.5, 0.2], [-0.5, 0.0, 3.0]], dtype=torch.float64)
    off = ~torch.eye(3, dtype=torch.bool)
    nwj = 1 + torch.diagonal(s).mean() - s[off].exp().mean()
    assert float(hm.mi_alpha_bound(s, 0.0)) == pytest.approx(float(nwj), rel=1e-12)
    # alpha = 1: the marginal term is exactly 1, leaving mean_{i != j} [s_ii - log mean_{k != j} exp(s_ik)]
    loo = torch.stack([torch.stack([torch.log(s[i][torch.arange(3) != j].exp().mean()) for j in range(3)])
                       for i in range(3)])  # fmt: skip
    infonce = (torch.diagonal(s)[:, None] - loo)[off].mean()
    assert float(hm.mi_alpha_bound(s, 1.0)) == pytest.approx(float(infonce), rel=1e-12)
    # one entry dominating its row: the held-out log-mean-exp stays exact (no cancellation in sum - e^{s_ij})
    big = 40 * torch.eye(3, dtype=torch.float64)
    assert float(hm.mi_alpha_bound(big, 1.0)) == pytest.approx(_poole_by_hand(big.numpy(), 1.0), rel=1e-9)
    # a critic that tells the pairs apart scores higher than one that does not
    assert float(hm.mi_alpha_bound(5 * torch.eye(4), 0.5)) > float(hm.mi_alpha_bound(torch.zeros(4, 4), 0.5))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        hm.mi_alpha_bound(s, 1.5)


def test_mse_and_cosine_over_the_present_options_only() -> None:
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [-9.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    assert float(hm.match_loss("mse", z, t, mask)) == pytest.approx((1.0 + 1.0) / 4)  # (0+1) + (0+1), 4 entries
    assert float(hm.match_loss("cosine", z, t, mask)) == pytest.approx((1 - 1 / math.sqrt(2) + 0.0) / 2)
    scores = torch.nn.functional.normalize(t[0, :2], dim=-1) @ torch.nn.functional.normalize(z[0, :2], dim=-1).T
    want = -hm.mi_alpha_bound(scores / hm.CRITIC_TEMPERATURE, 0.3)
    assert float(hm.match_loss("mi_alpha", z, t, mask, 0.3)) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="unknown hidden-state matching loss 'l1'"):
        hm.match_loss("l1", z, t, mask)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(t=arrays(np.float32, (3, 4, 5), elements=st.floats(-3, 3, width=32)))
def test_the_term_is_zero_when_the_projected_states_equal_the_teachers(t: np.ndarray) -> None:
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True] * 4])
    teacher = torch.from_numpy(t)
    assert float(hm.match_loss("mse", teacher.clone(), teacher, mask)) == 0.0
    nonzero = teacher[mask].norm(dim=-1) > 1e-3  # cosine is undefined for a zero vector
    if bool(nonzero.all()):
        assert float(hm.match_loss("cosine", teacher.clone(), teacher, mask)) == pytest.approx(0.0, abs=1e-6)


def test_standardized_states_have_zero_mean_unit_scale_over_present_options() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(30, 4, 5)) * np.array([1.0, 100.0, 0.01, 1.0, 0.0]) + 7.0
    mask = rng.random((30, 4)) > 0.2
    out = hm.standardize_states(states, mask)
    np.testing.assert_allclose(out[mask][:, :4].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[mask][:, :4].std(0), 1.0, atol=1e-4)
    assert (out[mask][:, 4] == 0).all()  # a constant dimension: centred, scale 1
    assert (out[~mask] == 0).all()


def _rows_with_states(student, exs, k: int, width: int, seed: int = 0) -> Rows:
    plain = rows_for(student, exs, k)
    states = np.random.default_rng(seed).normal(size=(len(exs), k, width)).astype(np.float32)
    m = np.stack([r["option_mask"].numpy() for r in plain.rows])
    y = np.array([r["labels"] for r in plain.rows])
    soft = np.stack([r["targets"].numpy() for r in plain.rows])
    return Rows([student.encode(e) for e in exs], m, y, soft, teacher_states=states)


def test_trainer_adds_the_matching_term_and_saves_the_plain_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The trainer's loss is the distillation loss plus hidden_match x the term on the projected option embeddings
    (by hand, for each kind); evaluation adds nothing; training moves the projection; the trained student has no
    projection left; the term needs a bi-encoder and rows with teacher states."""
    from probekd.student.heads import biencoder_embeddings, biencoder_scores

    exs = mammal_task(12)
    student = build_student(StudentConfig(model=str(tiny_bert_dir), head="biencoder"), k=4, seed=0)
    rows = _rows_with_states(student, exs, 4, width=6)
    batch = student.collate([rows[i] for i in range(len(rows))])
    for kind in ("mse", "cosine", "mi_alpha"):
        cfg = TrainConfig(alpha=0.5, temperature=2.0, hidden_match=0.7, hidden_match_loss=kind, hidden_match_alpha=0.4)
        trainer = make_trainer(student, rows, None, cfg, tmp_path / kind, 0)
        proj = getattr(student.model, hm.PROJECTION)
        assert (proj.in_features, proj.out_features) == (student.model.config.hidden_size, 6)
        student.model.train()
        with torch.no_grad():
            got = float(trainer.compute_loss(student.model, dict(batch)))
            q, o = biencoder_embeddings(student.model, batch["input_ids"], batch["attention_mask"],
                                        batch["option_ids"], batch["option_attention"])  # fmt: skip
            logits = biencoder_scores(student.model, q, o, batch["option_mask"])
            per = distill_loss(logits, batch["targets"], batch["labels"], batch["option_mask"], alpha=0.5,
                               temperature=2.0)  # fmt: skip
            term = hm.match_loss(kind, proj(o), batch["teacher_states"], batch["option_mask"], 0.4)
            assert got == pytest.approx(float(per.mean() + 0.7 * term), rel=1e-5)
            student.model.eval()
            assert float(trainer.compute_loss(student.model, dict(batch))) == pytest.approx(float(per.mean()), rel=1e-5)
        detach_training_head(student.model, hm.PROJECTION)
    cfg = TrainConfig(epochs=2, learning_rate=1e-2, batch_size=4, hidden_match=1.0, hidden_match_loss="mse")
    trainer = make_trainer(student, rows, None, cfg, tmp_path / "steps", 0)
    before = getattr(student.model, hm.PROJECTION).weight.detach().clone()
    trainer.train()
    assert not torch.allclose(getattr(student.model, hm.PROJECTION).weight, before)  # the projection is trained
    detach_training_head(student.model, hm.PROJECTION)
    train_student(student, rows, rows_for(student, mammal_task(8, seed=1), 4), cfg, tmp_path / "ck", 0)
    assert not hasattr(student.model, hm.PROJECTION)  # the deployed student is the plain encoder
    assert all(hm.PROJECTION not in n for n, _ in student.model.named_parameters())
    cross = build_student(StudentConfig(model=str(tiny_bert_dir), head="cross"), k=4, seed=0)
    with pytest.raises(ProbekdError, match="train.hidden_match works on the bi-encoder's embeddings"):
        make_trainer(cross, rows_for(cross, exs, 4), None, TrainConfig(hidden_match=1.0), tmp_path / "cross", 0)
    with pytest.raises(ProbekdError, match="needs the teacher's states in the training rows"):
        make_trainer(student, rows_for(student, exs, 4), None, TrainConfig(hidden_match=1.0), tmp_path / "none", 0)
    with pytest.raises(ProbekdError, match="train.mixup and train.hidden_match together"):
        make_trainer(student, rows, None, TrainConfig(hidden_match=1.0, mixup=0.2), tmp_path / "both", 0)
