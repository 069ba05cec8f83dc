"""Forward KL, the standard distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network")."""

from __future__ import annotations

import torch

from probekd.losses.common import check_inputs, masked_log_softmax


def forward_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p || q) per example, p = targets, q = softmax(student / T) over the valid options.

    The targets are used as given (a signal's own temperature is applied when the targets are made, see
    `probekd.targets`); the trainer multiplies by T^2 so gradients keep their scale across temperatures.
    """
    mask = check_inputs(student_logits, target_probs, mask)
    log_q = masked_log_softmax(student_logits, mask, temperature)
    p = target_probs.float().masked_fill(~mask, 0.0)
    log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    terms = torch.where(p > 0, p * (log_p - log_q.masked_fill(~mask, 0.0)), torch.zeros_like(p))
    return terms.sum(-1)
