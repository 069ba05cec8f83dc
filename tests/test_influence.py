"""KD-AIF's influence weighting: the per-row gradient dot products from one batched backward equal those of each
row's own backward; the layer is the last linear layer the loss reaches; the weights are the stated sigmoid; a
student trains under them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probekd.errors import ProbekdError
from probekd.student.heads import StudentConfig, build_student
from probekd.student.influence import gradient_dots, influential_layer, layer_gradient
from probekd.student.train import ROW_EXTRAS, distill_loss, influence_scores, train_student
from probekd.student.train_config import TrainConfig
from probekd.weighting import WeightingConfig, influence_weights
from test_student import mammal_task, rows_for


def _row_loss(student):
    def loss(m, batch):
        logits = student.scorer(m, **{k: v for k, v in batch.items() if k not in ROW_EXTRAS})
        return distill_loss(logits, batch["targets"], batch["labels"], batch["option_mask"], alpha=0.5,
                            temperature=2.0)  # fmt: skip

    return loss


@pytest.mark.parametrize("head", ["biencoder", "cross"])
def test_gradient_dots_equal_each_rows_own_backward(head: str, tiny_bert_dir: Path) -> None:
    """<G, grad l_i> from hooks in one batched backward of sum_i l_i equals the dot product with the layer's
    gradient from row i's loss alone, for every row (the bi-encoder calls the layer twice per row: question, then
    its options); the layer is the last linear one the loss reaches, not the unused pooler."""
    student = build_student(StudentConfig(model=str(tiny_bert_dir), head=head), k=4, seed=0)
    student.model.eval()
    rows = rows_for(student, mammal_task(5, seed=3), 4)
    batch = student.collate([rows[i] for i in range(len(rows))])
    loss = _row_loss(student)
    layer = influential_layer(student.model, loss, batch)
    names = {id(m): n for n, m in student.model.named_modules()}
    assert "pooler" not in names[id(layer)]
    if head == "biencoder":  # the last transformer layer's output projection
        assert names[id(layer)].endswith("encoder.layer.1.output.dense"), names[id(layer)]
    g = torch.Generator().manual_seed(0)
    direction = (torch.randn(layer.weight.shape, generator=g), torch.randn(layer.bias.shape, generator=g))
    got = gradient_dots(student.model, layer, loss, batch, direction)
    for i in range(len(rows)):
        one = student.collate([rows[i]])
        student.model.zero_grad()
        loss(student.model, one).sum().backward()
        want = (layer.weight.grad * direction[0]).sum() + (layer.bias.grad * direction[1]).sum()
        assert float(got[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    # the mean-loss gradient of several batches is the gradient of their rows' mean loss
    halves = [student.collate([rows[i] for i in range(3)]), student.collate([rows[i] for i in range(3, 5)])]
    gw, gb = layer_gradient(student.model, layer, loss, halves)
    student.model.zero_grad()
    loss(student.model, batch).mean().backward()
    torch.testing.assert_close(gw, layer.weight.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb, layer.bias.grad, rtol=1e-4, atol=1e-7)


def test_influence_weights_are_the_stated_sigmoid() -> None:
    s = np.array([-2.0, 0.0, 1.0, 3.0])
    w = influence_weights(s, scale=1.5)
    raw = 1 / (1 + np.exp(-1.5 * s / s.std()))
    np.testing.assert_allclose(w, raw * len(s) / raw.sum())
    assert w.mean() == pytest.approx(1.0) and (np.diff(w) > 0).all()  # more helpful, more weight
    np.testing.assert_array_equal(influence_weights(np.full(3, 0.7)), np.ones(3))
    with pytest.raises(ProbekdError, match="must be finite"):
        influence_weights(np.array([1.0, np.nan]))


def test_a_student_trains_under_influence_weights(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`weighting.scheme: influence`: the scores are computed (positive for rows whose gold agrees with dev's
    pattern, as every row here does on average), the weights logged with their statistics, and training runs;
    without dev rows it is refused."""
    student = build_student(StudentConfig(model=str(tiny_bert_dir), head="biencoder"), k=4, seed=0)
    train, dev = rows_for(student, mammal_task(24), 4), rows_for(student, mammal_task(8, seed=1), 4)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                      weighting=WeightingConfig(scheme="influence", refresh_epochs=1.0))  # fmt: skip
    scores = influence_scores(student, train, dev, cfg, "fkl")
    assert scores.shape == (24,) and np.isfinite(scores).all() and scores.std() > 0
    history = train_student(student, train, dev, cfg, tmp_path / "ck", 0)
    stats = [h["weighting"] for h in history if "weighting" in h]
    assert [s["step"] for s in stats] == [0, 3, 6]  # at the start, then after each epoch of 3 steps
    assert stats[0]["n"] == 24 and 0 < stats[0]["ess_share"] <= 1
    with pytest.raises(ProbekdError, match="needs dev rows"):
        influence_scores(student, train, None, cfg, "fkl")  # type: ignore[arg-type]


def test_a_generative_grid_refuses_the_influence_weighting() -> None:
    from pydantic import ValidationError

    from probekd.generative.pipeline import GenerativeGrid

    with pytest.raises(ValidationError, match="influence weighting .* is for multiple-choice students"):
        GenerativeGrid(weightings=["none", "influence"])
