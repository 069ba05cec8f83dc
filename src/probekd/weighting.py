"""PACED: per-example weights from the student's pass rate (arXiv 2603.11178), and the baselines it is compared to.

    w(p) = p^alpha (1 - p)^beta           (0 at p in {0, 1}; alpha = beta = 1: most weight at p = 1/2)

p is the student's pass rate on an example: `exact`, its probability of the gold option, or `sampled`, the share of
`samples` draws from its option distribution that hit the gold option (the paper's K rollouts). Rows without a gold
label (the unlabelled pool of the semi-supervised mode) use the argmax of their soft target instead.

Weights are normalized to mean 1 over the training rows (`normalize`), so the weighted loss keeps the scale of the
unweighted one and the learning rate means the same with and without weighting; the trainer then applies them in
its usual reduction sum_i w_i l_i / n. `hard_filter` is the baseline that keeps every example whose pass rate is
strictly between 0 and 1 (weight 1) and drops the rest.

`ddk` (DDK, "Distilling Domain Knowledge for Efficient LLMs", Liu et al., 2024) weights by domain, not by example:
the rows of a domain where the student trails its targets most get more of the loss (`ddk_mixture`,
`domain_weights`); `influence` (KD-AIF) weights each row by its influence on the dev loss
(`probekd.student.influence`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from probekd.errors import ProbekdError

Scheme = Literal["none", "paced", "hard_filter", "influence", "ddk"]


class WeightingConfig(BaseModel):
    """How training examples are weighted (identical for every signal)."""

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = Field(
        "none",
        description="`none`, `paced` (p^alpha (1-p)^beta), `hard_filter` (0 < p < 1), or `influence` (KD-AIF: "
        "sigmoid of each row's first-order influence on the dev loss, `probekd.student.influence`), or `ddk` (DDK: "
        "a domain mixture that follows the student's gap to its targets per domain; needs a domain per question).",
    )
    alpha: float = Field(1.0, ge=0, description="PACED exponent of p.")
    beta: float = Field(1.0, ge=0, description="PACED exponent of 1 - p.")
    pass_rate: Literal["exact", "sampled"] = Field(
        "exact",
        description="`exact`: the student's probability of the gold option; `sampled`: hits in `samples` draws.",
    )
    samples: int = Field(8, ge=1, description="Draws per example for `sampled` pass rates.")
    filter_tol: float = Field(
        0.0, ge=0, lt=0.5, description="`hard_filter` drops p <= tol or p >= 1 - tol (use > 0 with exact rates)."
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0,
        description="Epochs of unweighted training before the pass rates are first computed (a fresh "
        "head knows nothing); 0: computed from the student as it starts.",
    )
    refresh_epochs: float = Field(0.0, ge=0, description="Recompute pass rates every this many epochs; 0: once.")
    ddk_smoothing: float = Field(
        0.5,
        gt=0,
        le=1,
        description="`ddk`: the step of each update of the domain mixture towards the gap-scaled target mixture "
        "(r = a r* + (1 - a) r_prev); 1: jump to the target.",
    )
    influence_scale: float = Field(
        1.0, gt=0, description="`influence`: kappa in sigmoid(kappa * s / std(s)); larger = weights further apart."
    )


def paced_weights(p: np.ndarray, alpha: float = 1.0, beta: float = 1.0) -> np.ndarray:
    """p^alpha (1 - p)^beta, elementwise (0 at p in {0, 1} for positive exponents)."""
    p = np.asarray(p, dtype=np.float64)
    if ((p < 0) | (p > 1)).any() or not np.isfinite(p).all():
        raise ProbekdError("pass rates must lie in [0, 1]")
    return np.power(p, alpha) * np.power(1.0 - p, beta)


def hard_filter_weights(p: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """1 where tol < p < 1 - tol, else 0: drop what the student always or never solves."""
    p = np.asarray(p, dtype=np.float64)
    return ((p > tol) & (p < 1.0 - tol)).astype(np.float64)


def pass_rates(
    probs: np.ndarray,
    gold: np.ndarray,
    mode: Literal["exact", "sampled"] = "exact",
    samples: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """The student's pass rate per row from its option probabilities [N, K] and the gold option per row [N]."""
    if probs.ndim != 2 or gold.shape != (probs.shape[0],):
        raise ProbekdError(f"pass rates need probs [N, K] and gold [N], got {probs.shape} and {gold.shape}")
    if ((gold < 0) | (gold >= probs.shape[1])).any():
        raise ProbekdError("gold options must lie in [0, K)")
    p = np.clip(probs[np.arange(len(gold)), gold].astype(np.float64), 0.0, 1.0)
    if mode == "exact":
        return p
    # the number of hits in `samples` draws from the option distribution is Binomial(samples, p)
    return np.random.default_rng(seed).binomial(samples, p) / samples


