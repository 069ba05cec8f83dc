"""A whole run: extraction, probes, soft targets, the grid of students, evaluation, report; each stage skipped
when its artifact is already there, so an interrupted run resumes where it stopped. The work splits in two stages:
`targets` needs the teacher and its caches, `students` needs only the small files under RUN/targets/ (and can run
on another machine, e.g. one with a GPU).

    RUN/config.yaml                        the resolved configuration
    RUN/teacher/<split>/, RUN/probes/      see `probekd extract`, `probekd probe`
    RUN/targets/<signal>-f<frac>-s<seed>.npz   training-split soft targets of one grid cell (`probekd.targets`)
    RUN/targets/answers-<split>.npz        ids, option masks, gold answers, teacher scores (no hidden states)
    RUN/students/<cell>/metrics.json       one trained and evaluated student (`Cell.name`: signal, fraction,
                                           seed, and the loss and weighting when not the default)
    RUN/report/                            `probekd report`
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from probekd.atomic import write_json, write_npz, write_text
from probekd.config import GridConfig, RunConfig, dump_config, recorded_config
from probekd.data.examples import MCQExample
from probekd.data.prompts import PromptTemplate
from probekd.errors import ProbekdError
from probekd.evaluate import classification_metrics, option_softmax
from probekd.layout import (
    Cell,
    answers_path,
    load_answers,
    log_path,
    metrics_path,
    model_dir,
    save_answers,
    student_dir,
    targets_path,
    zero_shot_path,
)
from probekd.probes.pipeline import load_inputs, run_probes
from probekd.probes.select import chosen_label
from probekd.ranks import ranks
from probekd.selection import pcoreset_subset
from probekd.student.kept import KeptManifest, KeptMetrics, save_kept
from probekd.targets import SoftTargets, dev_subset, labelled_subset, signal_targets
from probekd.teacher.cache import TeacherCache, differing_fields, fingerprint
from probekd.tuning import TUNED_FIELDS
from probekd.workers import held, shard_cells, spawn_workers, work_through

log = logging.getLogger(__name__)

# Sections whose change makes a run directory's artifacts stale (the grid may grow: new cells are added); the
# targets depend on the first five, a student also on the rest (`cell_training`).
TARGET_SECTIONS = ("task", "teacher", "limit", "extract", "probe")
_STUDENT_SECTIONS = ("student", "train", "train_by_signal")
_FIXED_SECTIONS = (*TARGET_SECTIONS, *_STUDENT_SECTIONS)
# grid fields that change what a cell of a given name holds (`min_dev` only under `dev: proportional`)
_FIXED_GRID = ("mode", "teacher_temperature", "smoothing", "dev", "min_dev")


def config_differences(
    old: dict[str, Any], new: dict[str, Any], sections: tuple[str, ...] = _FIXED_SECTIONS
) -> list[str]:
    """The dotted names of the fields of `sections` and of the fixed grid fields (`_FIXED_GRID`) in which two
    configurations (as dumped to JSON) differ; a grid field `old` lacks is no difference."""
    diff = []
    for section in sections:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{section}.{k}" for k in differing_fields(a, b)]
        elif a != b:
            diff.append(section)
    old_grid = old.get("grid") if isinstance(old.get("grid"), dict) else {}
    fixed = [k for k in _FIXED_GRID if k != "min_dev" or new["grid"].get("dev") == "proportional"]
    return diff + [f"grid.{k}" for k in fixed if k in old_grid and old_grid[k] != new["grid"][k]]


def cell_training(cfg: RunConfig, cell: Cell) -> dict[str, Any]:
    """The student and training settings one grid cell's student is made with (those it does not read left out):
    `train` with the signal's tuned recipe (`train_by_signal`), the cell's loss and weighting scheme; `switch_at`
    only under a two-stage loss, the weighting's other fields only when it is weighted (`influence_scale` and
    `ddk_smoothing` only for their own scheme), the hidden-state matching and LELP fields only when the term is
    on."""
    train = cfg.train_for(cell.signal).model_dump(mode="json")
    train["loss"] = cell.loss
    if ">" not in cell.loss:
        del train["switch_at"]
    for option in ("min_steps", "mixup"):
        if not train[option]:  # off: left out, as before the option existed (recorded fingerprints hold)
            del train[option]
    for term, fields in (("hidden_match", ("hidden_match_loss", "hidden_match_alpha")),
                         ("lelp", ("lelp_directions", "lelp_temperature"))):  # fmt: skip
        if not train[term]:  # off: left out, as before the option existed (recorded fingerprints hold)
            for k in (term, *fields):
                del train[k]
    if cell.weighting == "none":
        del train["weighting"]
    else:
        train["weighting"]["scheme"] = cell.weighting
        for scheme, key in (("influence", "influence_scale"), ("ddk", "ddk_smoothing")):
            if cell.weighting != scheme:
                del train["weighting"][key]
    student = cfg.student.model_dump(mode="json")
    if student["kind"] != "encoder":  # the encoder head means nothing to a causal student
        del student["head"]
    return {"student": student, "train": train}


def _changed_students(run: Path, old: RunConfig, new: RunConfig) -> list[str]:
    """The finished students of `run` (made under `old`) that `new` would train otherwise."""
    return [
        c.name
        for c in old.cells()
        if metrics_path(run, c.name).exists() and cell_training(old, c) != cell_training(new, c)
    ]


def check_run_dir(run: Path, cfg: RunConfig, overwrite: bool = False) -> None:
    """Refuse a run directory made from another configuration (naming the fields), then record this one.

    The grid's axes may grow between invocations (one process per signal, a fraction added later): the recorded
    RUN/config.yaml keeps the union of every invocation's fractions, seeds, signals, losses and weightings, so it
    describes the whole directory. `grid.mode`, `grid.teacher_temperature`, `grid.smoothing` and the dev policy
    (`grid.dev`, `grid.min_dev`) change what a cell of a given name holds, so they must match like the fixed
    sections. The student and training settings may change while no finished student was made with them (after
    `probekd tune`, which trains in RUN/tune/, a run applies the chosen recipes in the same folder)."""
    path = run / "config.yaml"
    recorded = cfg
    if path.exists() and not overwrite:
        old = recorded_config(path)
        # fields added to the schema since (with their defaults) are no difference; if the old config no longer
        # validates, it is compared as written (a field that no longer exists shows as a difference)
        old_cfg = None
        with contextlib.suppress(ValidationError):
            old_cfg = RunConfig.model_validate(old)
            old = old_cfg.model_dump(mode="json")
        diff = config_differences(old, cfg.model_dump(mode="json"))
        if old_cfg is not None and diff and all(d.partition(".")[0] in _STUDENT_SECTIONS for d in diff):
            changed = _changed_students(run, old_cfg, cfg)
            if changed:
                raise ProbekdError(
                    f"{run} holds finished students made with other student or training settings (differs in: "
                    f"{', '.join(diff)}; students: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                    "use another output folder (`--reuse` copies what stays the same), or --overwrite"
                )
            diff = []
        if diff:
            raise ProbekdError(
                f"{run} was made with another configuration (differs in: {', '.join(diff)}); "
                "use another output folder, or --overwrite to redo the stages that depend on them"
            )
        if old_cfg is not None:
            recorded = _with_grid_union(cfg, old_cfg)
    if overwrite:  # everything downstream of the configuration is redone
        for stale in ("targets", "students", "report"):
            shutil.rmtree(run / stale, ignore_errors=True)
    write_text(path, dump_config(recorded))


def _with_grid_union(cfg: RunConfig, old: RunConfig) -> RunConfig:
    """`cfg` with each grid axis extended by the values `old` had and `cfg` lacks (old ones first), and the
    `exclude` entries that name no cell of the other invocation."""
    defaults = {"losses": [cfg.train.loss], "weightings": [cfg.train.weighting.scheme], "selections": ["random"]}
    merged: dict[str, Any] = {}
    for axis in ("fractions", "seeds", "signals", "losses", "weightings", "selections"):
        a, b = getattr(old.grid, axis), getattr(cfg.grid, axis)
        if a is None and b is None:
            continue
        a, b = a or defaults[axis], b or defaults[axis]
        merged[axis] = list(dict.fromkeys([*a, *b]))
    # an entry that one side leaves out stays out only if the other side has no cell it names (that cell may be there)
    old_cells, new_cells = old.cells(), cfg.cells()
    keep = [p for p in cfg.grid.exclude if not any(p.matches(c) for c in old_cells)]
    keep += [p for p in old.grid.exclude if p not in keep and not any(p.matches(c) for c in new_cells)]
    merged["exclude"] = keep
    # through validation again, so that the fractions come out sorted as always
    grid = type(cfg.grid).model_validate(cfg.grid.model_dump() | merged)
    return cfg.model_copy(update={"grid": grid})


def examples_by_id(
    cfg: RunConfig, splits: tuple[str, ...] = ("train", "dev", "test")
) -> dict[str, dict[str, MCQExample]]:
    """The task's questions of `splits`, by id (a split the task lacks is left out)."""
    from probekd.data import load_task

    loaded = load_task(cfg.task)
    return {s: {e.id: e for e in loaded.splits[s]} for s in splits if s in loaded.splits}


