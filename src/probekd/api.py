"""The Python API, for notebooks and scripts: every stage as a function that returns objects, not only files.

    import probekd
    task = probekd.load_task("arc_easy")                       # a Task: its splits' MCQExamples
    cfg = probekd.load_config("my.yaml", ["grid.seeds=[0]"])   # a typed RunConfig (or from a dict)
    cfg = probekd.tune(cfg, "runs/mine")                       # optional: each signal's recipe chosen on dev
    cells = probekd.run(cfg, "runs/mine")                      # extract, probe, targets, students, report; resumes
    rows = probekd.results("runs/mine")                        # one dict per finished student (results.csv)
    folder = probekd.export("runs/mine", signal="probe")       # the best-dev kept student, ready to share
    student = probekd.load_student(folder)                     # answers new questions
    student.predict([{"question": "...", "options": ["...", "..."]}])
    problems = probekd.load_problems("gsm8k")                  # free-form tasks: Problems per split
    ro = probekd.rollouts("arith:steps=1", "smollm2-135m-instruct", "runs/ro", limit=50, k=8)  # ro.pass_rates

`import probekd` loads none of this (nor torch): each name is imported when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekd.config import RunConfig
from probekd.data.tasks import Task
from probekd.predict import KeptStudent

if TYPE_CHECKING:  # the generative track imports torch and transformers: only when used
    from probekd.generative.problems import ProblemSet
    from probekd.generative.rollouts import RolloutSet


def load_task(task: str, fmt: str = "auto", columns: dict[str, Any] | None = None) -> Task:
    """A built-in task, a folder of train/dev/test files, or `hf:<dataset>`, as MCQExamples per split."""
    from probekd.data import load_task as _load
    from probekd.data.formats import Columns
    from probekd.data.tasks import TaskSpec

    cols = Columns.model_validate(columns) if columns else None
    return _load(TaskSpec(name=task, format=fmt, columns=cols))  # type: ignore[arg-type]


def load_config(config: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run configuration from a YAML file or a dict (fields as in YAML), with `section.field=value` overrides."""
    from probekd.config import load_config as _load

    if isinstance(config, dict):
        return _load(None, overrides, base=config)
    return _load(Path(config) if config is not None else None, overrides)


def run(
    config: RunConfig | str | Path | dict[str, Any],
    out: str | Path,
    *,
    stage: str = "all",
    overwrite: bool = False,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a whole configuration into the run folder `out` and write its report; returns the metrics
    of every cell this call covers (all of the grid, or the cells of `shard`). `stage`: `all`, `targets` (needs
    the teacher) or `students` (see `probekd run`); `workers` processes share the student grid, or only `shard`
    (i, n) of it is trained (`probekd.workers`)."""
    from probekd.experiment import run_experiment
    from probekd.report.report import write_report

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    cells = run_experiment(cfg, Path(out), overwrite=overwrite, stage=stage, workers=workers, shard=shard)
    if stage != "targets":
        write_report(Path(out))
    return cells


def tune(config: RunConfig | str | Path | dict[str, Any], out: str | Path) -> RunConfig:
    """`probekd tune`: search each signal's training recipe on dev (never test) in the run folder `out`; returns
    the configuration with the chosen recipes (`train_by_signal`), to `run` in the same folder."""
    from probekd.tuning import run_tune, tuned_config

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    return tuned_config(cfg, run_tune(cfg, Path(out)))


def results(run: str | Path) -> list[dict[str, Any]]:
    """One plain dict per finished student of a run (the columns of its `results.csv`)."""
    from probekd.report.report import results_table

    return results_table(Path(run))


def export(
    run: str | Path, out: str | Path | None = None, *, signal: str | None = None, fraction: float | None = None
) -> Path:
    """Copy the kept student with the best dev accuracy (of `signal`, at `fraction`) to `out`; returns the folder."""
    from probekd.exporter import export_student

    return export_student(Path(run), Path(out) if out is not None else None, signal=signal, fraction=fraction)


def load_student(folder: str | Path, device: str = "cpu") -> KeptStudent:
    """A kept student (RUN/students/<cell>/model/ or an exported folder), ready to `predict`."""
    return KeptStudent(folder, device)


def load_problems(task: str) -> ProblemSet:
    """A free-form task (`gsm8k`, `aqua_rat`, `arith:steps=S,digits=D`) as Problems per split."""
    from probekd.generative.problems import load_problems as _load

    return _load(task)


def rollouts(
    task: str, model: str, out: str | Path, *, split: str = "train", limit: int | None = None, **sampling: Any
) -> RolloutSet:
    """`probekd rollouts`: K graded solutions per problem of a free-form task's split, sampled from `model` into
    `out/rollouts/<split>/` (resumable); `sampling` sets `RolloutConfig` fields (k, temperature, top_p,
    max_new_tokens, batch_size, seed). The result's `pass_rates` are what PACED weights."""
    from probekd.generative.rollouts import RolloutConfig, rollouts_stage

    return rollouts_stage(task, model, Path(out), split=split, limit=limit, cfg=RolloutConfig(**sampling))
