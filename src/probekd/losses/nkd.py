"""Normalized KD (Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels"): the target class and the normalized non-target
distribution are distilled separately, so the non-target part is not scaled down when the target is confident."""

from __future__ import annotations

import torch

from probekd.losses.common import kl_terms, prepare, target_log


def normalized_kd(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    target_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """NKD = KL_bin(p_t || q_t) + gamma KL(p_\\t / (1 - p_t) || q_\\t / (1 - q_t)), t = `target_index` (the gold
    option; by default the argmax of the targets), the second term over the valid options other than t.

    Since KL(p || q) = KL_bin(p_t || q_t) + (1 - p_t) KL(normalized non-target parts), NKD is forward KL with the
    non-target part's weight (1 - p_t), which vanishes as the target grows confident, replaced by gamma: the
    paper's point. Differences from the paper, so that the loss is a divergence (>= 0, 0 when q = p): its target
    term -p_t log q_t (minimized by q_t -> 1 whatever p_t) is the binary KL here, its non-target cross-entropy is a
    KL (they differ by a constant), and both parts use q = softmax(s / T) like every loss of this package."""
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    t = p.argmax(-1) if target_index is None else target_index.long()
    is_t = torch.zeros_like(mask).scatter(-1, t[:, None], True)
    p_t = p.gather(-1, t[:, None])[:, 0]
    log_q_t = log_q.gather(-1, t[:, None])[:, 0]
    rest = mask & ~is_t
    has_rest = rest.any(-1, keepdim=True)
    # log(1 - q_t), exactly, as the log-mass of the other options (rows with no other option: 0, unused)
    log_q_not_t = torch.logsumexp(
        torch.where(has_rest, log_q.masked_fill(~rest, float("-inf")), torch.zeros_like(log_q)), -1
    )
    two_p = torch.stack([p_t, (1 - p_t).clamp_min(0)], -1)
    target_part = kl_terms(two_p, target_log(two_p, two_p > 0), torch.stack([log_q_t, log_q_not_t], -1), two_p > 0)
    p_rest = (p * rest) / (p * rest).sum(-1, keepdim=True).clamp_min(1e-30)
    log_q_rest = log_q - log_q_not_t[:, None]
    return target_part + gamma * kl_terms(p_rest, target_log(p_rest, rest), log_q_rest, rest)
