"""LELP: pseudo-subclasses from linear projections of the teacher's cached states, learned through an extra head.

"Linear Projections of Teacher Embeddings for Few-Class Distillation" (Loo, Iliopoulos, Hu, Vee, 2024) observes
that a teacher's output distribution over few classes carries little of what its embedding knows, and passes more
through pseudo-subclasses: it finds informative linear subspaces of the teacher's embeddings outside the span of the
classifier's weights (by PCA), splits each class into subclasses along them, and trains the student to reproduce
the subclass distribution with a head of C x S outputs. probekd's classes are a question's options, all scored by
one linear probe (score_k = w . t_k), so the recipe reads:

1. **Null space of the classifier.** t_ik are the teacher's standardized states at the probe's chosen layer (the
   states hidden-state matching uses). w is the direction that reproduces the probe's logits: ridge least squares
   of the probe's log-probabilities on the states, both centred within each question (a question's logits are
   defined up to a constant). Each state loses its component along w: r_ik = t_ik - (t_ik . u) u, u = w / |w|.
   (Fitting w from the probe's targets rather than reading a saved probe keeps to the cell's label budget: the
   targets were made from the cell's labels only.)
2. **Informative subspaces.** The r_ik are centred within each question (minus the mean over the question's
   options): what is left tells a question's options apart. Uncentred, about 90-96% of the variance along the top
   directions on ARC-Easy is shared by all options of a question, which the student's head, reading one option's
   embedding, cannot see. Then the top S principal directions v_1..v_S of the centred r_ik over the training
   split's present options (the paper does a PCA per class; with options as classes and one shared scorer, the
   options are exchangeable, so one PCA over all of them).
3. **Pseudo-subclasses.** Each option k splits into 2S subclasses, the two half-axes of each direction: logits
   (+a_iks, -a_iks) / T with a_iks = r_ik . v_s / sd_s (r_ik centred), the projection in units of its standard
   deviation; q_ik = softmax over the 2S logits is the subclass distribution *within* option k.

The teacher's joint target is P(k, s) = p_ik q_ik(s), with p_i the cell's own signal targets (its marginal over
the options is exactly the signal: LELP refines any signal). The student's joint is its option softmax times
softmax(g(o_ik)), with g a linear head on the bi-encoder's option embedding o_ik. The joint KL then splits exactly
into the KL of the marginals (what the trainer's distillation term is for forward KL at T = 1; it weights it by
alpha T^2) plus

    lelp_i = sum_k p_ik KL(q_ik || softmax(g(o_ik)))

which `train.lelp` weights and adds to each row's loss. g lives on the model during training only (as the
hidden-state projection does) and is removed before the student is saved: the deployed student is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

HEAD = "probekd_lelp_head"  # the student model's attribute holding g during training


def _centred_within_questions(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`x` [N, K, ...] minus each question's mean over its present options (absent options set to 0)."""
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
    mean = (x * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
    return (x - mean) * m


def classifier_direction(states: np.ndarray, mask: np.ndarray, logits: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Unit direction u [H] whose projection best reproduces `logits` [N, K] from `states` [N, K, H] (ridge least
    squares, both centred within each question; `ridge` relative to the mean feature variance)."""
    x = _centred_within_questions(states.astype(np.float64), mask)[mask]
    y = _centred_within_questions(np.where(mask, logits, 0.0).astype(np.float64), mask)[mask]
    if np.abs(y).max(initial=0.0) <= 1e-9 * max(1.0, float(np.abs(np.where(mask, logits, 0.0)).max())):
        raise ValueError("the logits are constant within every question: no classifier direction to remove")
    gram = x.T @ x
    lam = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y)
    return w / np.linalg.norm(w)


def subclass_targets(
    states: np.ndarray, mask: np.ndarray, logits: np.ndarray, directions: int, temperature: float = 1.0
) -> np.ndarray:
    """The pseudo-subclass distribution within each option, q [N, K, 2 * directions] (rows of absent options 0),
    from the teacher's standardized states [N, K, H] and the probe's logits [N, K]; see the module docstring."""
    if directions < 1:
        raise ValueError(f"need at least one direction, got {directions}")
    u = classifier_direction(states, mask, logits)
    r = states.astype(np.float64) - (states @ u)[..., None] * u
    # within each question: what tells its options apart (the student's head sees an option, not its question)
    r = _centred_within_questions(r, mask)
    present = r[mask]
    if directions > present.shape[1] - 1:
        raise ValueError(f"{directions} directions asked of {present.shape[1]}-wide states (one is the classifier's)")
    values, vectors = np.linalg.eigh(present.T @ present / len(present))  # ascending; the rows have mean 0
    top = np.argsort(values)[::-1][:directions]
    sd = np.sqrt(np.maximum(values[top], 1e-12))
    a = (r @ vectors[:, top]) / sd  # [N, K, S]
    z = np.concatenate([a, -a], -1) / temperature
    z -= z.max(-1, keepdims=True)
    q = np.exp(z)
    q /= q.sum(-1, keepdims=True)
    q[~mask] = 0.0
    return q.astype(np.float32)


def subclass_loss(
    head_logits: torch.Tensor, subclass: torch.Tensor, marginal: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-row term [B]: sum_k marginal_ik KL(subclass_ik || softmax(head_logits_ik)) over present options, from
    the head's logits [B, K, S2], the teacher's subclass distributions [B, K, S2] and the option targets [B, K]."""
    logq = torch.log(subclass.float().clamp_min(1e-12))
    kl = (subclass.float() * (logq - torch.log_softmax(head_logits.float(), -1))).sum(-1)  # [B, K]
    return (torch.where(mask, marginal.float(), 0.0) * torch.where(mask, kl, 0.0)).sum(-1)
