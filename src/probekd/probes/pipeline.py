"""The probe stage: teacher caches in, `RUN/probes/` out (per-layer table, chosen layer, weights, probabilities, plot).

`compute_probes` fits and chooses, returning a `ProbeResults` (writes nothing); `save_probes` writes it to
`RUN/probes/`; `run_probes` does both, unless the probes there were made from the same inputs.

`RUN/probes/` holds, written together (into a scratch folder, then renamed, so it is complete or absent):
- `summary.json`: fingerprint, config, chosen layer and feature, temperature, teacher and probe accuracy per split,
  the table;
- `layers.csv`: per (feature, layer) group: L2 strength, cross-validated train accuracy and log-loss, validation
  accuracy and log-loss;
- `<split>.npz`: `ids`, `probs` [N, K] (chosen group, calibrated; out-of-fold for labelled training rows),
  `layer_logits` [G, N, K] (every group in the table's order, uncalibrated), `mask`, `answers`;
- `weights.safetensors`: each group's full-data probe (standardized space) with its feature mean and scale;
- `layers.png`: probe accuracy by layer with the teacher's own accuracy as a horizontal line.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from probekd.atomic import atomic_path
from probekd.errors import ProbekdError
from probekd.evaluate import bootstrap_ci
from probekd.probes.calibrate import fit_temperature
from probekd.probes.crossfit import DEFAULT_L2_GRID, CrossfitResult, crossfit, held_out_nll
from probekd.probes.linear import Kind
from probekd.probes.select import choose_layer
from probekd.report.plots import plots_available
from probekd.teacher.cache import TeacherCache, differing_fields, fingerprint, load_cache

log = logging.getLogger(__name__)


class ProbeConfig(BaseModel):
    """How the probes are fitted."""

    model_config = ConfigDict(extra="forbid")

    feature: Literal["last", "mean", "auto"] = Field(
        "auto",
        description="`option` formulation: the state at the option's last token, the mean over its tokens, or "
        "`auto` (the default): probe both and choose the (feature, layer) pair on dev (twice the fitting time; "
        "on ARC-Easy dev and test the mean state won for both real teachers, docs/RESULTS.md).",
    )
    layers: str | list[int] = Field("all", description="`all` cached layers, or a list of layer numbers.")
    n_folds: int = Field(5, ge=3, description="Cross-fitting folds (nested CV chooses each fold's L2 strength).")
    l2_grid: list[float] = Field(
        list(DEFAULT_L2_GRID), min_length=1, description="L2 strengths tried (on the mean loss)."
    )
    seed: int = Field(0, description="Decides the folds (with the example ids).")
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations per probe at most.")
    tol: float = Field(1e-4, gt=0, description="Stop when the gradient's max-norm is below this.")
    nested: bool = Field(
        True,
        description="Nested CV: each fold's L2 strength chosen without that fold (no example's probability depends "
        "on its own label). false: one strength per layer from the outer CV, as LogisticRegressionCV does, about "
        "2.7x fewer fits at 5 folds, with a second-order leak.",
    )


def _splits(run: Path) -> dict[str, Path]:
    root = run / "teacher"
    found = {p.parent.name: p.parent for p in sorted(root.glob("*/manifest.json"))}
    for need in ("train", "dev"):
        if need not in found:
            raise ProbekdError(
                f"no teacher cache for split {need!r} under {root}; run `probekd extract` with --splits including it"
            )
    return found


def _check_same_teacher(caches: dict[str, TeacherCache]) -> None:
    ref_split, ref = next(iter(caches.items()))
    for split, c in caches.items():
        diff = [k for k in differing_fields(ref.manifest["fields"], c.manifest["fields"]) if k != "ids_sha256"]
        if diff:
            raise ProbekdError(
                f"teacher caches of splits {ref_split!r} and {split!r} were made differently (differ in: "
                f"{', '.join(diff)}); re-extract them with the same settings"
            )


def probe_feature_names(formulation: str, feature: str) -> tuple[str, ...]:
    """The features probed: the letter formulation has one state per question (`last`); `auto` probes both."""
    if formulation == "letter":
        return ("last",)
    return ("last", "mean") if feature == "auto" else (feature,)


PASS_BYTES = 256 * 2**20  # the training split's features fitted in one batched pass, at most (one group if larger)


@dataclass(frozen=True)
class LayerFeatures:
    """The features probed on a run's caches, group by group: group g is the g-th (state, layer) pair of
    `groups` (`auto`: every layer's last-token state, then every layer's mean state), read from disk per call."""

    caches: dict[str, TeacherCache]
    layer_idx: list[int]  # indices into the caches' layers
    feature: str  # `last`, `mean` or `auto` (`ProbeConfig.feature`)
    kmax: int  # options per row, over every split

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(feature, layer index in the cache) of every group, in the table's order."""
        names = probe_feature_names(self.caches["train"].manifest["formulation"], self.feature)
        return [(f, i) for f in names for i in self.layer_idx]

    def table_groups(self) -> list[tuple[str, int]]:
        """(feature, teacher layer number) of every group, in the table's order: what each group probes."""
        layers = self.caches["train"].layers
        return [(f, layers[i]) for f, i in self.groups]

    def group_bytes(self, split: str) -> int:
        """The size of one group's float32 features on `split`."""
        c = self.caches[split]
        per_row = c.manifest["hidden_size"] * (1 if c.manifest["formulation"] == "letter" else self.kmax)
        return 4 * per_row * len(c.ids)

    def __call__(self, split: str, groups: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, mask) of `groups` on `split`: X [G, N, H] (letter) or [G, N, kmax, H] (option, options padded with
        zeros to kmax), float32; mask [N, kmax]."""
        c = self.caches[split]
        letter = c.manifest["formulation"] == "letter"
        every = self.groups
        chosen = [every[g] for g in groups]
        n, h, k = len(c.ids), c.manifest["hidden_size"], c.mask.shape[1]
        X = np.zeros((len(chosen), n, h) if letter else (len(chosen), n, self.kmax, h), dtype=np.float32)
        start = 0
        for f, members in itertools.groupby(chosen, key=lambda g: g[0]):  # consecutive groups of one state
            idx = [i for _, i in members]
            out = X[start : start + len(idx)]
            c.layer_states("hidden_mean" if f == "mean" else "hidden", idx, out if letter else out[:, :, :k])
            start += len(idx)
        return torch.from_numpy(X), torch.from_numpy(c.padded_mask(self.kmax))


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    lab = y >= 0
    return float((logits[lab].argmax(-1) == y[lab]).float().mean()) if bool(lab.any()) else float("nan")


def _table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def load_inputs(
    run: Path, cfg: ProbeConfig, splits: tuple[str, ...] | None = None
) -> tuple[dict[str, TeacherCache], list[int], list[int]]:
    """The teacher caches of run directory `run` (split -> cache, hidden states left on disk; all the splits there,
    or only `splits`), the layers to probe, and their indices in the cache."""
    split_dirs = {s: d for s, d in _splits(run).items() if splits is None or s in splits}
    caches = {s: load_cache(d) for s, d in split_dirs.items()}
    _check_same_teacher(caches)
    cached_layers = caches["train"].layers
    if cfg.layers == "all":
        layers = cached_layers
    else:
        assert isinstance(cfg.layers, list)
        missing = [x for x in cfg.layers if x not in cached_layers]
        if missing:
            raise ProbekdError(f"layers {missing} are not in the teacher cache (it has {cached_layers})")
        layers = list(cfg.layers)
    return caches, layers, [cached_layers.index(x) for x in layers]


@dataclass
class LayerFit:
    """The probes of every layer on one labelling of the training split, the layer chosen on dev, its temperature."""

    crossfit: CrossfitResult
    layer_logits: dict[str, torch.Tensor]  # split -> [G, N, K]; train rows out-of-fold where labelled
    dev_accuracy: torch.Tensor  # [G]
    dev_nll: torch.Tensor  # [G]
    best: int  # index into the layers
    temperature: float

    def probs(self, split: str) -> torch.Tensor:
        """Calibrated probabilities [N, K] of the chosen layer on `split`."""
        return torch.softmax(self.layer_logits[split][self.best] / self.temperature, -1)


def fit_layers(
    features: LayerFeatures, kind: Kind, cfg: ProbeConfig, y: torch.Tensor, *, pass_bytes: int = PASS_BYTES
) -> LayerFit:
    """Cross-fit one probe per feature group ("layer") on the training rows labelled in `y` (-1: unlabelled, those
    get the full-data probe), predict the other splits, choose the group on dev, calibrate its temperature on dev.

    The groups are fitted in passes of as many as fit in `pass_bytes` of training features (at least one), each
    read from disk for the pass: memory follows the pass, not the number of layers. Groups are independent problems,
    so the passes give the probes one batched pass over all groups would (up to float rounding)."""
    caches = features.caches
    train, dev = caches["train"], caches["dev"]
    G = len(features.groups)
    per_pass = max(1, pass_bytes // max(1, features.group_bytes("train")))
    parts: list[CrossfitResult] = []
    others: dict[str, list[torch.Tensor]] = {s: [] for s in caches if s != "train"}
    for start in range(0, G, per_pass):
        groups = range(start, min(G, start + per_pass))
        if per_pass < G:
            log.info("probe pass %d/%d: groups %d-%d", start // per_pass + 1, -(-G // per_pass), start, groups[-1])
        X, mask = features("train", groups)
        res = crossfit(
            X,
            y,
            mask,
            train.ids,
            kind,
            n_folds=cfg.n_folds,
            l2_grid=tuple(cfg.l2_grid),
            seed=cfg.seed,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            nested=cfg.nested,
        )
        del X
        parts.append(res)
        for split, logits in others.items():
            logits.append(res.predict_logits(*features(split, groups)))
    res = CrossfitResult.concat(parts)
    layer_logits = {"train": res.train_logits} | {s: torch.cat(v) for s, v in others.items()}
    y_dev = torch.from_numpy(dev.answers).long()
    lab_dev = y_dev >= 0
    if not bool(lab_dev.any()):
        raise ProbekdError("the dev split has no labels; the probe stage needs them to choose the layer and calibrate")
    dev_acc = (layer_logits["dev"][:, lab_dev].argmax(-1) == y_dev[lab_dev]).float().mean(1)
    dev_nll = held_out_nll(layer_logits["dev"][:, lab_dev], y_dev[lab_dev][None].expand(G, -1)).mean(1)
    best = choose_layer(dev_acc.numpy(), dev_nll.numpy())
    temperature = fit_temperature(layer_logits["dev"][best][lab_dev], y_dev[lab_dev])
    return LayerFit(res, layer_logits, dev_acc, dev_nll, best, temperature)


def existing_summary(run: Path) -> dict[str, Any] | None:
    """RUN/probes/summary.json as written by `save_probes`; None when the probe stage has not finished."""
    path = run / "probes" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


class LayerRow(TypedDict):
    """One probed (feature, layer) group: a row of `layers.csv` and of `summary.json`'s `table`."""

    feature: str  # the hidden state probed: `last` (last token) or `mean` (mean over the option's tokens)
    layer: int  # the teacher layer (0 = embeddings)
    l2: float  # the L2 strength of the full-data probe (chosen by cross-validation)
    cv_accuracy: float  # accuracy of the out-of-fold predictions on the labelled training rows
    cv_nll: float  # their mean negative log-likelihood
    dev_accuracy: float  # accuracy of the full-data probe on dev
    dev_nll: float  # its mean negative log-likelihood on dev


