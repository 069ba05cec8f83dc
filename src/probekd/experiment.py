"""A whole run: extraction, probes, soft targets, the grid of students, evaluation, report; each stage skipped
when its artifact is already there, so an interrupted run resumes where it stopped.

    RUN/config.yaml                        the resolved configuration
    RUN/teacher/<split>/, RUN/probes/      see `probekd extract`, `probekd probe`
    RUN/targets/<signal>-f<frac>-s<seed>.npz   training-split soft targets of one grid cell (`probekd.targets`)
    RUN/students/<signal>-f<frac>-s<seed>/metrics.json   one trained and evaluated student
    RUN/report/                            `probekd report`
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from probekd.atomic import write_json, write_text
from probekd.config import RunConfig, dump_config
from probekd.data.examples import MCQExample
from probekd.errors import ProbekdError
from probekd.evaluate import classification_metrics
from probekd.probes.pipeline import load_inputs, run_probes
from probekd.targets import SoftTargets, labelled_subset, signal_targets
from probekd.teacher.cache import TeacherCache, differing_fields, fingerprint

log = logging.getLogger(__name__)

# Sections whose change makes a run directory's artifacts stale (the grid may grow: new cells are added).
_FIXED_SECTIONS = ("task", "teacher", "limit", "extract", "probe", "student", "train")


def cell_name(signal: str, fraction: float, seed: int) -> str:
    """`probe-f0.25-s1`: the name of a grid cell's targets file and student folder."""
    return f"{signal}-f{fraction:g}-s{seed}"


def check_run_dir(run: Path, cfg: RunConfig, overwrite: bool = False) -> None:
    """Refuse a run directory made from another configuration (naming the fields), then record this one."""
    path = run / "config.yaml"
    if path.exists() and not overwrite:
        import yaml

        old = yaml.safe_load(path.read_text()) or {}
        new = cfg.model_dump(mode="json")
        diff = []
        for section in _FIXED_SECTIONS:
            a, b = old.get(section), new.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{section}.{k}" for k in differing_fields(a, b)]
            elif a != b:
                diff.append(section)
        if diff:
            raise ProbekdError(
                f"{run} was made with another configuration (differs in: {', '.join(diff)}); "
                "use another output folder, or --overwrite to redo the stages that depend on them"
            )
    if overwrite:  # everything downstream of the configuration is redone
        for stale in ("targets", "students", "report"):
            shutil.rmtree(run / stale, ignore_errors=True)
    write_text(path, dump_config(cfg))


def _padded_mask(c: TeacherCache, kmax: int) -> np.ndarray:
    m = np.zeros((len(c.ids), kmax), dtype=bool)
    m[:, : c.mask.shape[1]] = c.mask
    return m


def _examples_by_id(cfg: RunConfig) -> dict[str, dict[str, MCQExample]]:
    from probekd.data import load_task

    loaded = load_task(cfg.task)
    return {s: {e.id: e for e in loaded.splits[s]} for s in ("train", "dev", "test") if s in loaded.splits}


def _cell_targets(
    run: Path,
    name: str,
    signal: str,
    caches: dict[str, TeacherCache],
    labelled: np.ndarray,
    cfg: RunConfig,
    layer_idx: list[int],
) -> SoftTargets:
    path = run / "targets" / f"{name}.npz"
    if path.exists():
        return SoftTargets.load(path)
    t0 = time.perf_counter()
    made = signal_targets(signal, caches, labelled, cfg.probe, layer_idx, cfg.grid.teacher_temperature)["train"]
    made.meta["n_labelled"] = int(labelled.sum())
    made.meta["seconds"] = round(time.perf_counter() - t0, 2)
    made.save(path)
    return made


