"""Distillation losses: pure functions behind a registry.

Every loss has the signature `loss(student_logits [B, K], target_probs [B, K], mask [B, K] | None = None, *,
temperature=1.0, **options) -> [B]` (one value per example). Masked options (mask False) take no part: their
student logits are ignored and their target probability must be 0. Reduction (example weights, normalization,
gradient accumulation) happens in one place, the trainer adapter (`probekd.student.train`), never in a loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probekd.errors import ProbekdError
from probekd.losses.kl import forward_kl

Loss = Callable[..., torch.Tensor]

_REGISTRY: dict[str, Loss] = {"fkl": forward_kl}


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
