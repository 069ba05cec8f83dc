"""Jensen-Shannon divergence (as a distillation loss, e.g. Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", generalized JSD)."""

from __future__ import annotations

import torch

from probekd.losses.common import kl_terms, prepare, target_log


def jensen_shannon(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta = 0.5 is the symmetric
    Jensen-Shannon divergence (bounded by log 2)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    q = log_q.exp().masked_fill(~mask, 0.0)
    log_m = target_log((beta * p + (1 - beta) * q).masked_fill(~mask, 0.0), mask)
    return beta * kl_terms(p, target_log(p, mask), log_m, mask) + (1 - beta) * kl_terms(
        q, log_q.masked_fill(~mask, 0.0), log_m, mask
    )
