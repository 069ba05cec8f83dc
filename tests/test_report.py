"""The report in its three steps on a small finished grid (tiny random models): `compute_report` returns what
`write_report` writes, `render_markdown` is report.md, `results_table` is results.csv as plain dicts, finished
cells without a kept student folder are counted, never a crash; the verdict rule on hand-made intervals; a student
that did not learn is flagged as failed and counted in the tables."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from probekd.config import load_config
from probekd.errors import ProbekdError
from probekd.evaluate import chance_upper
from probekd.experiment import run_experiment
from probekd.layout import model_dir
from probekd.report.report import (
    CELL_COLUMNS,
    Report,
    compute_report,
    failure,
    render_markdown,
    render_terminal,
    results_table,
    terminal_table,
    verdict,
    write_report,
    zero_shot_note,
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


def test_verdict_rule_on_hand_made_intervals() -> None:
    """Wins or loses only when every available interval excludes 0 on the same side; one favourable interval next
    to one crossing 0 (or two on opposite sides) is a tie; a single interval decides alone; none: no interval."""
    assert verdict([(0.01, 0.05), (0.002, 0.04)]) == "wins"
    assert verdict([(-0.05, -0.01), (-0.04, -0.002)]) == "loses"
    assert verdict([(0.01, 0.05), (-0.01, 0.04)]).startswith("ties")
    assert verdict([(-0.2, 0.3), (0.02, 0.04)]).startswith("ties")  # only the bootstrap excludes 0: not "ahead"
    assert verdict([(-0.05, -0.01), (-0.01, 0.004)]).startswith("ties")  # every seed negative, one interval crosses
    assert verdict([(0.01, 0.05), (-0.05, -0.01)]).startswith("ties")
    assert verdict([(0.001, 0.02)]) == "wins" and verdict([(-0.02, -0.001)]) == "loses"
    assert verdict([(-0.02, 0.02)]) == "ties (an interval includes 0)"
    assert verdict([(0.0, 0.02)]).startswith("ties")  # touching 0 does not exclude it
    assert verdict([]) == "no interval"


def test_failure_flag_by_hand() -> None:
    """Chance's 95% upper end on n questions is the binomial 97.5% quantile over n; a best dev accuracy at or below
    it, or near-uniform test predictions, fail the student; a student that left chance is not flagged."""
    assert chance_upper(0.25, 100) == pytest.approx(34 / 100)  # Bin(100, 0.25): P(X > 34) < 0.025 <= P(X > 33)
    assert chance_upper(0.25, 20) == pytest.approx(9 / 20)
    uniform = {"best_dev_accuracy": 0.26, "test_entropy": 1.0}
    reason = failure(uniform, 0.25, 100)
    assert "dev accuracy never left chance (best 0.260, chance 0.250, 95% upper end 0.340 on 100 questions)" in reason
    assert "near-uniform test predictions (normalized entropy 1.000)" in reason
    assert failure({"best_dev_accuracy": 0.34, "test_entropy": 0.5}, 0.25, 100).startswith("dev accuracy never")
    assert failure({"best_dev_accuracy": 0.35, "test_entropy": 0.5}, 0.25, 100) == ""
    # on 20 dev questions 0.40 cannot be told from guessing (upper end 9 / 20); 0.50 can
    assert failure({"best_dev_accuracy": 0.40, "test_entropy": 0.5}, 0.25, 20).startswith("dev accuracy never")
    assert failure({"best_dev_accuracy": 0.50, "test_entropy": 0.5}, 0.25, 20) == ""
    assert failure({"best_dev_accuracy": None, "test_entropy": None}, 0.25, 100) == ""


def test_a_constructed_uniform_student_is_flagged_failed_and_counted(small_run: Path, tmp_path: Path) -> None:
    """A student whose dev accuracy stayed at chance and whose test predictions are uniform is `failed` in
    results.csv with its reasons, counted in the accuracy table and in the comparison, and named in report.md; the
    per-cell label budget and each signal's target accuracy and entropy are reported."""
    run = _copy(small_run, tmp_path / "run", kept=True)
    cell = run / "students" / "probe-f1-s0"
    with np.load(run / "targets" / "answers-test.npz") as z:
        mask = z["mask"].astype(bool)
    np.save(cell / "test_probs.npy", mask / mask.sum(1, keepdims=True))
    metrics = json.loads((cell / "metrics.json").read_text())
    metrics["best_dev_accuracy"] = metrics["dev_chance"]
    (cell / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(run).read_text()
    rows = {r["cell"]: r for r in results_table(run)}
    assert rows["probe-f1-s0"]["failed"] is True
    assert "dev accuracy never left chance" in rows["probe-f1-s0"]["failed_reason"]
    assert "near-uniform test predictions" in rows["probe-f1-s0"]["failed_reason"]
    written = {f"{r['signal']}-s{r['seed']}": r for r in _csv_rows(run)}
    assert written["probe-s0"]["failed"] == "True" and written["probe-s0"]["failed_reason"]
    for name, row in written.items():
        assert int(row["labels_used"]) == int(row["n_labelled"]) + int(row["n_dev"]) == 24 + 12, name
        assert float(row["dev_chance_upper"]) > 0.25
    failed = [r for r in rows.values() if r["failed"]]
    line = next(x for x in text.splitlines() if "failed to train**" in x)
    assert line.startswith(f"**{len(failed)} of 4 students failed to train**") and "`probe-f1-s0`" in line
    n_probe = sum(r["failed"] for r in failed if r["signal"] == "probe")
    n_hard = sum(r["failed"] for r in failed if r["signal"] == "hard")
    assert f"(2; {n_probe} failed) |" in text.split("## Student test accuracy")[1].split("\n\n")[1]
    against = text.split("## Probe-KD against each other signal")[1]
    comparison = next(x for x in against.splitlines() if x.startswith("| 1 | hard labels |"))
    assert f"| 2 | {n_probe} / {n_hard} |" in comparison
    assert compute_report(run).comparisons[0]["failed_a"] == n_probe
    assert "| 1 | 24 | 12 | 36 |" in text  # the label budget: train + dev
    targets = text.split("## Targets on train")[1]
    hard_row = next(x for x in targets.splitlines() if x.startswith("| 1 |"))
    assert hard_row.startswith("| 1 | 1.000 / 0.000 |")


def test_zero_shot_note_counts_the_students_below_their_untrained_self() -> None:
    cells = [
        {"cell": "hard-f1-s0", "accuracy": 0.40, "zero_shot_accuracy": 0.50},
        {"cell": "probe-f1-s0", "accuracy": 0.60, "zero_shot_accuracy": 0.50},
        {"cell": "old-f1-s0", "accuracy": 0.10, "zero_shot_accuracy": None},  # made before zero-shot was recorded
    ]
    (line, _) = zero_shot_note(cells)
    assert line.startswith("The student before any training (its own zero-shot answer) scores 0.500 on test")
    assert line.endswith("1 of 2 trained students end below it: `hard-f1-s0`.")
    cells[0]["accuracy"] = 0.55
    cells[1]["zero_shot_accuracy"] = 0.25
    assert (
        "0.250 to 0.500 over seeds on test; every one of the 2 trained students ends above it."
        in zero_shot_note(cells)[0]
    )
    assert zero_shot_note(cells[2:]) == []


def test_fidelity_columns_and_table(small_run: Path, tmp_path: Path) -> None:
    """results.csv has each student's fidelity to the teacher and to the probe, computed from its saved test
    probabilities, and report.md its table; a student whose test probabilities are the probe's has KL 0 to it."""
    run = _copy(small_run, tmp_path / "run", kept=True)
    with np.load(run / "probes" / "test.npz") as z:
        np.save(run / "students" / "hard-f1-s0" / "test_probs.npy", z["probs"])
    text = write_report(run).read_text()
    rows = {r["cell"]: r for r in results_table(run)}
    assert rows["hard-f1-s0"]["kl_probe"] == pytest.approx(0.0, abs=1e-4)
    for r in rows.values():
        assert r["kl_teacher"] is not None and r["kl_teacher"] >= 0 and r["kl_probe"] >= 0
    assert "## Fidelity to the teacher and to the probe (test)" in text


def test_target_statistics_missing_from_a_cells_metrics_are_recomputed(small_run: Path, tmp_path: Path) -> None:
    """A cell made before its metrics held the targets' accuracy and entropy gets them from RUN/targets/ and the
    cell's labelled rows: the same values the targets stage recorded."""
    run = _copy(small_run, tmp_path / "run", kept=True)
    path = run / "students" / "probe-f1-s0" / "metrics.json"
    metrics = json.loads(path.read_text())
    recorded = {k: metrics["targets"][k] for k in ("target_accuracy", "target_entropy")}
    for k in recorded:
        del metrics["targets"][k]
    path.write_text(json.dumps(metrics))
    row = {r["cell"]: r for r in results_table(run)}["probe-f1-s0"]
    assert row["target_accuracy"] == pytest.approx(recorded["target_accuracy"], abs=1e-6)
    assert row["target_entropy"] == pytest.approx(recorded["target_entropy"], abs=1e-6)
