"""Soft targets as data: example ids + N x K probabilities + where they came from.

The trainer never knows which signal made its targets. Five sources:
- `hard`: the gold option, one-hot (labelled rows only);
- `smoothed`: label smoothing, the one-hot mixed with uniform over the row's options (labelled rows only), by
  default as soft as the probe's targets of the same labels (mean normalized entropy matched): the baseline that
  tells a soft target's regularization from the probe's knowledge;
- `teacher`: softmax of the teacher's own answer scores (letter logits, or length-normalized option
  log-likelihoods) at a temperature;
- `probe`: the chosen layer's probe, cross-fitted: a labelled training row's probabilities come from probes that
  never saw its label, unlabelled rows (the pool) and other splits get the probe fitted on all labelled rows;
- `teacher_calibrated`: the teacher's scores calibrated on the same labels as the probe, cross-fitted (a scale,
  and position biases where they help on dev: `probekd.probes.score_calibration`). The fair logit-KD baseline: at
  least as accurate on dev as the raw teacher, and free of what plain logit-KD cannot remove, e.g. a preference
  for one letter.

For a labelled fraction of the training split the probe and the calibrated teacher are refitted on that fraction
only (`signal_targets`), so a student trained on a fraction never sees labels outside it through its targets; with
a dev subset (`grid.dev: proportional`) only its labels choose the layer, the temperature and the calibration.
What is shared by all rows: the layer and the temperature, both chosen on dev with the probe fitted on all
labelled rows (one index and one scalar, as in the probe stage); a row's logits never depend on its own label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from probekd.atomic import write_npz
from probekd.errors import ProbekdError
from probekd.evaluate import normalized_entropy
from probekd.probes.pipeline import LayerFeatures, LayerFit, ProbeConfig, fit_layers
from probekd.probes.score_calibration import calibrate_scores
from probekd.teacher.cache import TeacherCache

Signal = Literal["hard", "smoothed", "teacher", "probe", "teacher_calibrated"]
SIGNALS: tuple[str, ...] = ("hard", "smoothed", "teacher", "probe", "teacher_calibrated")


@dataclass
class SoftTargets:
    """Probabilities [N, K] over each example's options (0 on missing options), keyed by example id."""

    ids: list[str]
    probs: np.ndarray
    mask: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        n = len(self.ids)
        if self.probs.ndim != 2 or self.probs.shape[0] != n or self.mask.shape != self.probs.shape:
            raise ProbekdError(
                f"{self.source} targets: {n} ids, probabilities {self.probs.shape}, mask {self.mask.shape}; "
                "need [N, K] for both"
            )
        if len(set(self.ids)) != n:
            raise ProbekdError(f"{self.source} targets: duplicate example ids")
        bad = ~np.isfinite(self.probs).all(1) | (self.probs < 0).any(1) | (self.probs[~self.mask] != 0).any()
        sums = self.probs.sum(1)
        bad |= np.abs(sums - 1) > 1e-3
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ProbekdError(
                f"{self.source} targets: row {self.ids[i]!r} is not a distribution over its options "
                f"({self.probs[i].tolist()}, mask {self.mask[i].tolist()})"
            )

    @property
    def k(self) -> int:
        return int(self.probs.shape[1])

    def align(self, ids: list[str], mask: np.ndarray) -> np.ndarray:
        """Probabilities [len(ids), K] in the order of `ids`, checked against the task's option `mask`."""
        index = {x: i for i, x in enumerate(self.ids)}
        missing = [x for x in ids if x not in index]
        if missing:
            raise ProbekdError(
                f"{self.source} targets have no row for {len(missing)} example(s), e.g. {missing[:3]}; "
                "they were made for another task or split"
            )
        rows = np.array([index[x] for x in ids], dtype=np.int64)
        k = mask.shape[1]
        if self.k < k or self.mask[rows][:, k:].any():
            raise ProbekdError(f"{self.source} targets have K={self.k} options, the task has K={k}")
        probs, own = self.probs[rows][:, :k], self.mask[rows][:, :k]
        if (own != mask).any():
            i = int(np.flatnonzero((own != mask).any(1))[0])
            raise ProbekdError(
                f"{self.source} targets and the task disagree on the options of {ids[i]!r}: "
                f"{own[i].sum()} vs {mask[i].sum()}"
            )
        return probs

    def save(self, path: Path) -> None:
        """Write as .npz (ids, probs, mask, source, meta as JSON), atomically."""
        write_npz(
            Path(path),
            ids=np.array(self.ids),
            probs=self.probs,
            mask=self.mask,
            source=np.array(self.source),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: Path) -> SoftTargets:
        """Read targets written by `save`; a file that is not one is a clear error."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                return cls(
                    [str(x) for x in z["ids"]],
                    z["probs"],
                    z["mask"],
                    str(z["source"]),
                    json.loads(str(z["meta"])),
                )
        except (OSError, KeyError, ValueError) as e:
            raise ProbekdError(f"{path} is not a soft-target file ({e})") from e


def hard_targets(ids: list[str], answers: np.ndarray, mask: np.ndarray) -> SoftTargets:
    """One-hot targets of the labelled rows (unlabelled rows are left out)."""
    lab = answers >= 0
    probs = np.zeros(mask.shape, dtype=np.float32)
    probs[np.flatnonzero(lab), answers[lab]] = 1.0
    keep = np.flatnonzero(lab)
    return SoftTargets([ids[i] for i in keep], probs[keep], mask[keep], "hard")


def from_logits(
    ids: list[str],
    logits: np.ndarray | torch.Tensor,
    mask: np.ndarray,
    source: str,
    temperature: float = 1.0,
    **meta: Any,
) -> SoftTargets:
    """softmax(logits / T) over each row's valid options."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    z = z.masked_fill(~torch.from_numpy(np.asarray(mask, dtype=bool)), float("-inf"))
    probs = torch.softmax(z, -1).numpy().astype(np.float32)
    return SoftTargets(ids, probs, mask, source, {"temperature": temperature, **meta})


