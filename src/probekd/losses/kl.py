"""Forward and reverse KL.

Forward KL is the standard distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network");
reverse KL is mode-seeking (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").
"""

from __future__ import annotations

import torch

from probekd.losses.common import kl_terms, prepare, target_log


def forward_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k) per example, p = targets, q = softmax(student / T) over the valid
    options.

    The targets are used as given (a signal's own temperature is applied when the targets are made, see
    `probekd.targets`); the trainer multiplies by T^2 so gradients keep their scale across temperatures. The same
    holds for every loss of this package.
    """
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    return kl_terms(p, target_log(p, mask), log_q, mask)


def reverse_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """KL(q || p~) = sum_k q_k (log q_k - log p~_k), with p~ = (1 - K eps) p + eps the targets smoothed over the K
    valid options of each example: reverse KL is infinite where a target is 0 (hard labels) and the student is
    not, so `eps` bounds it (at log(1/eps) per unit of misplaced student mass)."""
    p, log_q, mask = prepare(student_logits, target_probs, mask, temperature)
    k = mask.sum(-1, keepdim=True).float()
    p_s = ((1 - k * eps) * p + eps).masked_fill(~mask, 0.0)
    q = log_q.exp().masked_fill(~mask, 0.0)
    return kl_terms(q, log_q.masked_fill(~mask, 0.0), target_log(p_s, mask), mask)
