"""`TrainerCallback`s of student training: PACED's pass-rate weights, a progress bar per student, and the per-step
logs written to a file instead of the terminal."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from probekd.atomic import write_json
from probekd.errors import ProbekdError
from probekd.weighting import (
    WeightingConfig,
    ddk_gaps,
    ddk_mixture,
    domain_weights,
    influence_weights,
    weight_stats,
    weights_for,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "probekd_weights.json"  # in a checkpoint of a weighted student: its rows' weights and their stats


class PassRateWeights(TrainerCallback):
    """(Re)computes the training rows' weights from the student's pass rates (`probekd.weighting`): at the start
    (or after `warmup_epochs` of unweighted steps), then every `refresh_epochs`; the weights are written into the
    rows, which the data loader reads at each batch. Each computation's statistics are kept in `.stats`.

    The weights in force and the statistics so far are saved in every checkpoint (`WEIGHTS_FILE`) and restored
    from the one training resumes from (`.resume_from`), so that a resumed student is weighted as an uninterrupted
    one, not by pass rates of the later model it resumes with (`train_student` restarts a weighted student whose
    checkpoint is past the warm-up but has no saved weights).

    `rows` holds dicts with `labels` (-1 unlabelled: the argmax of `targets` stands in) and `weights`;
    `probabilities()` gives the student's current option probabilities on them [N, K]; `influence(step)` the rows'
    influence scores (scheme `influence`, KD-AIF: the weights come from them, the pass rates are only logged).
    Scheme `ddk` needs `domains`, the rows' domain names: its state, the domain mixture, moves at each computation
    (`probekd.weighting.ddk_mixture`) and is saved with the weights in each checkpoint, so a resumed student
    continues from it."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        probabilities: Callable[[], np.ndarray],
        cfg: WeightingConfig,
        steps_per_epoch: int,
        seed: int,
        influence: Callable[[int], np.ndarray] | None = None,
        domains: list[str] | None = None,
    ) -> None:
        if cfg.scheme == "influence" and influence is None:
            raise ProbekdError("the influence weighting needs the rows' influence scores")
        if cfg.scheme == "ddk":
            if domains is None or len(domains) != len(rows) or any(d is None for d in domains):
                raise ProbekdError("the ddk weighting needs a domain for every training question (MMLU's subject, or "
                                   "a `domain` field or column in your data)")  # fmt: skip
            self.domain_names = sorted(set(domains))
            if len(self.domain_names) < 2:
                raise ProbekdError(f"the ddk weighting mixes domains; the training questions have one "
                                   f"({self.domain_names[0]!r}), so it would weight every row 1")  # fmt: skip
            index = {d: i for i, d in enumerate(self.domain_names)}
            self.domains = np.array([index[d] for d in domains])
            self.shares = np.bincount(self.domains) / len(self.domains)
            self.mixture = self.shares.copy()  # the data's own mixture until updated
        self.rows = rows
        self.probabilities = probabilities
        self.influence = influence
        self.cfg = cfg
        self.seed = seed
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)  # optimizer steps before the first weights
        self.refresh = max(1, round(cfg.refresh_epochs * steps_per_epoch)) if cfg.refresh_epochs > 0 else 0
        self.stats: list[dict[str, Any]] = []
        self.resume_from: str | None = None

    def weights_at(self, model: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(weights, pass rates) of the rows from the student as it is at optimizer step `step`."""
        rows = self.rows
        gold = np.array([r["labels"] if r["labels"] >= 0 else int(np.argmax(r["targets"].numpy())) for r in rows])
        probs = self.probabilities()
        p = probs[np.arange(len(gold)), gold]
        if self.influence is not None and self.cfg.scheme == "influence":
            return influence_weights(self.influence(step), self.cfg.influence_scale), p
        if self.cfg.scheme == "ddk":
            targets = np.stack([r["targets"].numpy() for r in rows])
            idx = np.arange(len(gold))
            student_loss = -np.log(np.clip(probs[idx, gold], 1e-12, None))
            target_loss = -np.log(np.clip(targets[idx, gold], 1e-12, None))
            gaps = ddk_gaps(student_loss, target_loss, self.domains, len(self.domain_names))
            self.mixture = ddk_mixture(self.mixture, gaps, self.shares, self.cfg.ddk_smoothing)
            return domain_weights(self.domains, self.mixture), p
        return weights_for(self.cfg, probs, gold, self.seed + step), p

    def _update(self, model: Any, step: int) -> None:
        was_training = model.training
        w, p = self.weights_at(model, step)
        model.train(was_training)
        for row, wi in zip(self.rows, w, strict=True):
            row["weights"] = float(wi)
        self.stats.append({"step": step, **weight_stats(w, p)})
        if self.cfg.scheme == "ddk":
            self.stats[-1]["mixture"] = dict(zip(self.domain_names, np.round(self.mixture, 6).tolist(), strict=True))
        log.info(
            "%s weights at step %d: mean pass rate %.3f, effective sample size %.1f%%, zero weight %.1f%%",
            self.cfg.scheme, step, p.mean(), 100 * self.stats[-1]["ess_share"], 100 * self.stats[-1]["zero_share"],
        )  # fmt: skip

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        saved = Path(self.resume_from) / WEIGHTS_FILE if self.resume_from else None
        if saved is not None and saved.is_file():  # resumed: the weights in force when the checkpoint was saved
            kept = json.loads(saved.read_text())
            if len(kept["weights"]) != len(self.rows):
                raise ProbekdError(f"{saved} holds {len(kept['weights'])} weights for {len(self.rows)} rows")
            for row, wi in zip(self.rows, kept["weights"], strict=True):
                row["weights"] = float(wi)
            self.stats = kept["stats"]
            if self.cfg.scheme == "ddk" and "mixture" in kept:  # the mixture the next update moves from
                self.mixture = np.array([kept["mixture"][d] for d in self.domain_names])
            log.info("%s weights restored from %s (computed at steps %s)", self.cfg.scheme, saved,
                     [st["step"] for st in self.stats])  # fmt: skip
        elif state.global_step >= self.warmup:  # from the start, without a warm-up (`train_student` never resumes
            self._update(model, state.global_step)  # past the warm-up without saved weights)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:  # under a launcher: rank 0 writes (same weights on all)
            saved = {"weights": [row["weights"] for row in self.rows], "stats": self.stats}
            if self.cfg.scheme == "ddk":  # the domain mixture in full precision (the stats round it)
                saved["mixture"] = dict(zip(self.domain_names, self.mixture.tolist(), strict=True))
            write_json(folder / WEIGHTS_FILE, saved)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        since = state.global_step - self.warmup
        if since == 0 or (since > 0 and self.refresh and since % self.refresh == 0):
            self._update(model, state.global_step)


class StudentProgress(TrainerCallback):
    """One progress bar per student (optimizer steps, with rate and ETA; the latest loss and dev accuracy beside
    it), in place of `Trainer`'s bars and printed log dictionaries. Hidden when stderr is not a terminal."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, desc=self.description, unit="step", disable=None,
            leave=False, dynamic_ncols=True,
        )  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.shown["loss"] = f"{logs['loss']:.3f}"
        if "eval_accuracy" in logs:
            self.shown["dev acc"] = f"{logs['eval_accuracy']:.3f}"
        self.bar.set_postfix(self.shown, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLog(TrainerCallback):
    """Appends each of `Trainer`'s log dictionaries, with its step and epoch, as one JSON line to `path` (a resumed
    student appends to the same file); at DEBUG level (`probekd -v`) they are logged too."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.debug("%s", entry)
