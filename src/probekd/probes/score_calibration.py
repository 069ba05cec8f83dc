"""Calibrating the teacher's own answer scores: `softmax(a * score + b)` over each question's options, cross-fitted.

Why not a probe on the scores. The earlier `teacher_calibrated` fitted the probe machinery to the scores (features:
the standardized score and a one-hot of the option position, an L2 path chosen by nested CV, a dev temperature).
On ARC-Easy (SmolLM2, option log-likelihoods) its targets were almost uniform (normalized entropy 0.94) and less
accurate than the raw teacher on dev (0.414 against 0.439; 0.340 at 5% of the labels). Two causes, measured on the
committed run's answers: the flattening is calibration itself (the raw scores are over-confident: their log-loss
1.74 is above a uniform guess's ln 4 = 1.39; the log-loss-optimal scale 0.22, a temperature of 4.5, gives 1.31 and
normalized entropy 0.94: that is what a 44%-accurate answer honestly carries), and the accuracy loss came from the
per-position biases, fitted to noise in how the gold answers fall on positions, which move the argmax on dev.

So the calibration here is two small candidates, fitted by log-loss on the labelled training rows and chosen on
(the cell's) dev labels: the biases are kept only when they make the calibration strictly more accurate on dev.
- `temperature`: one scale `a > 0` (the inverse temperature, unpenalized). It never moves the argmax, so its dev
  accuracy is the raw teacher's: the chosen candidate is always at least as accurate on dev as the raw teacher.
- `temperature+bias`: the scale and one bias per option position (a light L2, `BIAS_L2`, keeps a rare position
  such as ARC's fifth option finite). It wins where the teacher prefers one position, e.g. a letter teacher that
  answers "A" to everything.

No leakage: a labelled training row's logits come from the candidate fitted on the other folds (folds from the ids,
as for the probes); every other row gets the one fitted on all labelled rows. The targets are `softmax(logits)`
(no further temperature: the scale is one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from probekd.errors import ProbekdError
from probekd.probes.crossfit import fold_ids, held_out_nll

VARIANTS = ("temperature", "temperature+bias")
BIAS_L2 = 1e-2  # on the mean log-loss, on the position biases only


@dataclass
class ScoreCalibration:
    """The chosen calibration of the teacher's scores and its logits on every split."""

    variant: str  # `temperature` or `temperature+bias`
    logits: dict[str, torch.Tensor]  # split -> [N, K] (-inf on missing options); train out-of-fold where labelled
    scale: float  # `a` of the model fitted on all labelled rows (1 / temperature)
    bias: list[float]  # its position biases (zeros for `temperature`)
    dev_accuracy: float  # on the dev labels used for the choice
    dev_nll: float
    cv_accuracy: float  # out-of-fold, on the labelled training rows
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> its dev and cv numbers

    def probs(self, split: str) -> torch.Tensor:
        """Calibrated probabilities [N, K] on `split`."""
        return torch.softmax(self.logits[split], -1)


def _centered(scores: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Scores [N, K] as float64 minus each row's best valid score (softmax is unchanged), 0 on missing options."""
    s = torch.as_tensor(np.where(mask, scores, -np.inf), dtype=torch.float64)
    top = s.amax(1, keepdim=True).clamp_min(-1e30)
    return torch.where(torch.as_tensor(mask), s - top, torch.zeros_like(s))


def _logits(s: torch.Tensor, mask: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * s + b).masked_fill(~mask, float("-inf"))


def _fit(s: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a, b) minimizing the mean log-loss of rows `y` (all labelled) + BIAS_L2 / 2 ||b||^2."""
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(s.shape[1], dtype=torch.float64, requires_grad=bias)
    params = [log_a, b] if bias else [log_a]
    opt = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = held_out_nll(_logits(s, mask, log_a, b), y).mean() + 0.5 * BIAS_L2 * (b * b).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return log_a.detach(), b.detach()


def calibrate_scores(
    scores: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    train_ids: list[str],
    y_train: np.ndarray,
    y_dev: np.ndarray,
    *,
    n_folds: int = 5,
    seed: int = 0,
) -> ScoreCalibration:
    """Fit both candidates on the labelled training rows (`y_train` >= 0; -1 elsewhere), cross-fitted in `n_folds`
    folds of the ids (`seed`), and choose one on the dev rows with `y_dev` >= 0. `scores` and `masks`: split ->
    [N, K] (K the same on every split; `train` and `dev` required)."""
    for need in ("train", "dev"):
        if need not in scores:
            raise ProbekdError(f"calibrating the teacher's scores needs the {need!r} split")
    s = {k: _centered(v, masks[k]) for k, v in scores.items()}
    m = {k: torch.as_tensor(np.asarray(v, dtype=bool)) for k, v in masks.items()}
    y = torch.as_tensor(y_train).long()
    lab = (y >= 0).numpy()
    n_lab = int(lab.sum())
    if n_lab < 2 * n_folds:
        raise ProbekdError(
            f"only {n_lab} labelled training examples; calibrating the teacher with {n_folds}-fold cross-fitting "
            f"needs at least {2 * n_folds}"
        )
    yd = torch.as_tensor(y_dev).long()
    lab_dev = yd >= 0
    if not bool(lab_dev.any()):
        raise ProbekdError("the dev split has no labels; calibrating the teacher needs them to choose the variant")
    folds = np.full(len(train_ids), -1)
    folds[lab] = fold_ids([i for i, ok in zip(train_ids, lab, strict=True) if ok], n_folds, seed)
    fits = []
    for variant in VARIANTS:
        bias = variant == "temperature+bias"
        full = _fit(s["train"][lab], m["train"][lab], y[lab], bias)
        logits = {k: _logits(s[k], m[k], *full) for k in s}
        for f in range(n_folds):
            out, rows = torch.from_numpy(lab & (folds != f)), torch.from_numpy(folds == f)
            part = _fit(s["train"][out], m["train"][out], y[out], bias)
            logits["train"][rows] = _logits(s["train"][rows], m["train"][rows], *part)
        ld, lt = logits["dev"][lab_dev], logits["train"][torch.from_numpy(lab)]
        numbers = {
            "dev_accuracy": float((ld.argmax(-1) == yd[lab_dev]).double().mean()),
            "dev_nll": float(held_out_nll(ld, yd[lab_dev]).mean()),
            "cv_accuracy": float((lt.argmax(-1) == y[torch.from_numpy(lab)]).double().mean()),
            "scale": float(full[0].exp()),
        }
        fits.append((variant, logits, full, numbers))
    # the biases must earn their place: strictly more accurate on dev (a tie keeps the argmax of the raw teacher)
    best = int(fits[1][3]["dev_accuracy"] > fits[0][3]["dev_accuracy"] + 1e-12)
    variant, logits, (log_a, b), numbers = fits[best]
    return ScoreCalibration(
        variant=variant,
        logits={k: v.float() for k, v in logits.items()},
        scale=float(log_a.exp()),
        bias=[float(x) for x in b],
        dev_accuracy=numbers["dev_accuracy"],
        dev_nll=numbers["dev_nll"],
        cv_accuracy=numbers["cv_accuracy"],
        candidates={v: {k: round(x, 4) for k, x in n.items()} for v, _, _, n in fits},
    )
