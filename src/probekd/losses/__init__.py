"""Distillation losses: pure functions behind a registry.

Every loss has the signature `loss(student_logits [B, K], target_probs [B, K], mask [B, K] | None = None, *,
temperature=1.0, **options) -> [B]` (one value per example). Masked options (mask False) take no part: their
student logits are ignored and their target probability must be 0. Reduction (example weights, normalization,
gradient accumulation) happens in one place, the trainer adapter (`probekd.student.train`), never in a loss;
`sinkhorn` is batch-level (an example's value depends on its batch; see its docstring).

    fkl       forward KL, KL(p || q)                      rkl   reverse KL, KL(q || p), targets smoothed by eps
    js        Jensen-Shannon (beta)                        skl   skew KL, KL(p || a p + (1-a) q)
    srkl      skew reverse KL, KL(q || a q + (1-a) p)     akl   adaptive KL: head/tail mix of fkl and rkl
    sinkhorn  SinKD: entropic OT between the batch's target and student rows
    nkd       normalized KD: target and normalized non-target parts

p = targets, q = softmax(student_logits / T) over the valid options, for every loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probekd.errors import ProbekdError
from probekd.losses.akl import adaptive_kl
from probekd.losses.js import jensen_shannon
from probekd.losses.kl import forward_kl, reverse_kl
from probekd.losses.nkd import normalized_kd
from probekd.losses.sinkhorn import sinkhorn
from probekd.losses.skew import skew_kl, skew_reverse_kl

Loss = Callable[..., torch.Tensor]

_REGISTRY: dict[str, Loss] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "js": jensen_shannon,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
    "akl": adaptive_kl,
    "sinkhorn": sinkhorn,
    "nkd": normalized_kd,
}


def register(name: str, fn: Loss) -> None:
    """Add a loss under `name` (a plug-in's own divergence, for instance)."""
    if name in _REGISTRY:
        raise ProbekdError(f"loss {name!r} is already registered")
    _REGISTRY[name] = fn


def get(name: str) -> Loss:
    """The loss called `name`; an unknown name is an error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ProbekdError(f"unknown loss {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    """Registered loss names."""
    return sorted(_REGISTRY)
