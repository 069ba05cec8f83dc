"""Token-level divergences between a teacher's and a student's next-token distributions, and their per-problem mean.

The multiple-choice losses (`probekd.losses`) compare K option probabilities; here every position of a solution
compares two distributions over the vocabulary, given as logits (a vocabulary of 50k entries holds many zeros in
probability space, so everything is computed from log-softmax, where reverse KL needs no smoothing):

    fkl   KL(p || q) = sum_v p_v (log p_v - log q_v)            p = teacher, q = student (mean-seeking)
    rkl   KL(q || p)                                             (mode-seeking; self-distillation's default)
    js    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    akl   g_head fkl + g_tail rkl (Wu et al. 2024): the teacher's head (its top tokens until their mass reaches
          `head_mass`) and tail, each weighted by the student's total absolute gap to the teacher on it

with p = softmax(teacher / T) and q = softmax(student / T). `top_k` keeps the teacher's k most likely tokens
per position and renormalizes both distributions over them (the memory-saving approximation of GKD-style
trainers), stated wherever it is used; None: the whole vocabulary.

A problem's loss is the mean over its solution tokens (`per_problem`), so a long solution does not outweigh a short
one; PACED then multiplies each problem's mean by its weight in the trainer, the one place where reduction happens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

TokenDivergence = Literal["fkl", "rkl", "js", "akl"]
TOKEN_DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "js", "akl")


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "teacher and student must share a vocabulary"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    if top_k is not None and top_k < t.shape[-1]:
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    return torch.log_softmax(s, -1), torch.log_softmax(t, -1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    head_mass: float = 0.5,
    top_k: int | None = None,
) -> torch.Tensor:
    """The divergence `kind` (fkl, rkl, js, akl) at every position: logits [..., V] -> values [...]."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, top_k)
    p, q = log_p.exp(), log_q.exp()
    if kind == "fkl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "js":
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if kind == "akl":
        if not 0 < head_mass <= 1:
            raise ValueError(f"head_mass must be in (0, 1], got {head_mass}")
        with torch.no_grad():  # the mixing weights carry no gradient, as in the paper's code
            sorted_p, order = p.sort(-1, descending=True)
            head = torch.zeros_like(p, dtype=torch.bool).scatter(
                -1, order, (sorted_p.cumsum(-1) - sorted_p) < head_mass
            )
            gap = (p - q).abs()
            g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
            total = g_head + g_tail
            w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), torch.full_like(total, 0.5))
        return w_head * (p * (log_p - log_q)).sum(-1) + (1 - w_head) * (q * (log_q - log_p)).sum(-1)
    raise ValueError(f"unknown token divergence {kind!r}; expected one of {', '.join(TOKEN_DIVERGENCES)}")


def per_problem(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of per-token values [B, T] over each row's solution tokens (mask [B, T]) -> [B]; a row without
    any solution token is an error (it would train on nothing and divide by zero)."""
    mask = mask.bool()
    counts = mask.sum(-1)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} problems have no solution tokens to distil")
    return (values * mask).sum(-1) / counts
