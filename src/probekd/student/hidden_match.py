"""Hidden-state matching: an extra training term that pulls the student's option embeddings towards the teacher's
cached hidden states, through a learned linear projection.

"Distiller: A Systematic Study of Model Distillation Methods in NLP" (He et al., 2021) found the distillation of
intermediate representations the most important part of a KD pipeline, and, among its objectives, MI-alpha the best.
Here the teacher side is the state the probe stage chose (its (feature, layer) group, `RUN/probes/summary.json`),
read from the teacher cache for each training row: one vector t_ik per present option k of row i, standardized per
dimension over the training rows' present options (the residual stream has a few dimensions hundreds of times
larger than the rest). The student side is the bi-encoder's mean-pooled option embedding o_ik, mapped by a learned
W (bias included) to z_ik = W o_ik in the teacher's width. Over the M present options of a batch:

- `mse`:      mean_ik ||z_ik - t_ik||^2 / H_t
- `cosine`:   mean_ik (1 - cos(z_ik, t_ik))
- `mi_alpha`: -I_alpha, the interpolated lower bound on the mutual information of Poole et al. ("On Variational
  Bounds of Mutual Information", 2019, eq. 12) with the critic f(t, z) = cos(t, z) / tau (tau = 0.1) and a constant
  baseline a(z) = 1, on the M x M critic scores of the batch (the other options, of the same question and of the
  other questions, are the negatives). alpha = 1 is a leave-one-out InfoNCE (the marginal term is exactly 1),
  alpha = 0 the NWJ/TUBA bound 1 + mean_i f_ii - mean_{i != j} exp(f_ij); in between the bias/variance trade-off
  Distiller's MI-alpha is named after.

The term, times `train.hidden_match`, is added to the batch's distillation loss; W lives on the student model during
training only (so checkpoints resume it) and is removed before the student is saved. Pure functions here; the
trainer (`probekd.student.train`) and the cell preparation (`probekd.experiment`) call them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

MatchLoss = Literal["mse", "cosine", "mi_alpha"]
PROJECTION = "probekd_hidden_projection"  # the student model's attribute holding W during training
CRITIC_TEMPERATURE = 0.1


def standardize_states(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Teacher states [N, K, H] standardized per dimension by the mean and standard deviation over the present
    options (`mask` [N, K]); absent options set to 0. Dimensions that do not vary keep scale 1."""
    present = states[mask]
    mean = present.mean(0)
    std = present.std(0)
    std = np.where(std > 1e-8 * max(float(std.max(initial=0.0)), 1e-30), std, 1.0)
    out = (states - mean) / std
    out[~mask] = 0.0
    return out.astype(np.float32)


def _log_loo_mean_exp(scores: torch.Tensor) -> torch.Tensor:
    """L[i, j] = log( mean_{k != j} exp(scores[i, k]) ) for an [M, M] matrix (M >= 2): each row's log-mean-exp with
    column j held out, as a logsumexp over the row with that entry masked (exact even where one entry dominates the
    row; M^3 work, a few hundred thousand entries at a batch's M of 64-80 options)."""
    m = scores.shape[1]
    held_out = torch.eye(m, dtype=torch.bool, device=scores.device)  # [j, k]: k == j is left out for column j
    rows = scores[:, None, :].expand(m, m, m).masked_fill(held_out[None], float("-inf"))  # [i, j, k]
    return torch.logsumexp(rows, -1) - math.log(m - 1)


def mi_alpha_bound(scores: torch.Tensor, alpha: float, log_baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Poole et al.'s interpolated bound I_alpha on a batch's critic scores [M, M], scores[i, j] = f(x_i, y_j) with
    (x_i, y_i) the joint pairs; `log_baseline` [M] = log a(y_i) (default 0: a = 1). A scalar to maximize."""
    m = scores.shape[0]
    if m < 2:
        return scores.new_zeros(())
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = scores.new_zeros(m) if log_baseline is None else log_baseline
    nce = _log_loo_mean_exp(scores)  # [M, M]
    other = base[:, None].expand(m, m)
    if alpha == 1.0:
        mixed = nce
    elif alpha == 0.0:
        mixed = other
    else:  # log(alpha e^nce + (1 - alpha) e^baseline)
        mixed = torch.logaddexp(nce + math.log(alpha), other + math.log1p(-alpha))
    off = ~torch.eye(m, dtype=torch.bool, device=scores.device)
    diag = torch.diagonal(mixed)
    marginal = torch.exp(torch.logsumexp((scores - diag[:, None])[off], 0) - math.log(m * (m - 1)))
    joint = (torch.diagonal(scores)[:, None] - mixed)[off].mean()
    return 1 + joint - marginal


def match_loss(
    kind: MatchLoss, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """The matching term (a scalar to minimize) between projected student embeddings [B, K, H] and standardized
    teacher states [B, K, H] over the present options `mask` [B, K]; see the module docstring."""
    z, t = student[mask].float(), teacher[mask].float()
    if z.shape[0] == 0:
        return student.sum() * 0.0
    if kind == "mse":
        return ((z - t) ** 2).mean()
    if kind == "cosine":
        return (1 - nn.functional.cosine_similarity(z, t, dim=-1)).mean()
    if kind == "mi_alpha":
        scores = nn.functional.normalize(t, dim=-1) @ nn.functional.normalize(z, dim=-1).T / CRITIC_TEMPERATURE
        return -mi_alpha_bound(scores, alpha)
    raise ValueError(f"unknown hidden-state matching loss {kind!r}; known: mse, cosine, mi_alpha")
