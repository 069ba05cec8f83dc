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


def target_log(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p on the valid options where p > 0; 0 elsewhere (the terms those entries weigh are 0)."""
    return torch.where((p > 0) & mask, p.clamp_min(1e-30).log(), torch.zeros_like(p))


def prepare(
    student_logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs as (p, log q, mask): targets p (0 on masked options, as float), the student's tempered
    log-probabilities log q = log softmax(s / T) over the valid options (-inf on masked ones), and the mask."""
    mask = check_inputs(student_logits, target_probs, mask)
    log_q = masked_log_softmax(student_logits, mask, temperature)
    return target_probs.float().masked_fill(~mask, 0.0), log_q, mask


def kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p || r) per row, sum over valid options with p > 0 of p (log p - log r)."""
    keep = (p > 0) & mask
    return torch.where(keep, p * (log_p - torch.where(keep, log_r, torch.zeros_like(log_r))), torch.zeros_like(p)).sum(
        -1
    )


def kl_to_mixture(
    x: torch.Tensor, log_x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, weight: float
) -> torch.Tensor:
    """KL(x || weight x + (1 - weight) y) per row (the skew KL and skew reverse KL)."""
    mix = (weight * x + (1 - weight) * y).masked_fill(~mask, 0.0)
    return kl_terms(x, log_x, target_log(mix, mask), mask)
