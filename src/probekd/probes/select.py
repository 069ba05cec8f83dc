"""Layer choice: on validation data only, highest accuracy, ties broken by lower log-loss, then by the earlier layer."""

from __future__ import annotations

import numpy as np


def choose_layer(dev_accuracy: np.ndarray, dev_nll: np.ndarray) -> int:
    """Index (into the arrays, not the layer number) of the chosen layer."""
    acc = np.asarray(dev_accuracy, dtype=np.float64)
    nll = np.asarray(dev_nll, dtype=np.float64)
    best = np.flatnonzero(np.isclose(acc, acc.max(), rtol=0, atol=1e-12))
    return int(best[np.argmin(nll[best])])
