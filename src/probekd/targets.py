"""Soft targets as data: example ids + N x K probabilities + where they came from.

The trainer never knows which signal made its targets. Four sources:
- `hard`: the gold option, one-hot (labelled rows only);
- `teacher`: softmax of the teacher's own answer scores (letter logits, or length-normalized option
  log-likelihoods) at a temperature;
- `probe`: the chosen layer's probe, cross-fitted: a labelled training row's probabilities come from probes that
  never saw its label, unlabelled rows (the pool) and other splits get the probe fitted on all labelled rows;
- `teacher_calibrated`: the same cross-fitted logistic regression, fitted on the teacher's own K answer scores
  (plus one bias per option position) instead of a hidden layer. The fair baseline: it uses the same labels as the
  probe, and removes what plain logit-KD cannot, e.g. a teacher's preference for one letter.

For a labelled fraction of the training split the probe and the calibrated teacher are refitted on that fraction
only (`signal_targets`), so a student trained on a fraction never sees labels outside it through its targets.
What is shared by all rows: the layer and the temperature, both chosen on dev with the probe fitted on all
labelled rows (one index and one scalar, as in the probe stage); a row's logits never depend on its own label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from probekd.atomic import write_npz
from probekd.errors import ProbekdError
from probekd.probes.pipeline import LayerFit, ProbeConfig, fit_layers, layer_features, probe_feature_names
from probekd.teacher.cache import TeacherCache

Signal = Literal["hard", "teacher", "probe", "teacher_calibrated"]
SIGNALS: tuple[str, ...] = ("hard", "teacher", "probe", "teacher_calibrated")


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


def labelled_subset(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which of the labelled rows `ids` are kept at `fraction` (bool [N]): the first ceil(fraction N) ids in an
    order drawn from `seed` (a hash of seed and id), so subsets of one seed are nested as the fraction grows."""
    if not 0 < fraction <= 1:
        raise ProbekdError(f"a labelled fraction must be in (0, 1], got {fraction}")
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())
    keep = np.zeros(len(ids), dtype=bool)
    keep[order[: int(np.ceil(fraction * len(ids) - 1e-9))]] = True
    return keep


def teacher_score_features(c: TeacherCache, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's own answer scores as probe features: letter: X [1, N, K] (missing options 0), for a
    multinomial model; option: X [1, N, K, 1 + K] (the option's score and a one-hot of its position), for a
    conditional logit, so both can learn a per-position bias and a scale."""
    n, k = c.scores.shape
    mask = c.padded_mask(kmax)
    scores = np.zeros((n, kmax), dtype=np.float32)
    scores[:, :k] = np.where(c.mask, c.scores, 0.0)
    if c.manifest["formulation"] == "letter":
        return torch.from_numpy(scores)[None], torch.from_numpy(mask)
    X = np.zeros((1, n, kmax, 1 + kmax), dtype=np.float32)
    X[0, :, :, 0] = scores
    X[0, :, np.arange(kmax), 1 + np.arange(kmax)] = 1.0
    return torch.from_numpy(X), torch.from_numpy(mask)


def _fit_to_targets(fit: LayerFit, caches: dict[str, TeacherCache], source: str, **meta: Any) -> dict[str, SoftTargets]:
    out = {}
    for split, c in caches.items():
        probs = fit.probs(split).numpy()
        kmask = np.isfinite(fit.layer_logits[split][fit.best].numpy())
        out[split] = SoftTargets(c.ids, probs * kmask, kmask, source, {"temperature": fit.temperature, **meta})
    return out


def signal_targets(
    signal: str,
    caches: dict[str, TeacherCache],
    labelled: np.ndarray,
    probe_cfg: ProbeConfig,
    layer_idx: list[int],
    teacher_temperature: float = 1.0,
) -> dict[str, SoftTargets]:
    """Targets of `signal` for every split of `caches`, using only the training labels where `labelled` is True.

    `hard` gives the labelled training rows only; the others give every row of every split (for agreement
    measures on dev and test)."""
    train = caches["train"]
    if labelled.shape != (len(train.ids),):
        raise ProbekdError(f"labelled mask has shape {labelled.shape}, the training split has {len(train.ids)} rows")
    kmax = max(c.mask.shape[1] for c in caches.values())

    if signal == "hard":
        answers = np.where(labelled, train.answers, -1)
        return {"train": hard_targets(train.ids, answers, train.padded_mask(kmax))}
    if signal == "teacher":
        out = {}
        for split, c in caches.items():
            scores = np.full((len(c.ids), kmax), -np.inf, dtype=np.float32)
            scores[:, : c.scores.shape[1]] = c.scores
            out[split] = from_logits(c.ids, scores, c.padded_mask(kmax), "teacher", teacher_temperature)
        return out
    y = torch.from_numpy(np.where(labelled, train.answers, -1)).long()
    kind = "multinomial" if train.manifest["formulation"] == "letter" else "conditional"
    if signal == "probe":
        fit = fit_layers(
            caches, lambda s: layer_features(caches[s], layer_idx, probe_cfg.feature, kmax), kind, probe_cfg, y
        )
        layers = [train.layers[i] for i in layer_idx]
        features = probe_feature_names(train.manifest["formulation"], probe_cfg.feature)
        feature, layer = [(f, x) for f in features for x in layers][fit.best]
        return _fit_to_targets(
            fit,
            caches,
            "probe",
            layer=layer,
            feature=feature,
            dev_accuracy=round(float(fit.dev_accuracy[fit.best]), 4),
            cv_accuracy=round(float(fit.crossfit.cv_accuracy[fit.best]), 4),
        )
    if signal == "teacher_calibrated":
        fit = fit_layers(caches, lambda s: teacher_score_features(caches[s], kmax), kind, probe_cfg, y)
        return _fit_to_targets(
            fit,
            caches,
            "teacher_calibrated",
            dev_accuracy=round(float(fit.dev_accuracy[0]), 4),
            cv_accuracy=round(float(fit.crossfit.cv_accuracy[0]), 4),
        )
    raise ProbekdError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