def normalize(w: np.ndarray) -> np.ndarray:
    """Scale weights to mean 1; all-zero weights are an error (nothing would be trained)."""
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0 or w.sum() <= 0:
        raise ProbekdError(
            "every training example has weight 0 (the student solves all or none of them); "
            "use a warm-up, another scheme, or sampled pass rates"
        )
    return w * (w.size / w.sum())


def scheme_weights(cfg: WeightingConfig, p: np.ndarray) -> np.ndarray:
    """The unnormalized weights of `cfg.scheme` for pass rates p (`none`: all 1)."""
    if cfg.scheme == "paced":
        return paced_weights(p, cfg.alpha, cfg.beta)
    if cfg.scheme == "hard_filter":
        return hard_filter_weights(p, cfg.filter_tol)
    return np.ones_like(p, dtype=np.float64)


def influence_weights(scores: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """KD-AIF's weights from influence scores s (positive: the row's gradient lowers the dev loss):
    sigmoid(scale * s / std(s)), normalized to mean 1; all 1 when the scores do not vary."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ProbekdError("influence scores must be finite")
    sd = s.std()
    if sd == 0:
        return np.ones_like(s)
    return normalize(1.0 / (1.0 + np.exp(-scale * s / sd)))


def ddk_gaps(student_loss: np.ndarray, target_loss: np.ndarray, domains: np.ndarray, n_domains: int) -> np.ndarray:
    """The student's gap to its targets per domain [D]: mean student loss minus mean target loss over the domain's
    rows (`domains` [N] in 0..D-1), the log of DDK's perplexity ratio; finite for one-hot targets (loss 0), where it
    is the student's own loss. A domain without rows gets 0."""
    count = np.bincount(domains, minlength=n_domains)
    gap = np.bincount(domains, weights=student_loss - target_loss, minlength=n_domains)
    return np.where(count > 0, gap / np.maximum(count, 1), 0.0)


def ddk_mixture(previous: np.ndarray, gaps: np.ndarray, shares: np.ndarray, smoothing: float) -> np.ndarray:
    """DDK's smooth update of the domain mixture [D]: the target mixture is the data's own shares scaled by each
    domain's discrepancy factor, r* = softmax_d(gap_d + log share_d) (proportional to share_d exp(gap_d)), and the
    mixture moves a step `smoothing` towards it from `previous`: r = smoothing r* + (1 - smoothing) previous. Equal
    gaps leave the data's mixture as it is; a domain the student trails by one nat more gets e times its share."""
    z = np.asarray(gaps, dtype=np.float64) + np.log(np.maximum(np.asarray(shares, dtype=np.float64), 1e-300))
    target = np.exp(z - z.max())
    target /= target.sum()
    return smoothing * target + (1.0 - smoothing) * np.asarray(previous, dtype=np.float64)


def domain_weights(domains: np.ndarray, mixture: np.ndarray) -> np.ndarray:
    """Row weights [N] that give domain d the share mixture[d] of the loss: w_i = mixture[d_i] / share of d_i's rows
    (mean 1 when the mixture sums to 1). In expectation the same gradient as sampling the rows by the mixture, which
    DDK does, with every row still seen once per epoch (length-grouped batches and the epoch count unchanged)."""
    count = np.bincount(domains, minlength=len(mixture)).astype(np.float64)
    share = count / count.sum()
    return np.asarray(mixture, dtype=np.float64)[domains] / share[domains]


def weights_for(cfg: WeightingConfig, probs: np.ndarray, gold: np.ndarray, seed: int = 0) -> np.ndarray:
    """Normalized weights of `cfg` from the student's probabilities and the gold (or pseudo-gold) options (not for
    `influence`, whose weights come from gradients: `influence_weights`, nor `ddk`, whose come from the domains'
    losses: `ddk_mixture`, `domain_weights`)."""
    if cfg.scheme in ("influence", "ddk"):
        raise ProbekdError(f"{cfg.scheme} weights do not come from the student's pass rates alone")
    if cfg.scheme == "none":
        return np.ones(len(gold))
    return normalize(scheme_weights(cfg, pass_rates(probs, gold, cfg.pass_rate, cfg.samples, seed)))


def weight_stats(w: np.ndarray, p: np.ndarray | None = None, bins: int = 10) -> dict[str, Any]:
    """What a log should say about weights: effective sample size (sum w)^2 / sum w^2 (also as a share of N), the
    share of zero weights, and a histogram (counts over `bins` equal bins from 0 to max w)."""
    w = np.asarray(w, dtype=np.float64)
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else 0.0
    counts, edges = np.histogram(w, bins=bins, range=(0.0, float(w.max()) if w.size and w.max() > 0 else 1.0))
    out: dict[str, Any] = {
        "n": int(w.size),
        "ess": round(ess, 2),
        "ess_share": round(ess / w.size, 4) if w.size else 0.0,
        "zero_share": round(float((w == 0).mean()), 4) if w.size else 0.0,
        "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 4) for e in edges]},
    }
    if p is not None:
        out["mean_pass_rate"] = round(float(np.mean(p)), 4)
    return out
