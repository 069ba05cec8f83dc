"""Mixup for distillation: train on mixtures of two training rows in the student's embedding space.

"Understanding the Role of Mixup in Knowledge Distillation" (Choi et al., 2023) reads mixup as a way to show the
student points between the training examples, where the teacher's soft targets still say something. Here, for the
bi-encoder student (`student.head: biencoder`): each row i of a batch is paired with a row j = perm(i) that has the
same options present (rows with other option counts are never mixed, so every option has a target on both sides),
lambda ~ Beta(a, a) once per batch, and

    q~_i = lambda q_i + (1 - lambda) q_j,      o~_ik = lambda o_ik + (1 - lambda) o_jk      (mean-pooled embeddings)
    logits_i = s * cos(q~_i, o~_ik)
    loss_i = lambda * l(logits_i; p_i, y_i) + (1 - lambda) * l(logits_i; p_j, y_j),  w_i = lambda w_i + (1 - lambda) w_j

with l the row's distillation loss (soft targets p, gold y: `probekd.student.train.distill_loss`). For forward KL
and cross-entropy this is the loss against the mixed targets lambda p_i + (1 - lambda) p_j up to a constant (the
targets' entropies), so the gradients are those of target mixing. Only training batches are mixed; evaluation and
the saved student are unchanged. Config: `train.mixup` (the Beta parameter a; 0 = off).
"""

from __future__ import annotations

import torch


def same_option_pairs(option_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation [B] of a batch's rows that pairs each row with a row of the same option mask (a random one
    among them, possibly itself when it is alone)."""
    perm = torch.arange(option_mask.shape[0])
    keys = [tuple(row.tolist()) for row in option_mask.cpu()]
    for key in set(keys):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
        perm[idx] = idx[torch.randperm(len(idx), generator=generator)]
    return perm


def mix(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * a + (1 - lam) * b."""
    return lam * a + (1 - lam) * b
