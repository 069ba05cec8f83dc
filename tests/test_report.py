"""The report in its three steps on a small finished grid (tiny random models): `compute_report` returns what
`write_report` writes, `render_markdown` is report.md, `results_table` is results.csv as plain dicts, and finished
cells without a kept student folder are counted, never a crash."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from probekd.config import load_config
from probekd.errors import ProbekdError
from probekd.experiment import run_experiment
from probekd.layout import model_dir
from probekd.report.report import (
    CELL_COLUMNS,
    Report,
    compute_report,
    render_markdown,
    render_terminal,
    results_table,
    terminal_table,
    write_report,
)

NO_MODEL = "finished cells have no kept model folder"


@pytest.fixture(scope="module")
def small_run(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished grid of 4 students: hard labels and Probe-KD, 2 seeds, all labels."""
    base = {
        "name": "small",
        "task": "arc_easy",
        "teacher": str(tiny_llama_dir),
        "limit": {"train": 24, "dev": 12, "test": 12},
        "extract": {"formulation": "option", "prompt": "base", "storage_dtype": "float32"},
        "probe": {"l2_grid": [0.1], "max_iter": 20, "layers": [1, 2], "n_folds": 3},
        "student": {"model": str(tiny_bert_dir), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "grid": {"fractions": [1.0], "seeds": [0, 1], "signals": ["hard", "probe"]},
    }
    run = tmp_path_factory.mktemp("report") / "run"
    run_experiment(load_config(None, base=base), run)
    return run


def _copy(run: Path, dest: Path, *, kept: bool) -> Path:
    """A copy of `run` where every finished cell has a kept model folder (`kept`; a stand-in `probekd.json` where the
    grid kept none) or none at all (as in runs made before students were kept)."""
    shutil.copytree(run, dest)
    for metrics in (dest / "students").glob("*/metrics.json"):
        folder = model_dir(dest, metrics.parent.name)
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)
        elif not (folder / "probekd.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "probekd.json").write_text("{}\n")
    return dest


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "report" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_computed_report_is_what_write_report_writes(small_run: Path, tmp_path: Path) -> None:
    """report.md is `render_markdown(compute_report(run))`; `results_table` is results.csv row by row (None for an
    empty field); the terminal table renders the report's summary rows."""
    run = _copy(small_run, tmp_path / "run", kept=True)
    text = write_report(run).read_text()
    report = compute_report(run)
    assert isinstance(report, Report) and report.name == "small" and report.run == run
    assert render_markdown(report) == text
    assert render_terminal(report.summary) == terminal_table(run)
    assert report.fractions == [1.0] and report.variants == ["hard", "probe"]
    assert [(r["a"], r["b"], r["seeds"]) for r in report.comparisons] == [("probe", "hard", 2)]
    assert report.variant_comparisons == [] and report.partial is None and report.without_model == []
    assert report.chance is not None and report.probes is not None
    assert f"{report.chance:.3f}." in text and NO_MODEL not in text

    table = results_table(run)
    rows = _csv_rows(run)
    assert list(rows[0]) == CELL_COLUMNS and len(table) == len(rows) == 4
    for plain, written in zip(table, rows, strict=True):
        assert list(plain) == ["cell", *CELL_COLUMNS]
        assert {k: "" if v is None else str(v) for k, v in plain.items() if k != "cell"} == written
        assert plain["cell"] == f"{plain['signal']}-f{plain['fraction']:g}-s{plain['seed']}"
        assert plain["kept_model"] is True and isinstance(plain["accuracy"], float)
        assert plain["accuracy_ci_low"] <= plain["accuracy"] <= plain["accuracy_ci_high"]


def test_cells_without_a_kept_model_are_counted(small_run: Path, tmp_path: Path) -> None:
    """A finished cell whose model folder is gone (made before students were kept, or left out by
    `grid.keep_students`) is `kept_model` False in results.csv and counted in one line of report.md; a run with no
    model folder at all still reports."""
    run = _copy(small_run, tmp_path / "run", kept=True)
    shutil.rmtree(model_dir(run, "probe-f1-s1"))
    text = write_report(run).read_text()
    line = next(x for x in text.splitlines() if NO_MODEL in x)
    assert line.startswith(f"1 of 4 {NO_MODEL}") and "grid.keep_students" in line
    kept = {f"{r['signal']}-f{float(r['fraction']):g}-s{r['seed']}": r["kept_model"] for r in _csv_rows(run)}
    assert kept == {"hard-f1-s0": "True", "hard-f1-s1": "True", "probe-f1-s0": "True", "probe-f1-s1": "False"}
    assert compute_report(run).without_model == ["probe-f1-s1"]
    assert {r["cell"]: r["kept_model"] for r in results_table(run)}["probe-f1-s1"] is False

    old = _copy(small_run, tmp_path / "old", kept=False)
    assert f"4 of 4 {NO_MODEL}" in write_report(old).read_text()
    assert not any(r["kept_model"] for r in results_table(old))


def test_a_run_without_finished_cells(small_run: Path, tmp_path: Path) -> None:
    """No finished student: the table is empty, the report refuses with the reason; not a run folder: an error."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("students"))
    assert results_table(run) == []
    with pytest.raises(ProbekdError, match="no finished students"):
        compute_report(run)
    with pytest.raises(ProbekdError, match="not a run folder"):
        results_table(tmp_path / "missing")
