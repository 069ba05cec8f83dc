"""Layer choice: on validation data only, highest accuracy, ties broken by lower log-loss, then by the earlier group
(layer; with feature `auto`, the last-token states come before the mean states)."""

from __future__ import annotations

from typing import Any

import numpy as np


def choose_layer(dev_accuracy: np.ndarray, dev_nll: np.ndarray) -> int:
    """Index (into the arrays, not the layer number) of the chosen layer."""
    acc = np.asarray(dev_accuracy, dtype=np.float64)
    nll = np.asarray(dev_nll, dtype=np.float64)
    best = np.flatnonzero(np.isclose(acc, acc.max(), rtol=0, atol=1e-12))
    return int(best[np.argmin(nll[best])])


def chosen_label(summary: dict[str, Any]) -> str:
    """`layer 16` (one feature probed) or `layer 16, mean state` (feature `auto`/`mean`): what the probe reads."""
    # chosen_feature is absent in summaries written before it existed
    feature = summary.get("chosen_feature", summary.get("config", {}).get("feature", "last"))
    if summary.get("formulation") == "option" and (feature != "last" or len(summary.get("features", [])) > 1):
        return f"layer {summary['chosen_layer']}, {feature} state"
    return f"layer {summary['chosen_layer']}"
