"""`probekd tune CONFIG`: choose the students' training recipe on dev, never on test.

For every signal the same trials are run (the same budget and the same recipes: the current `train:` settings
first, then `tune.trials - 1` recipes drawn with `tune.seed` from the search space: learning rate log-uniform,
epochs, warm-up and weight decay from their lists). A trial trains the student of the grid cell
(signal, `tune.fraction`, seed) for each of `tune.seeds` exactly as the grid would, keeps its best dev epoch, and
scores the mean over seeds of that best dev accuracy (on the cell's own dev questions, so a proportional dev subset
counts here too). The test split is never loaded. The best trial per signal (ties: the earlier, so the current
recipe wins ties) becomes that signal's entry of `train_by_signal`, which `probekd run` applies to its cells.

    RUN/tune/<signal>/t<trial>-s<seed>.json    one trained trial: its recipe, dev accuracy per epoch, seconds
    RUN/tune/summary.json                      the trials' scores and the chosen recipe per signal

Each trial file is written when the trial ends, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from probekd.atomic import write_json
from probekd.errors import ProbekdError

log = logging.getLogger(__name__)

TUNED_FIELDS = ("learning_rate", "epochs", "warmup_ratio", "weight_decay")


class TuneConfig(BaseModel):
    """The recipe search of `probekd tune` (the `tune:` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=1, description="Recipes tried per signal (the first is the current `train:` one).")
    fraction: float = Field(1.0, gt=0, le=1, description="Labelled fraction of the cells the search trains.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds per trial; the score is their mean dev accuracy.")
    signals: list[str] | None = Field(None, description="Signals to tune; default: the grid's.")
    learning_rate: tuple[float, float] = Field((1e-5, 1e-3), description="Log-uniform range of the learning rate.")
    epochs: list[float] = Field([2, 4, 8], min_length=1, description="Epoch counts to draw from.")
    warmup_ratio: list[float] = Field([0.0, 0.1], min_length=1, description="Warm-up shares to draw from.")
    weight_decay: list[float] = Field([0.0, 0.01, 0.1], min_length=1, description="Weight decays to draw from.")
    seed: int = Field(0, description="Seed of the recipe draws.")

    @field_validator("learning_rate")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"learning_rate range must be 0 < low <= high, got {list(v)}")
        return v


def recipes(tune: TuneConfig, current: dict[str, Any]) -> list[dict[str, float]]:
    """The trials' recipes: the current one, then `trials - 1` seeded draws (the same for every signal)."""
    rng = np.random.default_rng(tune.seed)
    out = [{k: float(current[k]) for k in TUNED_FIELDS}]
    lo, hi = (math.log(x) for x in tune.learning_rate)
    while len(out) < tune.trials:
        out.append(
            {
                "learning_rate": float(f"{math.exp(rng.uniform(lo, hi)):.3g}"),
                "epochs": float(rng.choice(tune.epochs)),
                "warmup_ratio": float(rng.choice(tune.warmup_ratio)),
                "weight_decay": float(rng.choice(tune.weight_decay)),
            }
        )
    return out


def trial_path(run: Path, signal: str, trial: int, seed: int) -> Path:
    """RUN/tune/<signal>/t<trial>-s<seed>.json."""
    return Path(run) / "tune" / signal / f"t{trial}-s{seed}.json"


def run_tune(cfg: Any, run: Path) -> dict[str, Any]:
    """The search of `cfg.tune` in run folder `run` (the targets stage first, if needed); returns and writes
    RUN/tune/summary.json: per signal the trials (recipe, score, per-seed best dev accuracy) and the chosen recipe."""
    from probekd.experiment import cell_training, examples_by_id, prepare_cell, prepare_targets
    from probekd.layout import Cell, load_answers
    from probekd.student.train import train_student
    from probekd.teacher.cache import fingerprint

    tune: TuneConfig = cfg.tune
    signals = tune.signals or cfg.grid.signals
    unknown = [s for s in signals if s not in cfg.grid.signals]
    if unknown:
        raise ProbekdError(f"tune.signals {unknown} are not among grid.signals {cfg.grid.signals}")
    if tune.fraction not in cfg.grid.fractions:
        cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"fractions": [tune.fraction]})})
    grid = cfg.grid.model_copy(update={"signals": signals, "seeds": tune.seeds, "fractions": [tune.fraction]})
    prepare_targets(cfg.model_copy(update={"grid": grid}), run)
    caches = load_answers(run, ("train", "dev"))  # never the test split
    examples = examples_by_id(cfg, ("train", "dev"))
    trials = recipes(tune, cfg.train.model_dump())
    summary: dict[str, Any] = {"fraction": tune.fraction, "seeds": tune.seeds, "signals": {}}
    total, n = len(signals) * len(trials) * len(tune.seeds), 0
    for signal in signals:
        rows = []
        for t, recipe in enumerate(trials):
            best = []
            for seed in tune.seeds:
                n += 1
                path = trial_path(run, signal, t, seed)
                cell = Cell(signal, tune.fraction, seed, cfg.train.loss, cfg.train.weighting.scheme)
                trial_cfg = cfg.model_copy(update={"train_by_signal": cfg.train_by_signal | {signal: recipe}})
                key = fingerprint(cell_training(trial_cfg, cell))
                done = json.loads(path.read_text()) if path.exists() else None
                # (a trial file written before fingerprints were recorded is checked by its recipe alone)
                if done is not None and (done.get("fingerprint", key) != key or done["recipe"] != recipe):
                    raise ProbekdError(
                        f"{path} was trained with other student, training or search settings than this search's "
                        f"trial {t} ({recipe}); use another run folder, or remove {path.parent.parent} to search again"
                    )
                if done is None:
                    log.info("tune %d/%d: %s, trial %d %s, seed %d", n, total, signal, t, recipe, seed)
                    t0 = time.perf_counter()
                    train_cfg = trial_cfg.train_for(signal)
                    student, train_rows, dev_rows, _ = prepare_cell(run, cfg, cell, caches, examples)
                    history = train_student(
                        student, train_rows, dev_rows, train_cfg, path.parent / f"t{t}-s{seed}-checkpoints", seed,
                        description=f"tune {signal} t{t} s{seed}",
                    )  # fmt: skip
                    dev = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
                    record = {"recipe": recipe, "dev_accuracy_by_epoch": dev, "best_dev_accuracy": max(dev),
                              "seconds": round(time.perf_counter() - t0, 1), "fingerprint": key}  # fmt: skip
                    write_json(path, record)
                    done = record
                best.append(done["best_dev_accuracy"])
            rows.append({"trial": t, "recipe": recipe, "dev_accuracy": best, "score": float(np.mean(best))})
        chosen = max(rows, key=lambda r: (r["score"], -r["trial"]))
        summary["signals"][signal] = {"trials": rows, "chosen": chosen["trial"], "recipe": chosen["recipe"]}
    write_json(Path(run) / "tune" / "summary.json", summary)
    return summary


def tuned_overrides(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`train_by_signal` from a tune summary: each signal's chosen recipe."""
    return {s: dict(v["recipe"]) for s, v in summary["signals"].items()}


def tuned_config(cfg: Any, summary: dict[str, Any]) -> Any:
    """`cfg` with each tuned signal's chosen recipe in `train_by_signal` (the others keep theirs)."""
    return cfg.model_copy(update={"train_by_signal": cfg.train_by_signal | tuned_overrides(summary)})
