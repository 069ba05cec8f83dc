"""Adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
Language Models"): forward KL fits the head of the target distribution first and reverse KL its tail, so AKL mixes
them by how far the student is from the target on each part."""

from __future__ import annotations

import torch

from probekd.losses.common import prepare
from probekd.losses.kl import forward_kl, reverse_kl


def adaptive_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    head_mass: float = 0.5,
    eps: float = 1e-4,
) -> torch.Tensor:
    """AKL = g_head FKL + g_tail RKL, g_part = gap_part / (gap_head + gap_tail), gap_part = sum over the part's
    options of |p - q| (the weights carry no gradient, as in the paper's code).

    The head is the options whose target mass strictly above them is below `head_mass` (the top options until
    their cumulative mass reaches it; tied options fall on the same side, so the order of options does not
    matter). When q = p both gaps are 0 and the weights are 1/2 each. `eps` smooths the reverse KL (see
    `probekd.losses.kl.reverse_kl`)."""
    if not 0 < head_mass <= 1:
        raise ValueError(f"head_mass must be in (0, 1], got {head_mass}")
    p, log_q, m = prepare(student_logits, target_probs, mask, temperature)
    with torch.no_grad():
        above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)  # [B, K]: target mass above option k
        head = (above < head_mass) & m
        gap = (p - log_q.exp().masked_fill(~m, 0.0)).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * (m & ~head)).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), torch.full_like(total, 0.5))
    fkl = forward_kl(student_logits, target_probs, mask, temperature=temperature)
    rkl = reverse_kl(student_logits, target_probs, mask, temperature=temperature, eps=eps)
    return w_head * fkl + (1 - w_head) * rkl