class ProbeGain(TypedDict):
    """The probe's accuracy minus the teacher's own answer's on one split, paired over the labelled questions."""

    diff: float
    ci95: list[float]  # [low, high]: paired bootstrap over questions, 10,000 resamples, seed 0


@dataclass(frozen=True)
class SplitProbes:
    """The probes' predictions on one split: what RUN/probes/<split>.npz holds (N questions, K options at most over
    the run's splits, G probed groups in the table's order)."""

    ids: list[str]
    probs: np.ndarray  # [N, K] float32: the chosen group, calibrated; out-of-fold for the labelled training rows
    layer_logits: np.ndarray  # [G, N, K] float32: every group, uncalibrated; -inf where a question has no option
    mask: np.ndarray  # [N, K] bool: the question's options
    answers: np.ndarray  # [N] gold option, -1 unlabelled
    folds: np.ndarray  # [N] cross-fitting fold of each labelled training row; -1 elsewhere (and on other splits)


@dataclass(frozen=True)
class ProbeResults:
    """Everything the probe stage computes (`compute_probes`); `save_probes` writes it to RUN/probes/, `summary`
    is summary.json's content."""

    fingerprint: str  # of the teacher caches and the probe settings: a rerun with the same one is skipped
    config: dict[str, Any]  # the `ProbeConfig` fields
    formulation: str  # `letter` (one state per question) or `option` (one per option)
    kind: str  # `multinomial` (letter) or `conditional` (option) probes
    teacher: str  # the teacher model (its folder, as the caches' manifest names it)
    layers: list[int]  # the teacher layers probed
    features: tuple[str, ...]  # the states probed (`probe_feature_names`); groups are every layer of each in turn
    table: list[LayerRow]  # one row per (feature, layer) group
    best: int  # the chosen group: its index in `table`
    temperature: float  # of the chosen group, calibrated on dev
    teacher_accuracy: dict[str, float]  # split -> accuracy of the teacher's own answer
    probe_accuracy: dict[str, float]  # split -> accuracy of the chosen group (train: out-of-fold)
    probe_minus_teacher: dict[str, ProbeGain]  # split (with labels) -> paired difference and its interval
    chance_dev: float  # a uniform guess's accuracy on dev
    not_converged: int  # (group, problem) fits that hit max_iter
    seconds: float  # time to compute
    splits: dict[str, SplitProbes]  # split -> the probes' predictions
    weights: dict[str, torch.Tensor]  # the full-data probe of every group (standardized space): `coef` [G, ...],
    # `intercept` [G, ...] (multinomial only), and the features' `mean` and `scale`

    @property
    def chosen_feature(self) -> str:
        """The state the chosen group probes (`last` or `mean`)."""
        return self.table[self.best]["feature"]

    @property
    def chosen_layer(self) -> int:
        """The teacher layer of the chosen group."""
        return self.table[self.best]["layer"]

    def summary(self) -> dict[str, Any]:
        """The content of RUN/probes/summary.json (what `run_probes` returns)."""
        return {
            "fingerprint": self.fingerprint,
            "config": self.config,
            "formulation": self.formulation,
            "kind": self.kind,
            "layers": self.layers,
            "features": list(self.features),
            "chosen_layer": self.chosen_layer,
            "chosen_feature": self.chosen_feature,
            "temperature": self.temperature,
            "teacher_accuracy": self.teacher_accuracy,
            "probe_accuracy": self.probe_accuracy,
            "probe_accuracy_note": "chosen layer; train = out-of-fold (cross-fitted)",
            "probe_minus_teacher": self.probe_minus_teacher,  # paired bootstrap over questions, 10,000 resamples
            "chance_dev": self.chance_dev,
            "not_converged": self.not_converged,
            "table": self.table,
            "seconds": self.seconds,
        }


