"""Metrics: accuracy with bootstrap intervals, calibration error, agreement, and means over seeds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats


def bootstrap_ci(
    correct: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of per-example scores `correct` [N]."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def expected_calibration_error(probs: np.ndarray, answers: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width confidence bins of |accuracy - confidence| x share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == answers
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def option_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Probabilities [N, K] from answer scores [N, K]: softmax over each row's valid options (0 elsewhere), e.g.
    the teacher's own answer distribution at temperature 1 from its cached scores."""
    z = np.where(mask, scores, -np.inf)
    z = z - z.max(1, keepdims=True)
    e = np.where(mask, np.exp(z), 0.0)
    return e / e.sum(1, keepdims=True)


def normalized_entropy(probs: np.ndarray, mask: np.ndarray) -> float:
    """Mean over questions of the prediction's entropy divided by ln K (K = that question's options): 1 for a uniform
    guess, 0 for certainty. A student near 1 barely moved from uniform (under-trained or collapsed), however its
    accuracy reads; questions with one option are left out."""
    k = mask.sum(1)
    keep = k > 1
    p = np.where(mask, probs, 0.0)[keep]
    h = -np.where(p > 0, p * np.log(np.clip(p, 1e-30, None)), 0.0).sum(1)
    return float((h / np.log(k[keep])).mean()) if keep.any() else float("nan")


def classification_metrics(
    probs: np.ndarray, answers: np.ndarray, others: dict[str, np.ndarray] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Accuracy (+ bootstrap 95% interval), ECE, mean log-loss, and the share of examples on which the prediction
    agrees with each of `others` (name -> probabilities or predictions [N]) on the labelled rows."""
    lab = answers >= 0
    p, y = probs[lab], answers[lab]
    pred = p.argmax(1)
    acc, lo, hi = bootstrap_ci(pred == y, seed=seed)
    out: dict[str, Any] = {
        "n": int(lab.sum()),
        "accuracy": acc,
        "accuracy_ci": [lo, hi],
        "ece": expected_calibration_error(p, y),
        "nll": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else float("nan"),
    }
    for name, o in (others or {}).items():
        o = o[lab]
        other_pred = o.argmax(1) if o.ndim == 2 else o
        out[f"agreement_{name}"] = float((pred == other_pred).mean())
    return out


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a Student-t interval over seeds; half-width nan with one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def chance_upper(chance: float, n: int, level: float = 0.95) -> float:
    """The upper end of the central `level` binomial interval of a uniform guesser's accuracy on `n` questions
    (mean chance `chance`): the smallest accuracy k / n with P(X > k) <= (1 - level) / 2 for X ~ Bin(n, chance).
    An accuracy at or below it cannot be told from guessing on those questions."""
    if n < 1:
        return float("nan")
    return float(stats.binom.ppf((1 + level) / 2, n, chance)) / n
