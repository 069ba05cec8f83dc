"""KD-AIF's influence weights: how much each training row's gradient points the way that lowers the dev loss.

"Knowledge Distillation with Adapted Weight" (Wu et al., 2025, KD-AIF) weights each training example by its
influence on the validation loss (Koh and Liang's influence function, -grad L_dev^T H^-1 grad L_i) passed through a
sigmoid. The exact influence needs the inverse Hessian of the whole student; the tractable approximation here is
the usual one for large models (TracIn-style, first order):

- only the parameters theta of one layer: the last `nn.Linear` the student's forward calls whose output reaches
  the loss (MiniLM's bi-encoder: the last transformer layer's output projection, 384 x 1536 + 384);
- H replaced by the identity, so the score of row i is s_i = <grad_theta L_dev, grad_theta l_i>, positive when a
  step on row i lowers the dev loss (L_dev: the mean cross-entropy of the dev rows' gold options; l_i: row i's own
  training loss, the same distillation loss the trainer minimizes);
- weights w_i = sigmoid(kappa * s_i / std(s)), normalized to mean 1 (`probekd.weighting.influence_weights`).

The per-row gradients are never materialized: for a linear layer y = W x + b, row i's gradient is
sum_t delta_t x_t^T (and sum_t delta_t for b) over the positions t of that row, so <G, grad l_i> = sum_t delta_t^T G_W
x_t + delta_t^T G_b, read from forward and backward hooks in one batched backward of sum_i l_i (rows do not interact
in the student's forward, so delta_t of a row's positions is the gradient of that row's loss alone). Cost: one
forward and backward pass over the training rows and one over dev per computation, like one epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

RowLoss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> per-row losses [B]


def influential_layer(model: nn.Module, loss: RowLoss, batch: dict[str, torch.Tensor]) -> nn.Linear:
    """The last trainable `nn.Linear` called in the forward of `batch` whose output gets a nonzero gradient from the
    loss (a pooler the loss never reads, a frozen layer, are skipped)."""
    called: list[tuple[nn.Linear, torch.Tensor]] = []

    def keep(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.retain_grad()
            called.append((module, output))  # type: ignore[arg-type]

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.enable_grad():
            loss(model, batch).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    for module, out in reversed(called):
        if module.weight.requires_grad and out.grad is not None and bool(out.grad.abs().sum() > 0):
            return module
    raise ValueError("no linear layer of the student receives a gradient from its loss")


def layer_gradient(
    model: nn.Module, layer: nn.Linear, loss: RowLoss, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient of the mean of `loss` over every row of `batches` w.r.t. `layer`'s weight and bias."""
    model.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for batch in batches:
            per = loss(model, batch)
            per.sum().backward()
            n += len(per)
    gw = layer.weight.grad.detach().clone() / max(n, 1)  # type: ignore[union-attr]
    gb = layer.bias.grad.detach().clone() / max(n, 1) if layer.bias is not None else None  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    return gw, gb


def gradient_dots(
    model: nn.Module,
    layer: nn.Linear,
    loss: RowLoss,
    batch: dict[str, torch.Tensor],
    direction: tuple[torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """<direction, grad_layer l_i> for each row i of `batch` [B], from one batched backward (see the module
    docstring). Each call of `layer` in the forward has a leading dimension of B x m (m positions or options per
    row, e.g. the bi-encoder's question call and its options call); its entries are summed into their row."""
    gw, gb = direction
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of each call

    def keep(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        output.retain_grad()
        calls.append((inputs[0].detach(), output))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            per = loss(model, batch)
            per.sum().backward()
    finally:
        handle.remove()
    b = len(per)
    dots = torch.zeros(b, dtype=torch.float64, device=per.device)
    for x, out in calls:
        if out.grad is None:
            continue
        lead = x.shape[0]
        if lead % b:
            raise ValueError(f"a call of the layer has leading dimension {lead}, not a multiple of the {b} rows")
        delta = out.grad.detach().reshape(lead, -1, out.shape[-1]).float()  # [lead, positions, out]
        xs = x.reshape(lead, -1, x.shape[-1]).float()  # [lead, positions, in]
        # delta^T G_W x: the matmul in float32 (the cost: positions x out x in per row), the sums in float64
        per_pos = ((delta @ gw.float()) * xs).sum(-1, dtype=torch.float64)
        if gb is not None:
            per_pos = per_pos + (delta * gb.float()).sum(-1, dtype=torch.float64)
        dots += per_pos.sum(-1).reshape(b, lead // b).sum(-1)
    model.zero_grad(set_to_none=True)
    return dots.cpu()
