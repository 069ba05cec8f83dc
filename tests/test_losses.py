"""Distillation losses against hand/scipy values, and their properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax
from scipy.stats import entropy

from probekd import losses
from probekd.errors import ProbekdError
from probekd.student.train import distill_loss


def test_forward_kl_hand_value_with_mask_and_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])
    p = torch.tensor([[0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    got = losses.get("fkl")(logits, p, mask)
    # q = softmax(0, log 3) = (1/4, 3/4); KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    assert got.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    q_t = softmax(np.array([0.0, math.log(3.0)]) / 2.0)
    got_t = losses.get("fkl")(logits, p, mask, temperature=2.0)
    assert got_t.item() == pytest.approx(entropy([0.5, 0.5], q_t), abs=1e-6)


def test_registry_errors() -> None:
    with pytest.raises(ProbekdError, match="unknown loss 'nope'; known: fkl"):
        losses.get("nope")
    with pytest.raises(ProbekdError, match="already registered"):
        losses.register("fkl", losses.get("fkl"))
    with pytest.raises(ValueError, match="must both be"):
        losses.get("fkl")(torch.zeros(2, 3), torch.zeros(2, 4))


rows = st.integers(2, 5).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(-30, 30), min_size=k, max_size=k),
        st.lists(st.floats(0.01, 1), min_size=k, max_size=k),
        st.integers(0, k - 2),
    )
)


@settings(max_examples=100, deadline=None)
@given(rows, st.sampled_from([0.5, 1.0, 4.0]))
def test_forward_kl_properties(row: tuple[list[float], list[float], int], temperature: float) -> None:
    logits, weights, n_masked = row
    k = len(logits)
    mask = torch.tensor([[True] * (k - n_masked) + [False] * n_masked])
    p = torch.tensor([weights]) * mask
    p = p / p.sum()
    s = torch.tensor([logits], requires_grad=True)
    fkl = losses.get("fkl")
    value = fkl(s, p, mask, temperature=temperature)
    assert value.item() >= -1e-6  # non-negative
    value.sum().backward()
    assert torch.isfinite(s.grad).all()  # finite gradients, even with masked options and extreme logits
    assert s.grad[0, k - n_masked :].abs().sum() == 0  # masked options take no part
    # zero when the student's tempered distribution is the target
    matched = (p.clamp_min(1e-12).log() * temperature).masked_fill(~mask, 0.0)
    assert fkl(matched, p, mask, temperature=temperature).item() == pytest.approx(0.0, abs=1e-5)
    perm = torch.randperm(k)  # invariant to the order of options
    assert fkl(s[:, perm], p[:, perm], mask[:, perm], temperature=temperature).item() == pytest.approx(
        value.item(), rel=1e-5, abs=1e-6
    )


def test_distill_loss_hand_value() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # second row: no soft target (CE only)
    labels = torch.tensor([1, 0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    got = distill_loss(logits, targets, labels, mask, alpha=0.25, temperature=2.0)
    q_t = softmax(np.array([0.0, math.log(3.0)]) / 2.0)
    row0 = 0.25 * 4.0 * entropy([0.5, 0.5], q_t) + 0.75 * -math.log(0.75)
    row1 = 0.75 * math.log(2)
    assert got.tolist() == pytest.approx([row0, row1], abs=1e-6)
    unlabelled = distill_loss(logits, targets, torch.tensor([-1, -1]), mask, alpha=0.25, temperature=2.0)
    assert unlabelled.tolist() == pytest.approx([0.25 * 4.0 * entropy([0.5, 0.5], q_t), 0.0], abs=1e-6)