def seeded_order(ids: list[str], seed: int) -> list[int]:
    """Row indices of `ids` in an order drawn from `seed` (a hash of seed and id): a function of the ids alone."""
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())


def _first(ids: list[str], n: int, seed: int) -> np.ndarray:
    keep = np.zeros(len(ids), dtype=bool)
    keep[seeded_order(ids, seed)[:n]] = True
    return keep


def labelled_subset(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which of the labelled rows `ids` are kept at `fraction` (bool [N]): the first ceil(fraction N) ids in an
    order drawn from `seed` (a hash of seed and id), so subsets of one seed are nested as the fraction grows."""
    if not 0 < fraction <= 1:
        raise ProbekdError(f"a labelled fraction must be in (0, 1], got {fraction}")
    return _first(ids, int(np.ceil(fraction * len(ids) - 1e-9)), seed)


def dev_subset(ids: list[str], fraction: float, seed: int, minimum: int = 0) -> np.ndarray:
    """Which of the labelled dev rows `ids` a cell at `fraction` may use (bool [N]): `labelled_subset`'s rule (the
    same share, nested across fractions, drawn from `seed`), but at least `minimum` rows (all when fewer), so a
    low-data cell selects on a dev set of its own size (`grid.dev: proportional`)."""
    if not 0 < fraction <= 1:
        raise ProbekdError(f"a labelled fraction must be in (0, 1], got {fraction}")
    n = max(int(np.ceil(fraction * len(ids) - 1e-9)), min(minimum, len(ids)))
    return _first(ids, n, seed)


def smoothed_targets(ids: list[str], answers: np.ndarray, mask: np.ndarray, eps: float) -> SoftTargets:
    """Label smoothing of the labelled rows: (1 - eps) one-hot(gold) + eps / K_i over each row's K_i options."""
    if not 0 <= eps <= 1:
        raise ProbekdError(f"a smoothing weight must be in [0, 1], got {eps}")
    hard = hard_targets(ids, answers, mask)
    k = hard.mask.sum(1, keepdims=True)
    probs = (1 - eps) * hard.probs + eps * hard.mask / np.maximum(k, 1)
    return SoftTargets(hard.ids, probs, hard.mask, "smoothed", {"smoothing": round(float(eps), 6)})


