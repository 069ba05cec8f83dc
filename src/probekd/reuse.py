"""Starting a run from another run's work: its probes, the targets files and the finished students that are the
same under both configurations, copied so that they are not made again. A PACED grid shares its targets and its
forward-KL unweighted students with the plain grid of the same teacher and student; a grid with a new axis shares
every cell the old one finished.

A targets file depends on the task, teacher, limits, extraction, probe settings, `grid.mode`,
`grid.teacher_temperature`, `grid.smoothing` and the dev policy (`grid.dev`, `grid.min_dev`); a student on those
plus the student and the training settings as that cell uses them (its loss and weighting scheme; `switch_at` only
under a two-stage loss, the weighting's other fields only when it is weighted). The probes and the teacher's
answers depend on the first five alone: a source that differs only in those grid fields still gives them (the
teacher's extraction of the test split and the probes are not made again)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from probekd.atomic import copy_atomic
from probekd.config import RunConfig, recorded_config
from probekd.errors import ProbekdError
from probekd.experiment import TARGET_SECTIONS, cell_training, check_run_dir, config_differences
from probekd.layout import student_dir, targets_path, zero_shot_path

log = logging.getLogger(__name__)


def reuse_run(source: Path, run: Path, cfg: RunConfig) -> dict[str, list[str]]:
    """Copy into `run` (configured by `cfg`) what `source` holds that `run` would make the same and lacks: the
    probes, the teacher's answers, the targets files, the untrained student's predictions (same student) and the
    finished students of `cfg`'s grid cells. Returns the names copied (`targets`, `students`, `zero_shot`); refuses a
    source whose targets would differ, naming the fields."""
    path = source / "config.yaml"
    if not path.exists():
        raise ProbekdError(f"{path} is missing: {source} is not a probekd run directory")
    try:
        src_cfg = RunConfig.model_validate(recorded_config(path))
    except ValidationError as e:
        raise ProbekdError(f"{path} is not a valid run configuration: {e}") from None
    diff = config_differences(src_cfg.model_dump(mode="json"), cfg.model_dump(mode="json"), TARGET_SECTIONS)
    teacher_diff = [d for d in diff if not d.startswith("grid.")]
    if teacher_diff:
        raise ProbekdError(
            f"{source} was made with other teacher, data or probe settings (differs in: "
            f"{', '.join(teacher_diff)}); nothing of it can be reused"
        )
    if diff:  # e.g. another dev policy: the probes and the teacher's answers stand, the targets and students do not
        log.info("%s differs in %s: reusing its probes and teacher answers only", source, ", ".join(diff))
    check_run_dir(run, cfg)  # refuses a `run` made with another configuration, before anything is copied
    copied: dict[str, list[str]] = {"targets": [], "students": [], "zero_shot": []}
    if (source / "probes" / "summary.json").exists() and not (run / "probes").exists():
        copy_atomic(source / "probes", run / "probes")
    cells = [] if diff else cfg.cells()
    names = [f"answers-{s}" for s in ("train", "dev", "test")]
    names += list(dict.fromkeys(c.targets_name for c in cells))
    for name in names:
        src, dst = targets_path(source, name), targets_path(run, name)
        if src.exists() and not dst.exists():
            copy_atomic(src, dst)
            copied["targets"].append(name)
    # the untrained student's predictions per seed: the same when the student is (each file carries its key, which
    # `zero_shot_accuracy` checks before using it, so a copy made under another student is recomputed, not trusted)
    if src_cfg.student == cfg.student:
        for seed in dict.fromkeys(c.seed for c in cells):
            src, dst = zero_shot_path(source, seed), zero_shot_path(run, seed)
            if src.exists() and not dst.exists():
                copy_atomic(src, dst)
                copied["zero_shot"].append(dst.name)
    src_cells = {c.name for c in src_cfg.cells()}
    for cell in cells:
        name = cell.name
        src, dst = student_dir(source, name), student_dir(run, name)
        if name not in src_cells or not (src / "metrics.json").exists() or (dst / "metrics.json").exists():
            continue
        if cell_training(src_cfg, cell) != cell_training(cfg, cell):
            continue
        copy_atomic(src, dst, ignore=("checkpoints",))  # replaces an unfinished student of this run
        copied["students"].append(name)
    log.info(
        "reused from %s: %d targets files, %d finished students, %d untrained-student prediction files",
        source,
        len(copied["targets"]),
        len(copied["students"]),
        len(copied["zero_shot"]),
    )
    return copied
