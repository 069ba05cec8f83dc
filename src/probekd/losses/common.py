"""Shared pieces of the losses: input checks and masked, tempered log-probabilities."""

from __future__ import annotations

import torch


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the valid options; masked options get -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = logits.float() / temperature
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(z, -1)


def check_inputs(student_logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes; return the mask (all True when None)."""
    if student_logits.shape != target_probs.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and targets {tuple(target_probs.shape)} must both be [B, K]"
        )
    if mask is None:
        return torch.ones_like(target_probs, dtype=torch.bool)
    if mask.shape != target_probs.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(target_probs.shape)}")
    return mask.bool()
