"""Distillation losses against hand/scipy values, and their properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import jensenshannon
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
    with pytest.raises(ProbekdError, match="unknown loss 'nope'; known: akl, fkl, js, nkd, rkl, sinkhorn, skl, srkl"):
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


@pytest.mark.parametrize("name", losses.names())
@settings(max_examples=60, deadline=None)
@given(row=rows, temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_loss_properties(name: str, row: tuple[list[float], list[float], int], temperature: float) -> None:
    """Non-negative; finite gradients at extreme logits; masked options take no part; zero when the student's
    tempered distribution is the target; invariant to the order of options (one example: `sinkhorn` is then the
    total variation)."""
    logits, weights, n_masked = row
    k = len(logits)
    loss = losses.get(name)
    mask = torch.tensor([[True] * (k - n_masked) + [False] * n_masked])
    p = torch.tensor([weights]) * mask
    p = p / p.sum()
    s = torch.tensor([logits], requires_grad=True)
    value = loss(s, p, mask, temperature=temperature)
    assert value.shape == (1,) and value.item() >= -1e-6
    value.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad[0, k - n_masked :].abs().sum() == 0
    matched = (p.clamp_min(1e-12).log() * temperature).masked_fill(~mask, 0.0)
    assert loss(matched, p, mask, temperature=temperature).item() == pytest.approx(0.0, abs=1e-4)
    perm = torch.randperm(k)
    extra = {"target_index": (perm == p.argmax(-1)).nonzero()[:, 0]} if name == "nkd" else {}  # same option
    permuted = loss(s[:, perm], p[:, perm], mask[:, perm], temperature=temperature, **extra)
    assert permuted.item() == pytest.approx(value.item(), rel=1e-4, abs=1e-5)


P = np.array([0.6, 0.3, 0.1, 0.0])
LOGITS = np.array([0.5, 1.0, -0.5, 3.0])
MASK = np.array([True, True, True, False])


def _call(name: str, **options: float) -> float:
    t = torch.tensor
    return losses.get(name)(t(LOGITS[None], dtype=torch.float32), t(P[None]), t(MASK[None]), **options).item()


def _q(temperature: float = 1.0) -> np.ndarray:
    return softmax(LOGITS[:3] / temperature)


def test_divergences_against_scipy() -> None:
    p, q = P[:3], _q(2.0)
    eps = 1e-4
    assert _call("rkl", temperature=2.0, eps=eps) == pytest.approx(entropy(q, (1 - 3 * eps) * p + eps), rel=1e-5)
    assert _call("js", temperature=2.0) == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-5)
    m = 0.2 * p + 0.8 * q
    assert _call("js", temperature=2.0, beta=0.2) == pytest.approx(0.2 * entropy(p, m) + 0.8 * entropy(q, m), rel=1e-5)
    assert _call("skl", temperature=2.0, skew=0.1) == pytest.approx(entropy(p, 0.1 * p + 0.9 * q), rel=1e-5)
    assert _call("srkl", temperature=2.0, skew=0.3) == pytest.approx(entropy(q, 0.3 * q + 0.7 * p), rel=1e-5)
    assert _call("skl", skew=0.0) == pytest.approx(_call("fkl"), rel=1e-6)  # no skew: forward KL


def test_reverse_kl_is_finite_on_hard_targets() -> None:
    hard = torch.tensor([[0.0, 1.0, 0.0]])
    value = losses.get("rkl")(torch.zeros(1, 3), hard, eps=1e-4).item()
    q, p_s = np.full(3, 1 / 3), np.array([1e-4, 1 - 2e-4, 1e-4])
    assert value == pytest.approx(entropy(q, p_s), rel=1e-5) and value < 7


def test_adaptive_kl_hand_value() -> None:
    p, q = P[:3], _q()
    # head (target mass above < 0.5): option 0 only (mass above it 0; above option 1: 0.6)
    gap = np.abs(p - q)
    w_head = gap[0] / gap.sum()
    rkl = entropy(q, (1 - 3e-4) * p + 1e-4)
    assert _call("akl") == pytest.approx(w_head * entropy(p, q) + (1 - w_head) * rkl, rel=1e-5)
    # head_mass 1: every option is head, so AKL is forward KL
    assert _call("akl", head_mass=1.0) == pytest.approx(_call("fkl"), rel=1e-6)


def test_normalized_kd_decomposes_forward_kl() -> None:
    p, q = P[:3], _q(2.0)
    binary = entropy([p[0], 1 - p[0]], [q[0], 1 - q[0]])
    rest = entropy(p[1:] / p[1:].sum(), q[1:] / q[1:].sum())
    assert _call("nkd", temperature=2.0) == pytest.approx(binary + 1.5 * rest, rel=1e-5)
    # gamma = 1 - p_t gives back forward KL (the chain rule of KL), which NKD's gamma replaces
    assert _call("nkd", temperature=2.0, gamma=1 - p[0]) == pytest.approx(_call("fkl", temperature=2.0), rel=1e-5)


def test_sinkhorn_against_total_variation_and_assignment() -> None:
    # one example: the plan is [[1]], the value the total variation
    assert _call("sinkhorn") == pytest.approx(0.5 * np.abs(P[:3] - _q()).sum(), rel=1e-5)
    # small epsilon, uniform weights: the plan tends to the optimal assignment (scipy), 1/B per matched pair
    rng = np.random.default_rng(0)
    targets = softmax(rng.normal(size=(4, 3)) * 2, axis=1)
    logits = rng.normal(size=(4, 3)) * 2
    q = softmax(logits, axis=1)
    cost = 0.5 * np.abs(targets[:, None, :] - q[None, :, :]).sum(-1)
    r, c = linear_sum_assignment(cost)
    got = losses.get("sinkhorn")(
        torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32),
        epsilon=0.002, iterations=500,
    )  # fmt: skip
    assert got.mean().item() == pytest.approx(cost[r, c].mean(), abs=2e-3)


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


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_option_written_in_yaml_reaches_the_loss(name: str) -> None:
    """Each option a loss takes (`loss_options`), written in a YAML config as its default value, validates and is
    accepted by the loss (YAML's `30` for an iteration count arrives through a float-valued field as 30.0); the
    per-example `target_index` of nkd is data, not an option."""
    import inspect

    import yaml

    from probekd.student.train_config import TrainConfig, loss_parameters

    defaults = {k: inspect.signature(losses.get(name)).parameters[k].default for k in loss_parameters(name)}
    cfg = TrainConfig.model_validate(yaml.safe_load(yaml.safe_dump({"loss": name, "loss_options": defaults})))
    logits, p = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]]), torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    value = losses.get(name)(logits, p, temperature=2.0, **cfg.loss_options)
    assert torch.isfinite(value).all() and value.shape == (2,)
    if name == "nkd":
        with pytest.raises(ValueError, match="target_index"):
            TrainConfig(loss="nkd", loss_options={"target_index": 0})
