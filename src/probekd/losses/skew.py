"""Skew KL and skew reverse KL (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
Models"): KL against a mixture of the two distributions, which keeps the divergence and its gradients bounded."""

from __future__ import annotations

import torch

from probekd.losses.common import kl_to_mixture, prepare, target_log


def _check(lam: float) -> None:
    if not 0 <= lam < 1:
        raise ValueError(f"skew coefficient must be in [0, 1), got {lam}")


def skew_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """SKL = KL(p || skew p + (1 - skew) q); skew = 0 is forward KL."""
    _check(skew)
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    return kl_to_mixture(p, target_log(p, mask), log_q.exp().masked_fill(~mask, 0.0), mask, skew)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """SRKL = KL(q || skew q + (1 - skew) p); finite even where a target is 0 (for skew > 0)."""
    _check(skew)
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    return kl_to_mixture(log_q.exp().masked_fill(~mask, 0.0), log_q.masked_fill(~mask, 0.0), p, mask, skew)