def run_cell(
    run: Path,
    cfg: RunConfig,
    signal: str,
    fraction: float,
    seed: int,
    caches: dict[str, TeacherCache],
    examples: dict[str, dict[str, MCQExample]],
    layer_idx: list[int],
    probe_test: np.ndarray,
) -> dict[str, Any]:
    """Targets, training and evaluation of one grid cell; returns (and writes) its metrics."""
    from probekd.student.heads import load_student
    from probekd.student.train import Rows, predict, train_student

    name = cell_name(signal, fraction, seed)
    out = run / "students" / name
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    t0 = time.perf_counter()
    train = caches["train"]
    kmax = max(c.mask.shape[1] for c in caches.values())
    lab_all = train.answers >= 0
    labelled = np.zeros(len(train.ids), dtype=bool)
    lab_ids = [i for i, ok in zip(train.ids, lab_all, strict=True) if ok]
    labelled[np.flatnonzero(lab_all)] = labelled_subset(lab_ids, fraction, seed)
    targets = _cell_targets(run, name, signal, caches, labelled, cfg, layer_idx)
    # rows the student trains on: the labelled subset, plus the unlabelled pool in semi-supervised mode when the
    # signal labels it (hard targets exist only for labelled rows)
    have = set(targets.ids)
    use = labelled | ((cfg.grid.mode == "semi") & np.array([i in have for i in train.ids]))
    rows_idx = np.flatnonzero(use)
    ids = [train.ids[i] for i in rows_idx]
    mask = _padded_mask(train, kmax)[rows_idx]
    gold = np.where(labelled, train.answers, -1)[rows_idx]
    soft = targets.align(ids, mask)
    student = load_student(cfg.student, kmax, seed)

    def rows_of(split: str, split_ids: list[str], m: np.ndarray, y: np.ndarray, t: np.ndarray | None = None) -> Rows:
        return Rows([student.encode(examples[split][i]) for i in split_ids], m, y, t)

    train_rows = rows_of("train", ids, mask, gold, soft)
    dev, test = caches["dev"], caches["test"]
    dev_rows = rows_of("dev", dev.ids, _padded_mask(dev, kmax), dev.answers)
    log.info("cell %s: %d training rows (%d labelled), signal %s", name, len(ids), int((gold >= 0).sum()), signal)
    history = train_student(student.module, student.collate, train_rows, dev_rows, cfg.train, out / "checkpoints", seed)
    test_mask = _padded_mask(test, kmax)
    probs = predict(student.module, student.collate, rows_of("test", test.ids, test_mask, test.answers))
    teacher_pred = np.where(test.mask, test.scores, -np.inf).argmax(1)
    metrics = classification_metrics(probs, test.answers, {"teacher": teacher_pred, "probe": probe_test}, seed=seed)
    dev_acc = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
    metrics.update(
        {
            "cell": name,
            "signal": signal,
            "fraction": fraction,
            "seed": seed,
            "mode": cfg.grid.mode,
            "n_train_rows": len(ids),
            "n_labelled": int((gold >= 0).sum()),
            "best_dev_accuracy": max(dev_acc) if dev_acc else None,
            "dev_accuracy_by_epoch": dev_acc,
            "targets": targets.meta,
            "config_fingerprint": fingerprint({k: cfg.model_dump(mode="json")[k] for k in _FIXED_SECTIONS}),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "test_probs.npy", probs)
    write_json(out / "metrics.json", metrics)  # last: its presence marks the cell done
    return metrics


def run_experiment(cfg: RunConfig, run: Path, *, overwrite: bool = False) -> list[dict[str, Any]]:
    """All stages of `cfg` into `run`; returns every cell's metrics (finished cells are read, not rerun)."""
    from probekd.teacher.pipeline import extract_task

    check_run_dir(run, cfg, overwrite)
    extract_task(cfg.task, cfg.teacher, run, ["train", "dev", "test"], cfg.extract, cfg.limit, overwrite)
    run_probes(run, cfg.probe, overwrite=overwrite)
    caches, _, layer_idx = load_inputs(run, cfg.probe)
    if "test" not in caches:
        raise ProbekdError(f"no teacher cache for the test split under {run / 'teacher'}")
    examples = _examples_by_id(cfg)
    with np.load(run / "probes" / "test.npz") as z:
        probe_test = z["probs"].argmax(1)
    cells = [(s, f, seed) for f in cfg.grid.fractions for seed in cfg.grid.seeds for s in cfg.grid.signals]
    results = []
    for n, (signal, fraction, seed) in enumerate(cells, 1):
        log.info("grid cell %d/%d: %s", n, len(cells), cell_name(signal, fraction, seed))
        results.append(run_cell(run, cfg, signal, fraction, seed, caches, examples, layer_idx, probe_test))
    return results