def probe_fingerprint(run: Path, cfg: ProbeConfig) -> str:
    """The fingerprint of the probe stage of run directory `run` under `cfg`: its teacher caches' and the settings'
    (read from the caches' manifests only)."""
    manifests = {s: json.loads((d / "manifest.json").read_text()) for s, d in _splits(run).items()}
    config = cfg.model_dump()
    if config["nested"]:  # the default, and what every probe stage did before the option: their fingerprints hold
        del config["nested"]
    return fingerprint({"teacher": {s: m["fingerprint"] for s, m in manifests.items()}, "config": config})


def _gain(layer_logits: torch.Tensor, c: TeacherCache) -> ProbeGain | None:
    """The chosen group's accuracy minus the teacher's own answer's, paired over the labelled questions of a split;
    None without labels."""
    lab = c.answers >= 0
    if not lab.any():
        return None
    probe_right = layer_logits.numpy()[lab].argmax(1) == c.answers[lab]
    teacher_right = c.teacher_predictions()[lab] == c.answers[lab]
    d, lo, hi = bootstrap_ci(probe_right.astype(float) - teacher_right, n_boot=10_000)
    return {"diff": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def compute_probes(run: Path, cfg: ProbeConfig) -> ProbeResults:
    """Fit one probe per (feature, layer) group on the teacher caches of run directory `run`, choose the group on
    dev and calibrate it there; writes nothing (`save_probes` does)."""
    fp = probe_fingerprint(run, cfg)
    t0 = time.perf_counter()
    caches, layers, layer_idx = load_inputs(run, cfg)
    train, dev = caches["train"], caches["dev"]
    formulation = train.manifest["formulation"]
    kind: Kind = "multinomial" if formulation == "letter" else "conditional"
    y = torch.from_numpy(train.answers).long()
    log.info(
        "fitting %s probes: %d layers x %d training rows (%d labelled)", kind, len(layers), len(y), int((y >= 0).sum())
    )
    kmax = max(c.mask.shape[1] for c in caches.values())
    features = probe_feature_names(formulation, cfg.feature)
    layer_features = LayerFeatures(caches, layer_idx, cfg.feature, kmax)
    groups = layer_features.table_groups()
    fit = fit_layers(layer_features, kind, cfg, y)
    res, best = fit.crossfit, fit.best
    table: list[LayerRow] = [
        {
            "feature": feature,
            "layer": layer,
            "l2": float(res.full_l2[i]),
            "cv_accuracy": round(float(res.cv_accuracy[i]), 4),
            "cv_nll": round(float(res.cv_nll[i]), 4),
            "dev_accuracy": round(float(fit.dev_accuracy[i]), 4),
            "dev_nll": round(float(fit.dev_nll[i]), 4),
        }
        for i, (feature, layer) in enumerate(groups)
    ]
    gains = {s: _gain(fit.layer_logits[s][best], c) for s, c in caches.items()}
    splits = {
        s: SplitProbes(
            ids=list(c.ids),
            probs=fit.probs(s).numpy().astype(np.float32, copy=False),
            layer_logits=fit.layer_logits[s].numpy().astype(np.float32, copy=False),
            mask=np.isfinite(fit.layer_logits[s][best].numpy()),
            answers=c.answers,
            folds=res.folds if s == "train" else np.full(len(c.ids), -1),
        )
        for s, c in caches.items()
    }
    weights = {"coef": res.full.coef[:, 0], "mean": res.standardizer.mean, "scale": res.standardizer.scale}
    if res.full.intercept is not None:
        weights["intercept"] = res.full.intercept[:, 0]
    return ProbeResults(
        fingerprint=fp,
        config=cfg.model_dump(),
        formulation=formulation,
        kind=kind,
        teacher=str(train.manifest["model"]),
        layers=layers,
        features=features,
        table=table,
        best=best,
        temperature=fit.temperature,
        teacher_accuracy={s: c.teacher_accuracy() for s, c in caches.items()},
        probe_accuracy={
            s: _accuracy(fit.layer_logits[s][best], torch.from_numpy(c.answers).long()) for s, c in caches.items()
        },
        probe_minus_teacher={s: g for s, g in gains.items() if g is not None},
        chance_dev=float(np.mean(1.0 / dev.mask.sum(1))),
        not_converged=res.not_converged,
        seconds=round(time.perf_counter() - t0, 2),
        splits=splits,
        weights=weights,
    )


def layers_csv(results: ProbeResults) -> str:
    """The text of layers.csv: the table, one row per (feature, layer) group."""
    return _table_csv(results.table)


def plot_probe_layers(path: Path, results: ProbeResults) -> None:
    """layers.png: probe accuracy by layer (cross-validated on train, and dev) per probed state, with the teacher's
    own dev accuracy, chance and the chosen group marked."""
    from probekd.report.plots import plot_layers

    features, formulation = results.features, results.formulation
    curves = {}
    for f in features:
        name = f"probe ({f} state)" if len(features) > 1 else "probe"
        rows = [r for r in results.table if r["feature"] == f]
        curves[f"{name}, cross-validated train"] = [r["cv_accuracy"] for r in rows]
        curves[f"{name}, dev"] = [r["dev_accuracy"] for r in rows]
    plot_layers(
        path,
        results.layers,
        curves,
        teacher=results.teacher_accuracy["dev"],
        chance=results.chance_dev,
        chosen=results.chosen_layer,
        chosen_label=f"chosen: layer {results.chosen_layer}"
        + (f", {results.chosen_feature} state" if len(features) > 1 else ""),
        title=f"{results.kind} probes ({formulation} formulation"
        + (f", {' and '.join(features)} state" if formulation == "option" else "")
        + "), teacher "
        + re.sub(r"-[0-9a-f]{12}$", "", Path(results.teacher).name),
    )


def save_probes(run: Path, results: ProbeResults) -> dict[str, Any]:
    """Write RUN/probes/ from `results` (all files together: complete or absent); returns the summary."""
    summary = results.summary()
    with atomic_path(run / "probes") as tmp:
        tmp.mkdir()
        for s, p in results.splits.items():
            np.savez(
                tmp / f"{s}.npz",
                ids=np.array(p.ids),
                probs=p.probs,
                layer_logits=p.layer_logits,
                mask=p.mask,
                answers=p.answers,
                folds=p.folds,
            )
        save_file(
            {k: v.contiguous() for k, v in results.weights.items()},
            str(tmp / "weights.safetensors"),
            metadata={
                "kind": results.kind,
                "layers": json.dumps([r["layer"] for r in results.table]),
                "features": json.dumps([r["feature"] for r in results.table]),
                "temperature": str(results.temperature),
            },
        )
        (tmp / "layers.csv").write_text(layers_csv(results))
        if plots_available():  # the `plots` extra
            plot_probe_layers(tmp / "layers.png", results)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def run_probes(run: Path, cfg: ProbeConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Fit, choose, calibrate and write the probes of run directory `run` (`compute_probes`, then `save_probes`);
    return the summary.

    A finished probe stage with the same fingerprint is returned as is; one made from other inputs is refused
    unless `overwrite`.
    """
    old = existing_summary(run)
    if old is not None and not overwrite:
        if old.get("fingerprint") == probe_fingerprint(run, cfg):
            log.info("probes at %s are up to date", run / "probes")
            return old
        raise ProbekdError(
            f"{run / 'probes'} was made from other teacher caches or probe settings; pass --overwrite to replace it"
        )
    return save_probes(run, compute_probes(run, cfg))