def smoothing_for_entropy(mask: np.ndarray, entropy: float) -> float:
    """The smoothing weight eps whose smoothed one-hot targets have mean normalized entropy `entropy` over rows of
    option mask `mask` (a 1-D search: the entropy grows with eps from 0 at eps = 0 to 1 at eps = 1)."""
    from scipy.optimize import brentq

    mask = np.asarray(mask, dtype=bool)
    onehot = np.zeros(mask.shape, dtype=np.float64)
    onehot[:, 0] = 1.0  # the entropy does not depend on which option is gold
    uniform = mask / np.maximum(mask.sum(1, keepdims=True), 1)

    def gap(eps: float) -> float:
        return normalized_entropy((1 - eps) * onehot + eps * uniform, mask) - entropy

    if not np.isfinite(entropy) or entropy <= 0:
        return 0.0
    if entropy >= 1:
        return 1.0
    return float(brentq(gap, 0.0, 1.0, xtol=1e-10))


def target_stats(targets: SoftTargets, ids: list[str], answers: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """`target_accuracy` (argmax against the gold option) and `target_entropy` (mean normalized entropy) of
    `targets` on the labelled rows `ids` (gold `answers`, option `mask`): how right and how soft a signal is."""
    lab = np.asarray(answers) >= 0
    rows = [i for i, ok in zip(ids, lab, strict=True) if ok]
    if not rows:
        return {}
    probs = targets.align(rows, np.asarray(mask)[lab])
    return {
        "target_accuracy": round(float((probs.argmax(1) == np.asarray(answers)[lab]).mean()), 4),
        "target_entropy": round(normalized_entropy(probs, np.asarray(mask)[lab]), 4),
    }


def _fit_to_targets(fit: LayerFit, caches: dict[str, TeacherCache], source: str, **meta: Any) -> dict[str, SoftTargets]:
    out = {}
    for split, c in caches.items():
        probs = fit.probs(split).numpy()
        kmask = np.isfinite(fit.layer_logits[split][fit.best].numpy())
        out[split] = SoftTargets(c.ids, probs * kmask, kmask, source, {"temperature": fit.temperature, **meta})
    return out


def _calibrated_teacher(
    caches: dict[str, TeacherCache], y: np.ndarray, kmax: int, probe_cfg: ProbeConfig
) -> dict[str, SoftTargets]:
    """`teacher_calibrated` targets of every split (`probekd.probes.score_calibration`)."""
    scores, masks = {}, {}
    for split, c in caches.items():
        masks[split] = c.padded_mask(kmax)
        scores[split] = np.zeros((len(c.ids), kmax), dtype=np.float32)
        scores[split][:, : c.scores.shape[1]] = np.where(c.mask, c.scores, 0.0)
    cal = calibrate_scores(
        scores, masks, caches["train"].ids, y, caches["dev"].answers, n_folds=probe_cfg.n_folds, seed=probe_cfg.seed
    )
    meta = {
        "temperature": 1.0,  # the targets are softmax(logits): the scale is inside the logits
        "calibration": cal.variant,
        "scale": round(cal.scale, 6),
        "bias": [round(b, 6) for b in cal.bias],
        "candidates": cal.candidates,
        "dev_accuracy": round(cal.dev_accuracy, 4),
        "cv_accuracy": round(cal.cv_accuracy, 4),
    }
    out = {}
    for split, c in caches.items():
        probs = (cal.probs(split).numpy() * masks[split]).astype(np.float32)
        out[split] = SoftTargets(c.ids, probs, masks[split], "teacher_calibrated", dict(meta))
    return out


def signal_targets(
    signal: str,
    caches: dict[str, TeacherCache],
    labelled: np.ndarray,
    probe_cfg: ProbeConfig,
    layer_idx: list[int],
    teacher_temperature: float = 1.0,
    *,
    dev_labelled: np.ndarray | None = None,
    smoothing: float | str = "match_probe",
    probe_targets: SoftTargets | None = None,
) -> dict[str, SoftTargets]:
    """Targets of `signal` for every split of `caches`, using only the training labels where `labelled` is True
    and the dev labels where `dev_labelled` is True (None: every dev label). Dev labels choose the probe's layer and
    temperature and the calibrated teacher's variant; nothing else reads them.

    `hard` and `smoothed` give the labelled training rows only; the others give every row of every split (for
    agreement measures on dev and test). `smoothed` mixes the one-hot with uniform at weight `smoothing`, or, with
    `match_probe`, at the weight whose mean normalized entropy on the labelled rows equals the `probe` targets' of
    the same labels (`probe_targets` when given, else fitted here). The training split's targets carry
    `target_accuracy` and `target_entropy` on the labelled rows in their meta (`target_stats`)."""
    train = caches["train"]
    if labelled.shape != (len(train.ids),):
        raise ProbekdError(f"labelled mask has shape {labelled.shape}, the training split has {len(train.ids)} rows")
    if dev_labelled is not None:
        dev = caches["dev"]
        if dev_labelled.shape != (len(dev.ids),):
            raise ProbekdError(f"dev_labelled mask has shape {dev_labelled.shape}, dev has {len(dev.ids)} rows")
        caches = dict(caches, dev=dataclasses.replace(dev, answers=np.where(dev_labelled, dev.answers, -1)))
    kmax = max(c.mask.shape[1] for c in caches.values())
    answers = np.where(labelled, train.answers, -1)
    mask = train.padded_mask(kmax)
    out = _signal_targets(
        signal, caches, labelled, probe_cfg, layer_idx, teacher_temperature, kmax, smoothing, probe_targets
    )
    out["train"].meta.update(target_stats(out["train"], train.ids, answers, mask))
    return out


def _signal_targets(
    signal: str,
    caches: dict[str, TeacherCache],
    labelled: np.ndarray,
    probe_cfg: ProbeConfig,
    layer_idx: list[int],
    teacher_temperature: float,
    kmax: int,
    smoothing: float | str,
    probe_targets: SoftTargets | None,
) -> dict[str, SoftTargets]:
    train = caches["train"]
    answers = np.where(labelled, train.answers, -1)
    if signal == "hard":
        return {"train": hard_targets(train.ids, answers, train.padded_mask(kmax))}
    if signal == "smoothed":
        mask = train.padded_mask(kmax)
        if smoothing == "match_probe":
            if probe_targets is None:
                probe_targets = _signal_targets(
                    "probe", caches, labelled, probe_cfg, layer_idx, teacher_temperature, kmax, smoothing, None
                )["train"]
            matched = target_stats(probe_targets, train.ids, answers, mask)["target_entropy"]
            eps = smoothing_for_entropy(mask[answers >= 0], matched)
            out = smoothed_targets(train.ids, answers, mask, eps)
            out.meta.update(smoothing_rule="match_probe", matched_entropy=matched)
            return {"train": out}
        if isinstance(smoothing, str):
            raise ProbekdError(f"smoothing must be a weight in [0, 1] or 'match_probe', got {smoothing!r}")
        out = smoothed_targets(train.ids, answers, mask, float(smoothing))
        out.meta["smoothing_rule"] = "fixed"
        return {"train": out}
    if signal == "teacher":
        out = {}
        for split, c in caches.items():
            scores = np.full((len(c.ids), kmax), -np.inf, dtype=np.float32)
            scores[:, : c.scores.shape[1]] = c.scores
            out[split] = from_logits(c.ids, scores, c.padded_mask(kmax), "teacher", teacher_temperature)
        return out
    if signal == "teacher_calibrated":
        return _calibrated_teacher(caches, answers, kmax, probe_cfg)
    if signal == "probe":
        y = torch.from_numpy(answers).long()
        kind = "multinomial" if train.manifest["formulation"] == "letter" else "conditional"
        features = LayerFeatures(caches, layer_idx, probe_cfg.feature, kmax)
        fit = fit_layers(features, kind, probe_cfg, y)
        feature, layer = features.table_groups()[fit.best]
        return _fit_to_targets(
            fit,
            caches,
            "probe",
            layer=layer,
            feature=feature,
            dev_accuracy=round(float(fit.dev_accuracy[fit.best]), 4),
            cv_accuracy=round(float(fit.crossfit.cv_accuracy[fit.best]), 4),
        )
    raise ProbekdError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
