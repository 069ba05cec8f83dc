"""Sinkhorn distance over the batch (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge
Distillation"): the batch's target distributions and its student distributions are two sets of points, matched by
an entropy-regularized optimal transport plan, so each student row is pulled toward the target rows it is
transported to, not only toward its own."""

from __future__ import annotations

import torch

from probekd.losses.common import prepare


def sinkhorn(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> torch.Tensor:
    """A batch-level loss: per example i, B * sum_j P_ij C_ij, so that the batch mean is the Sinkhorn distance
    sum_ij P_ij C_ij.

    C_ij = 1/2 sum_k |p_ik - q_jk| (total variation between target row i and student row j, over the options;
    masked ones are 0 on both sides), P the transport plan between uniform weights 1/B on both sides with entropy
    regularization `epsilon`, from `iterations` log-domain Sinkhorn updates (differentiated through). With B = 1 the
    value is the total variation between p and q; for B > 1 it is not exactly 0 when q = p (the entropic plan also
    moves mass between different rows), and example i's value depends on the other examples of its batch."""
    if epsilon <= 0 or iterations < 1 or iterations != int(iterations):
        raise ValueError(f"epsilon must be positive and iterations a whole number >= 1, got {epsilon}, {iterations}")
    iterations = int(iterations)  # a YAML option may arrive as 30.0
    p, log_q, m = prepare(student_logits, target_probs, mask, temperature)
    q = log_q.exp().masked_fill(~m, 0.0)
    b = p.shape[0]
    cost = 0.5 * (p[:, None, :] - q[None, :, :]).abs().sum(-1)  # [B, B]
    log_k = -cost / epsilon
    log_w = torch.full((b,), -torch.log(torch.tensor(float(b))).item(), device=p.device)
    f = torch.zeros(b, device=p.device)
    g = torch.zeros(b, device=p.device)
    for _ in range(iterations):
        f = log_w - torch.logsumexp(log_k + g[None, :], 1)
        g = log_w - torch.logsumexp(log_k + f[:, None], 0)
    plan = torch.exp(log_k + f[:, None] + g[None, :])
    return b * (plan * cost).sum(1)
