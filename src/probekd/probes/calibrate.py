"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that minimizes the validation log-loss of logits / T.

It changes confidence, never the argmax, so it cannot change a probe's accuracy or the chosen layer.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar

from probekd.probes.crossfit import held_out_nll


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, *, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """T minimizing the mean NLL of softmax(logits / T) at the gold options y (logits [N, K], -inf = missing)."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(held_out_nll(logits / math.exp(log_t), y).mean())

    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))