def check_domains(cfg: RunConfig) -> None:
    """A grid with DDK cells (`ddk` among its weightings) needs a domain for every training question, and two
    domains at least: refused before any stage runs, naming what is missing (the trainer would find out only when
    that cell starts)."""
    if not any(c.weighting == "ddk" for c in cfg.cells()):
        return
    train = list(examples_by_id(cfg, ("train",)).get("train", {}).values())
    missing = [e.id for e in train if e.domain is None]
    if missing:
        raise ProbekdError(f"grid.weightings has ddk, which mixes the data's domains, but {len(missing)} of "
                           f"{len(train)} training questions have no domain (e.g. {missing[:3]}): give each record "
                           "a `domain` field or column (or name it in task.columns.domain)")  # fmt: skip
    domains = {e.domain for e in train}
    if len(domains) < 2:
        raise ProbekdError(f"grid.weightings has ddk, which mixes the data's domains, but every training question "
                           f"is in one ({domains.pop()!r}): it would weight every row 1")  # fmt: skip


def _within_labelled(c: TeacherCache, pick: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Bool [N] over the rows of `c`: True on the labelled rows that `pick` keeps (given their ids, in order)."""
    lab_all = c.answers >= 0
    keep = np.zeros(len(c.ids), dtype=bool)
    keep[np.flatnonzero(lab_all)] = pick([i for i, ok in zip(c.ids, lab_all, strict=True) if ok])
    return keep


def _ids_sha(ids: list[str], keep: np.ndarray) -> str:
    """A fingerprint of the ids of the rows `keep` marks (which questions a cell labels)."""
    return fingerprint({"ids": [i for i, k in zip(ids, keep, strict=True) if k]})


def labelled_rows(train: TeacherCache, fraction: float, seed: int, selection: str = "random") -> np.ndarray:
    """The training rows whose gold label a cell may use: the nested subset of the labelled rows, drawn at random
    from the seed or chosen by `selection` (`probekd.selection`; from the teacher's answers, never the labels)."""
    if selection == "pcoreset":
        probs = option_softmax(train.scores, train.mask)[train.answers >= 0]
        return _within_labelled(train, lambda ids: pcoreset_subset(ids, probs, fraction, seed))
    return _within_labelled(train, lambda ids: labelled_subset(ids, fraction, seed))


def dev_labelled(dev: TeacherCache, grid: GridConfig, fraction: float, seed: int) -> np.ndarray:
    """The dev rows whose gold label a cell may use for selection (bool [N_dev]): every labelled row under
    `grid.dev: full`; under `proportional`, the cell's fraction of them (`probekd.targets.dev_subset`, at least
    `grid.min_dev`)."""
    if grid.dev == "full":
        return dev.answers >= 0
    return _within_labelled(dev, lambda ids: dev_subset(ids, fraction, seed, grid.min_dev))


def _student_inputs_there(run: Path) -> bool:
    """Whether the probes' test predictions and the teacher's answers on every split are there: with the targets
    files, all the student stage reads."""
    paths = [run / "probes" / "test.npz"] + [answers_path(run, s) for s in ("train", "dev", "test")]
    return all(p.exists() for p in paths)


def _test_part_done(run: Path) -> bool:
    """Whether what the test split's teacher cache is for is done (`_student_inputs_there`), with no more options on
    test than on train and dev (targets made without the test cache are as wide as the wider of those two)."""
    if not _student_inputs_there(run):
        return False
    k = {s: c.mask.shape[1] for s, c in load_answers(run).items()}
    return k["test"] <= max(k["train"], k["dev"])


def _check_same_answers(run: Path, caches: dict[str, TeacherCache]) -> None:
    """Refuse teacher caches made again that disagree with the answers the probes and students were made from."""
    saved = load_answers(run, tuple(caches))
    for split, c in caches.items():
        old = saved[split]
        if c.ids != old.ids or c.scores.shape != old.scores.shape or not np.allclose(c.scores, old.scores, atol=1e-2):
            raise ProbekdError(
                f"the teacher cache of split {split!r} made again under {run / 'teacher'} does not give the answers "
                f"in {answers_path(run, split)} (other ids or scores): the teacher or the data changed; redo the "
                "targets stage with --overwrite"
            )


def prepare_targets(cfg: RunConfig, run: Path, *, overwrite: bool = False) -> None:
    """The stages that need the teacher: extraction, probes, and every grid cell's soft targets (each written to
    RUN/targets/<cell>.npz, skipped when there), plus the teacher's answers the student stage reads."""
    from probekd.teacher.pipeline import extract_task

    check_run_dir(run, cfg, overwrite)
    # targets: no loss or weighting axis
    cells = list(dict.fromkeys(Cell(c.signal, c.fraction, c.seed, selection=c.selection) for c in cfg.cells()))
    names = [c.targets_name for c in cells]
    if not overwrite and _student_inputs_there(run) and all(targets_path(run, n).exists() for n in names):
        # the teacher and its caches are not needed (a fresh clone of a committed run has neither)
        log.info("targets stage: the probes, the teacher's answers and all %d targets files are there", len(cells))
        return
    if overwrite or not _test_part_done(run):
        extract_task(cfg.task, cfg.teacher, run, ["train", "dev", "test"], cfg.extract, cfg.limit, overwrite)
        if not ranks().main:  # under a launcher the ranks share the extraction; rank 0 alone goes on
            return
        run_probes(run, cfg.probe, overwrite=overwrite)
        caches, _, layer_idx = load_inputs(run, cfg.probe)
        if "test" not in caches:
            raise ProbekdError(f"no teacher cache for the test split under {run / 'teacher'}")
        save_answers(run, caches)
    else:  # only targets are missing: they need the train and dev caches, not the test one (a third of the work)
        log.info("targets stage: the probes and the teacher's test answers are there; extracting train and dev only")
        extract_task(cfg.task, cfg.teacher, run, ["train", "dev"], cfg.extract, cfg.limit, overwrite)
        if not ranks().main:
            return
        caches, _, layer_idx = load_inputs(run, cfg.probe, ("train", "dev"))
        _check_same_answers(run, caches)
    # the probe's targets first: `smoothed` (matched to their entropy) reads those of its own labels
    cells.sort(key=lambda c: c.signal != "probe")
    done: dict[tuple[str, bytes, bytes], str] = {}  # (signal, labelled rows, dev rows) -> a cell with those targets
    for n, cell in enumerate(cells, 1):
        signal, fraction, seed, name = cell.signal, cell.fraction, cell.seed, cell.targets_name
        path = targets_path(run, name)
        labelled = labelled_rows(caches["train"], fraction, seed, cell.selection)
        dev_rows = dev_labelled(caches["dev"], cfg.grid, fraction, seed)
        # e.g. every seed at fraction 1 labels the same rows
        key = (signal, np.packbits(labelled).tobytes(), np.packbits(dev_rows).tobytes())
        if path.exists():
            done.setdefault(key, name)
            continue
        if key in done:  # the same inputs give the same targets: copied, not refitted
            log.info("targets %d/%d: %s (same labelled rows as %s)", n, len(cells), name, done[key])
            same = SoftTargets.load(targets_path(run, done[key]))
            same.meta["same_as"] = done[key]
            same.save(path)
            continue
        log.info("targets %d/%d: %s", n, len(cells), name)
        t0 = time.perf_counter()
        probe_path = _probe_targets_path(run, cell)
        made = signal_targets(
            signal, caches, labelled, cfg.probe, layer_idx, cfg.grid.teacher_temperature,
            dev_labelled=dev_rows, smoothing=cfg.grid.smoothing,
            probe_targets=SoftTargets.load(probe_path) if signal == "smoothed" and probe_path.exists() else None,
        )["train"]  # fmt: skip
        made.meta["n_labelled"] = int(labelled.sum())
        made.meta["labelled_sha256"] = _ids_sha(caches["train"].ids, labelled)
        made.meta["n_dev"] = int(dev_rows.sum())  # the dev labels that chose its layer, temperature, calibration
        made.meta["seconds"] = round(time.perf_counter() - t0, 2)
        made.save(path)
        done[key] = name


def run_cell(
    run: Path,
    cfg: RunConfig,
    cell: Cell,
    caches: dict[str, TeacherCache],
    examples: dict[str, dict[str, MCQExample]],
    probe_test: np.ndarray,
) -> dict[str, Any]:
    """Training and evaluation of one grid cell from its targets file; returns (and writes) its metrics."""
    from probekd.student.train import predict, train_student

    signal, fraction, seed, loss, weighting = cell.signal, cell.fraction, cell.seed, cell.loss, cell.weighting
    name = cell.name
    out = student_dir(run, name)
    if (out / "metrics.json").exists():
        done = json.loads((out / "metrics.json").read_text())
        if done.get("mode", cfg.grid.mode) != cfg.grid.mode:  # e.g. a student copied in from another run
            raise ProbekdError(
                f"{out / 'metrics.json'} is a {done['mode']} student, this grid is {cfg.grid.mode} "
                "(grid.mode); remove that folder or use another output folder"
            )
        return done
    t0 = time.perf_counter()
    student, train_rows, dev_rows, info = prepare_cell(run, cfg, cell, caches, examples)
    test = caches["test"]
    kmax = student.k
    test_rows = _rows(student, examples["test"], test.ids, test.padded_mask(kmax), test.answers)
    zero_shot = zero_shot_accuracy(run, cfg, cell, student, caches, examples, info["dev_ids"])
    recipe = cfg.train_for(signal)
    train_cfg = recipe.model_copy(
        update={"loss": loss, "weighting": recipe.weighting.model_copy(update={"scheme": weighting})}
    )
    history = train_student(
        student, train_rows, dev_rows, train_cfg, out / "checkpoints", seed,
        log_file=log_path(run, name), description=f"student {name}",
    )  # fmt: skip
    adapter = out / ".adapter-partial"  # the LoRA adapter alone, moved into the kept folder
    writes = ranks().main  # under a launcher: rank 0 writes
    if writes:
        shutil.rmtree(adapter, ignore_errors=True)
    student.merge_lora(adapter if cfg.grid.keep_students != "none" and writes else None)
    # the test predictions come from the merged weights the kept folder holds, so `probekd predict` on it agrees
    probs = predict(student, test_rows, cfg.train.eval_batch_size)
    others = {"teacher": test.teacher_predictions(), "probe": probe_test}
    metrics = classification_metrics(probs, test.answers, others, seed=seed)
    dev_acc = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
    n_labelled, n_dev = info["n_labelled"], info["n_dev"]
    metrics.update(
        {
            "cell": name,
            "signal": signal,
            "fraction": fraction,
            "seed": seed,
            "loss": loss,
            "weighting": weighting,
            "selection": cell.selection,
            "weights": [h["weighting"] for h in history if "weighting" in h],
            "mode": cfg.grid.mode,
            "n_train_rows": len(train_rows),
            "n_labelled": n_labelled,
            "n_dev": n_dev,
            "labels_used": n_labelled + n_dev,
            "dev_policy": cfg.grid.dev,
            "dev_chance": info["dev_chance"],
            "best_dev_accuracy": max(dev_acc) if dev_acc else None,
            "dev_accuracy_by_epoch": dev_acc,
            "zero_shot": zero_shot,
            "train": train_cfg.model_dump(mode="json", include={"epochs", "batch_size", *TUNED_FIELDS}),
            "targets": info["targets_meta"],
            "config_fingerprint": fingerprint({k: cfg.model_dump(mode="json")[k] for k in _FIXED_SECTIONS}),
            "processes": ranks().world,  # the ranks that trained it together (DDP under a launcher)
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    if not writes:
        return metrics
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "test_probs.npy", probs)
    if cfg.grid.keep_students != "none":
        manifest = kept_manifest(run, cfg, cell, metrics, kmax, n_dev, others, test.answers, student.template)
        save_kept(student, model_dir(run, name), manifest, adapter)
    shutil.rmtree(adapter, ignore_errors=True)
    write_json(metrics_path(run, name), metrics)  # last: its presence marks the cell done
    return metrics


def _rows(student: Any, examples: dict[str, MCQExample], ids: list[str], mask: np.ndarray, gold: np.ndarray,
          soft: np.ndarray | None = None, teacher_states: np.ndarray | None = None,
          subclass_targets: np.ndarray | None = None) -> Any:  # fmt: skip
    """The student's encoded inputs of questions `ids` (`probekd.student.train.Rows`), with their domains."""
    from probekd.student.train import Rows

    return Rows([student.encode(examples[i]) for i in ids], mask, gold, soft, teacher_states=teacher_states,
                subclass_targets=subclass_targets, domains=[examples[i].domain for i in ids])  # fmt: skip


def _probe_targets_path(run: Path, cell: Cell) -> Path:
    """The `probe` targets file of `cell`'s labels (its fraction, seed and selection), whatever its signal."""
    return targets_path(run, Cell("probe", cell.fraction, cell.seed, selection=cell.selection).targets_name)


def _probe_layer_states(run: Path, kmax: int, cell: Cell | None, term: str) -> tuple[np.ndarray, TeacherCache]:
    """The teacher's states of the whole training split at the probe's chosen (feature, layer) [N, kmax, H],
    standardized over its present options, and the train cache. Read from RUN/teacher/train/ (one layer of it). The
    layer is the one the probe of `cell`'s labels chose (its targets file, when the grid has the probe signal), so
    the cell's label budget holds; else the probe stage's (all labels). `term` names the caller in errors."""
    from probekd.student.hidden_match import standardize_states
    from probekd.teacher.cache import load_cache

    folder = run / "teacher" / "train"
    if not (folder / "manifest.json").exists():
        raise ProbekdError(f"train.{term} reads the teacher's states of the training split from {folder}, "
                           "which is not here; train these students where the teacher caches are")  # fmt: skip
    cache = load_cache(folder)
    if cache.manifest["formulation"] != "option":
        raise ProbekdError(f"train.{term} works on the teacher's option states: it needs an `option`-formulation "
                           "cache (extract.formulation: option)")  # fmt: skip
    summary = json.loads((run / "probes" / "summary.json").read_text())
    feature, layer = summary["chosen_feature"], summary["chosen_layer"]
    probe = _probe_targets_path(run, cell) if cell is not None else None
    if probe is not None and probe.exists():
        meta = SoftTargets.load(probe).meta
        feature, layer = meta.get("feature", feature), meta.get("layer", layer)
    else:
        log.warning("%s: no probe targets for this cell's labels; using the probe stage's layer %d (chosen with "
                    "every label)", term, layer)  # fmt: skip
    name = "hidden_mean" if feature == "mean" else "hidden"
    states = cache.layer_states(name, [cache.layers.index(layer)])[0]
    states = standardize_states(states, cache.mask)
    padded = np.zeros((len(cache.ids), kmax, states.shape[-1]), dtype=np.float32)
    padded[:, : states.shape[1]] = states
    return padded, cache


def matched_states(run: Path, rows_idx: np.ndarray, kmax: int, cell: Cell | None = None) -> np.ndarray:
    """For hidden-state matching (`train.hidden_match`): the teacher's standardized states at the probe's chosen
    (feature, layer) of training rows `rows_idx` [n, kmax, H] (`_probe_layer_states`)."""
    return _probe_layer_states(run, kmax, cell, "hidden_match")[0][rows_idx]


def lelp_subclasses(run: Path, rows_idx: np.ndarray, kmax: int, cell: Cell, directions: int,
                    temperature: float) -> np.ndarray:  # fmt: skip
    """For LELP (`train.lelp`): the pseudo-subclass distribution within each option of training rows `rows_idx`
    [n, kmax, 2 * directions] (`probekd.student.lelp.subclass_targets`), fitted on the whole training split's
    states at the probe's layer with the logits of the probe of `cell`'s labels (its targets file: the cell's label
    budget holds; the teacher's states themselves need no label)."""
    from probekd.student.lelp import subclass_targets

    path = _probe_targets_path(run, cell)
    if not path.exists():
        raise ProbekdError(f"train.lelp removes the probe's direction from the teacher's states, found from the probe "
                           f"targets of this cell's labels ({path}), which are not there: add `probe` to grid.signals "
                           "(and to tune.signals, for `probekd tune`) and run the targets stage")  # fmt: skip
    states, cache = _probe_layer_states(run, kmax, cell, "lelp")
    mask = cache.padded_mask(kmax)
    probs = SoftTargets.load(path).align(cache.ids, mask)
    logits = np.log(np.clip(probs, 1e-8, None))
    return subclass_targets(states, mask, logits, directions, temperature)[rows_idx]


def prepare_cell(
    run: Path,
    cfg: RunConfig,
    cell: Cell,
    caches: dict[str, TeacherCache],
    examples: dict[str, dict[str, MCQExample]],
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """What training one grid cell's student needs, from its targets file and the train and dev caches (never
    test): a fresh student, its training rows, the cell's own dev rows (they choose its epoch), and facts for its
    metrics (`n_labelled`, `n_dev`, `dev_chance`, `targets_meta`). Shared by the grid and `probekd tune`."""
    from probekd.student.heads import build_student

    signal, fraction, seed = cell.signal, cell.fraction, cell.seed
    train = caches["train"]
    kmax = max(c.mask.shape[1] for c in caches.values())
    labelled = labelled_rows(train, fraction, seed, cell.selection)
    path = targets_path(run, cell.targets_name)
    if not path.exists():
        raise ProbekdError(f"{path} is missing: run the targets stage first (`probekd run CONFIG --stage targets`)")
    targets = SoftTargets.load(path)
    if targets.meta.get("n_labelled") != int(labelled.sum()):
        raise ProbekdError(
            f"{path} was made from {targets.meta.get('n_labelled')} labelled rows, this cell has "
            f"{int(labelled.sum())}; redo the targets stage with --overwrite"
        )
    # the same rows, not only as many (a selection from re-extracted teacher scores could differ); older files lack it
    rows_sha = _ids_sha(train.ids, labelled)
    if targets.meta.get("labelled_sha256", rows_sha) != rows_sha:
        raise ProbekdError(f"{path} was made from other labelled questions than this cell's {cell.selection} selection "
                           "gives; redo the targets stage with --overwrite")  # fmt: skip
    dev_rows_used = dev_labelled(caches["dev"], cfg.grid, fraction, seed)
    n_dev = int(dev_rows_used.sum())
    made_dev = targets.meta.get("n_dev", int((caches["dev"].answers >= 0).sum()))  # older files: the full dev
    if made_dev != n_dev:
        raise ProbekdError(
            f"{path} was made with {made_dev} dev labels, this cell uses {n_dev} (grid.dev: {cfg.grid.dev}); "
            "redo the targets stage with --overwrite"
        )
    # rows the student trains on: the labelled subset, plus the unlabelled pool in semi-supervised mode when the
    # signal labels it (hard targets exist only for labelled rows)
    have = set(targets.ids)
    use = labelled | ((cfg.grid.mode == "semi") & np.array([i in have for i in train.ids]))
    rows_idx = np.flatnonzero(use)
    ids = [train.ids[i] for i in rows_idx]
    mask = train.padded_mask(kmax)[rows_idx]
    gold = np.where(labelled, train.answers, -1)[rows_idx]
    soft = targets.align(ids, mask)
    student = build_student(cfg.student, kmax, seed)
    tc = cfg.train_for(signal)
    states = matched_states(run, rows_idx, kmax, cell) if tc.hidden_match > 0 else None
    subclass = (lelp_subclasses(run, rows_idx, kmax, cell, tc.lelp_directions, tc.lelp_temperature)
                if tc.lelp > 0 else None)  # fmt: skip
    train_rows = _rows(student, examples["train"], ids, mask, gold, soft, states, subclass)
    dev = caches["dev"]
    dev_idx = np.flatnonzero(dev_rows_used)
    dev_rows = _rows(student, examples["dev"], [dev.ids[i] for i in dev_idx], dev.padded_mask(kmax)[dev_idx],
                     dev.answers[dev_idx])  # fmt: skip
    log.info("cell %s: %d training rows (%d labelled), signal %s", cell.name, len(ids), int((gold >= 0).sum()), signal)
    info = {
        "n_labelled": int((gold >= 0).sum()),
        "n_dev": n_dev,
        "dev_chance": float(np.mean(1.0 / np.maximum(dev.mask[dev_idx].sum(1), 1))) if n_dev else None,
        "targets_meta": targets.meta,
        "dev_ids": [dev.ids[i] for i in dev_idx],
    }
    return student, train_rows, dev_rows, info


def zero_shot_accuracy(
    run: Path,
    cfg: RunConfig,
    cell: Cell,
    student: Any,
    caches: dict[str, TeacherCache],
    examples: dict[str, dict[str, MCQExample]],
    dev_ids: list[str],
) -> dict[str, float | None]:
    """The student's accuracy before any training, on the cell's dev questions (`dev_ids`) and on test: its
    pretrained judgement (a bi-encoder's cosines, a causal student's option likelihoods; a fresh cross-encoder head
    is at chance). A trained student below it has unlearned what it knew. The untrained student depends on the
    student settings and the seed only, so its probabilities on every dev and test question are computed once per
    seed (RUN/zero_shot/s<seed>.npz) and shared by the cells."""
    from probekd.student.train import predict

    path = zero_shot_path(run, cell.seed)
    key = fingerprint({"student": cfg.student.model_dump(mode="json"), "k": student.k})
    with held(run, f"zero_shot-s{cell.seed}"):  # another worker may be computing the same seed's file
        saved = dict(np.load(path)) if path.exists() else {}
        same_ids = all(saved.get(f"{s}_ids", np.array([])).tolist() == caches[s].ids for s in ("dev", "test"))
        if str(saved.get("key", "")) != key or not same_ids:
            saved = {"key": np.array(key)}
            for split in ("dev", "test"):
                c = caches[split]
                rows = _rows(student, examples[split], c.ids, c.padded_mask(student.k), c.answers)
                saved[f"{split}_ids"] = np.array(c.ids)
                saved[f"{split}_correct"] = predict(student, rows, cfg.train.eval_batch_size).argmax(1) == c.answers
            write_npz(path, **saved)
    out: dict[str, float | None] = {}
    for split, ids in (("dev", dev_ids), ("test", None)):
        c = caches[split]
        keep = (c.answers >= 0) & (np.isin(saved[f"{split}_ids"], ids) if ids is not None else True)
        out[f"{split}_accuracy"] = float(saved[f"{split}_correct"][keep].mean()) if keep.any() else None
    return out


def kept_manifest(
    run: Path,
    cfg: RunConfig,
    cell: Cell,
    metrics: dict[str, Any],
    k: int,
    n_dev: int,
    others: dict[str, np.ndarray],
    answers: np.ndarray,
    template: PromptTemplate | None = None,
) -> KeptManifest:
    """The `probekd.json` of a grid cell's kept student: how to ask it, how it was made, how well it does (and its
    teacher and probe on the same test questions, `others`: their predicted options)."""
    import probekd

    probes_path = run / "probes" / "summary.json"
    probes = json.loads(probes_path.read_text()) if probes_path.exists() else None
    lab = answers >= 0
    ref = {name: float((pred[lab] == answers[lab]).mean()) if lab.any() else None for name, pred in others.items()}
    return KeptManifest(
        probekd_version=probekd.__version__,
        student=cfg.student,
        template=template,
        num_options=k,
        eval_batch_size=cfg.train.eval_batch_size,
        task=cfg.task,
        cell=cell.name,
        run_name=cfg.name,
        signal=cell.signal,
        teacher=cfg.teacher,
        teacher_formulation=cfg.extract.formulation,
        probe=chosen_label(probes) if probes else None,
        fraction=cell.fraction,
        seed=cell.seed,
        loss=cell.loss,
        weighting=cell.weighting,
        selection=cell.selection,
        n_labelled=metrics["n_labelled"],
        n_dev=n_dev,
        metrics=KeptMetrics(
            test_accuracy=metrics["accuracy"],
            test_accuracy_ci=metrics["accuracy_ci"],
            n_test=metrics["n"],
            dev_accuracy=metrics["best_dev_accuracy"],
            teacher_test_accuracy=ref.get("teacher"),
            probe_test_accuracy=ref.get("probe"),
        ),
    )


def prune_kept(run: Path, cfg: RunConfig) -> list[str]:
    """Under `grid.keep_students: best`, remove the kept folders of every finished cell but the best of its
    (signal, fraction, loss, weighting, selection): the highest best dev accuracy, ties to the lower seed (never
    test). Returns the cells whose folder was removed."""
    if cfg.grid.keep_students != "best":
        return []
    groups: dict[tuple[str, float, str, str, str], list[tuple[float, int, str]]] = {}
    for c in cfg.cells():
        path = metrics_path(run, c.name)
        if path.exists() and model_dir(run, c.name).is_dir():
            dev = json.loads(path.read_text()).get("best_dev_accuracy")
            key = (c.signal, c.fraction, c.loss, c.weighting, c.selection)
            groups.setdefault(key, []).append((-(dev if dev is not None else -1.0), c.seed, c.name))
    removed = []
    for members in groups.values():
        for _, _, name in sorted(members)[1:]:
            shutil.rmtree(model_dir(run, name))
            removed.append(name)
    return removed


def run_experiment(
    cfg: RunConfig,
    run: Path,
    *,
    overwrite: bool = False,
    stage: str = "all",
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """The stages of `cfg` into `run`; returns the metrics of every cell this call covers (finished cells are read,
    not rerun).

    `stage`: `all`; `targets` (what needs the teacher, see `prepare_targets`); `students` (the grid of students from
    those targets: needs only RUN/config.yaml, RUN/probes/ and RUN/targets/, not the teacher or its caches, so it
    can run on another machine: copy the run directory without `teacher/*/shard-*`). The students are trained by
    `workers` processes sharing the grid, or only shard (i, n) of it (`probekd.workers`): each cell under a lock,
    so processes on one run folder never train the same cell. Under a launcher (`torchrun`), the ranks share the
    teacher's extraction, rank 0 alone fits the probes and makes the targets, and then every rank trains each
    student together (DDP, `train_cells`), rank 0 writing."""
    if stage not in ("all", "targets", "students"):
        raise ProbekdError(f"unknown stage {stage!r}; known: all, targets, students")
    if workers < 1:
        raise ProbekdError(f"--workers must be at least 1, got {workers}")
    if stage == "targets" and (workers > 1 or shard is not None):
        raise ProbekdError("--workers and --shard split the student grid; --stage targets trains no student")
    r = ranks()
    if r.world > 1 and (workers > 1 or shard is not None):
        raise ProbekdError("under a launcher (torchrun) the ranks train each student together (DDP); --workers and "
                           "--shard split the grid between independent processes: use one or the other")  # fmt: skip
    check_domains(cfg)
    if stage != "students":
        # concurrent --shard jobs: one does the targets stage, the others then find it done (a launcher's ranks
        # share the extraction, meeting at barriers, and rank 0 does the rest: no lock there)
        with held(run, "targets") if r.world == 1 else contextlib.nullcontext():
            prepare_targets(cfg, run, overwrite=overwrite)
        if stage == "targets":
            return []
    elif overwrite:
        raise ProbekdError("--overwrite with --stage students would delete the targets that stage needs")
    elif r.main:
        with held(run, "targets"):
            check_run_dir(run, cfg)
    r.barrier()  # under a launcher the other ranks wait here for rank 0's probes and targets
    cells = shard_cells(cfg.cells(), shard)
    if workers == 1:
        return train_cells(cfg, run, cells)
    log.info("%d grid cells on %d worker processes", len(cells), workers)
    spawn_workers(workers, train_cells, (cfg, run, cells))
    return [json.loads(metrics_path(run, c.name).read_text()) for c in cells]


def train_cells(cfg: RunConfig, run: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """Train and evaluate `cells` of a run whose targets are there, each under its claim (`probekd.workers`: a cell
    another process holds is left to it, or taken over when that process dies); returns their metrics in order.
    Under a launcher every rank goes through the cells in order and trains each one with the others (DDP): no
    claims, a cell finished before is skipped by all, rank 0 writes."""
    caches = load_answers(run)
    examples = examples_by_id(cfg)
    with np.load(run / "probes" / "test.npz") as z:
        probe_test = z["probs"].argmax(1)
    position = {c.name: n for n, c in enumerate(cells, 1)}
    r = ranks()

    def train(cell: Cell) -> dict[str, Any]:
        log.info("grid cell %d/%d: %s", position[cell.name], len(cells), cell.name)
        metrics = run_cell(run, cfg, cell, caches, examples, probe_test)
        if r.main:
            with held(run, "prune"):
                prune_kept(run, cfg)
        return metrics

    if r.world > 1:
        done = []
        for cell in cells:
            r.barrier()  # every rank sees the same finished cells
            done.append(train(cell))
        r.barrier()
        return done
    return work_through(run, cells, train)
