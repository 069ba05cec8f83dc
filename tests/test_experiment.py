"""The whole run on tiny random models: config -> extraction -> probes -> targets -> student grid -> report; a rerun
does nothing again; another configuration is refused naming the field; bad configs give clear errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from probekd.cli import app
from probekd.config import load_config
from probekd.data import load_task
from probekd.errors import ConfigError, ProbekdError
from probekd.experiment import _test_part_done, check_run_dir, run_experiment
from probekd.report.report import kept_before_variant, plot_interval, terminal_table, unfinished, write_report
from probekd.reuse import reuse_run
from probekd.targets import SoftTargets


def tiny_config(teacher: Path, student: Path, **grid) -> dict:
    return {
        "name": "tiny",
        "task": "arc_easy",
        "teacher": str(teacher),
        "limit": {"train": 40, "dev": 16, "test": 16},
        "extract": {"formulation": "option", "prompt": "base", "storage_dtype": "float32"},
        "probe": {"l2_grid": [0.01, 0.1], "max_iter": 30, "layers": [1, 2]},
        "student": {"model": str(student), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "grid": {"fractions": [0.5, 1.0], "seeds": [0, 1], **grid},
    }


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exp") / "run"
    cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir))
    results = run_experiment(cfg, run)
    assert len(results) == 2 * 2 * 5
    write_report(run)
    return run


def test_grid_cells_and_targets(finished_run: Path) -> None:
    cells = sorted(p.name for p in (finished_run / "students").iterdir())
    assert len(cells) == 20 and "probe-f0.5-s1" in cells and "teacher_calibrated-f1-s0" in cells
    m = json.loads((finished_run / "students" / "probe-f0.5-s0" / "metrics.json").read_text())
    assert m["n_labelled"] == 20 and m["n_train_rows"] == 20  # supervised: the labelled half only
    # grid.dev full (the default): every cell selects on the whole dev split, and says so
    assert m["n_dev"] == 16 and m["labels_used"] == 36 and m["targets"]["n_dev"] == 16 and m["dev_policy"] == "full"
    assert len(m["dev_accuracy_by_epoch"]) == 1 and 0 < m["dev_chance"] < 1
    smoothed = SoftTargets.load(finished_run / "targets" / "smoothed-f0.5-s0.npz")
    probe = SoftTargets.load(finished_run / "targets" / "probe-f0.5-s0.npz")
    assert len(smoothed.ids) == 20 and smoothed.meta["matched_entropy"] == probe.meta["target_entropy"]
    assert smoothed.meta["target_entropy"] == pytest.approx(probe.meta["target_entropy"], abs=2e-4)
    assert 0 <= m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1] <= 1
    assert m["targets"]["n_labelled"] == 20 and m["targets"]["layer"] in (1, 2)
    assert not list((finished_run / "students").glob("*/checkpoints"))
    # at fraction 1 every seed labels the same rows: their targets are copied, not fitted again
    same = SoftTargets.load(finished_run / "targets" / "probe-f1-s1.npz")
    first = SoftTargets.load(finished_run / "targets" / "probe-f1-s0.npz")
    assert same.meta["same_as"] == "probe-f1-s0" and np.array_equal(same.probs, first.probs)
    assert "same_as" not in SoftTargets.load(finished_run / "targets" / "probe-f0.5-s1.npz").meta


def test_report_files_and_tables(finished_run: Path) -> None:
    report = finished_run / "report"
    for name in ("report.md", "results.csv", "summary.csv", "data_efficiency.png", "layers.png"):
        assert (report / name).stat().st_size > 0, name
    with open(report / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert {r["signal"] for r in rows} == {"hard", "smoothed", "teacher", "teacher_calibrated", "probe"}
    text = (report / "report.md").read_text()
    header = "| fraction | hard labels | label smoothing | logit-KD (teacher) | calibrated logit-KD | Probe-KD |"
    assert header in text and text.count(header) == 2  # the students' accuracy, and the targets on train
    assert "Probe-KD against each other signal" in text and re.search(r"\(2(; [12] failed)?\) \|", text)
    section = text.split("Probe-KD against each other signal")[1]
    diffs = [line.split(" | ")[2] for line in section.splitlines() if line.startswith(("| 0.5 ", "| 1 "))]
    assert len(diffs) == 8 and all(d[0] in "+-" for d in diffs), diffs  # differences carry their sign
    chance = np.mean([1 / e.k for e in load_task("arc_easy").splits["test"][:16]])  # a uniform guess per question
    assert f"Chance on test (a uniform guess among each question's options): {chance:.3f}." in text

    assert "Partial" not in text
    assert (report / "data_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = terminal_table(finished_run)
    assert table.splitlines()[0].split() == ["signal", "f=0.5", "f=1"] and "Probe-KD" in table


def test_plotted_band_is_an_accuracy_interval() -> None:
    """Two seeds' t-interval (t = 12.7) can pass 0 and 1: the band drawn is cut to [0, 1]; one seed shows its
    bootstrap interval; a row with neither draws nothing."""
    wide = plot_interval({"accuracy_mean": 0.356, "accuracy_ci_half": 0.623, "accuracy_ci_bootstrap": ""})
    assert wide == (0.0, pytest.approx(0.979))
    narrow = plot_interval({"accuracy_mean": 0.4, "accuracy_ci_half": 0.05, "accuracy_ci_bootstrap": ""})
    assert narrow == (pytest.approx(0.35), pytest.approx(0.45))
    assert plot_interval({"accuracy_mean": 0.4, "accuracy_ci_half": "", "accuracy_ci_bootstrap": [0.3, 0.5]}) == (
        0.3,
        0.5,
    )
    assert all(np.isnan(plot_interval({"accuracy_mean": 0.4, "accuracy_ci_half": "", "accuracy_ci_bootstrap": ""})))


def test_report_of_an_unfinished_grid_says_what_is_missing(finished_run: Path, tmp_path: Path) -> None:
    """A grid with cells still to train says so (count by fraction), in report.md and after `probekd report`'s
    table; a cell whose folder holds only checkpoints is not finished."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "students" / "probe-f1-s0" / "metrics.json").unlink()
    shutil.rmtree(run / "students" / "hard-f0.5-s1")
    want = "Partial: 18 of the grid's 20 cells are finished (1 at fraction 0.5, 1 at fraction 1 to go;"
    assert f"**{want}" in write_report(run).read_text()
    assert unfinished(run).startswith(want)
    printed = CliRunner().invoke(app, ["report", str(run)])
    assert printed.exit_code == 0 and printed.output.splitlines()[-2].startswith(want)
    (run / "config.yaml").write_text("task: [not, a, task]\n")  # unreadable: the report describes what is there
    assert unfinished(run) is None


def test_report_flags_students_that_answer_almost_uniformly(finished_run: Path, tmp_path: Path) -> None:
    """A student whose test probabilities are a uniform guess is failed and named in report.md, with its
    `test_entropy` 1 in results.csv; every failed student is named (a tiny student trained on 16 rows can be
    flagged too, by its entropy or by a dev accuracy that never left chance on 16 questions)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with np.load(run / "targets" / "answers-test.npz") as z:
        mask = z["mask"].astype(bool)
    np.save(run / "students" / "probe-f1-s0" / "test_probs.npy", mask / mask.sum(1, keepdims=True))
    text = write_report(run).read_text()
    with open(run / "report" / "results.csv") as f:
        rows = {f"{r['signal']}-f{float(r['fraction']):g}-s{r['seed']}": r for r in csv.DictReader(f)}
    assert float(rows["probe-f1-s0"]["test_entropy"]) == pytest.approx(1.0)
    assert "near-uniform test predictions" in rows["probe-f1-s0"]["failed_reason"]
    for r in rows.values():
        assert (r["failed"] == "True") == bool(r["failed_reason"])
        if float(r["test_entropy"]) > 0.99:
            assert r["failed"] == "True"
    flagged = sorted(n for n, r in rows.items() if r["failed"] == "True")
    line = next(x for x in text.splitlines() if "failed to train**" in x)
    assert line.startswith(f"**{len(flagged)} of 20 students") and all(f"`{n}`" in line for n in flagged)


def test_report_chance_level_follows_each_questions_options(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "targets" / "answers-test.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["mask"][0, 3:] = False  # the first test question keeps 3 options, the second 2
    arrays["mask"][1, 2:] = False
    np.savez(path, **arrays)
    want = (14 / 4 + 1 / 3 + 1 / 2) / 16
    assert f"uniform guess among each question's options): {want:.3f}." in write_report(run).read_text()


def test_rerun_skips_finished_work_and_refuses_other_configs(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    marker = finished_run / "students" / "hard-f1-s0" / "metrics.json"
    before = marker.stat().st_mtime_ns
    base = tiny_config(tiny_llama_dir, tiny_bert_dir)
    run_experiment(load_config(None, base=base), finished_run)
    assert marker.stat().st_mtime_ns == before
    base["train"]["alpha"] = 0.9
    with pytest.raises(ProbekdError, match=r"differs in: train\.alpha"):
        run_experiment(load_config(None, base=base), finished_run)
    # a run directory written before a field was added to the schema (with its default) is still this config
    saved = finished_run / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["student"]["formulation"]
    for field in ("dev", "min_dev", "smoothing"):  # a run folder made before the dev policy and label smoothing
        del old["grid"][field]
    saved.write_text(yaml.safe_dump(old))
    run_experiment(load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir)), finished_run)
    assert marker.stat().st_mtime_ns == before
    # but a field whose default changed is read with the default of its day: a folder recorded without
    # `student.head` holds cross-encoder students, which today's default (the bi-encoder) would not make again
    recorded = yaml.safe_load(saved.read_text())
    del recorded["student"]["head"]
    saved.write_text(yaml.safe_dump(recorded))
    with pytest.raises(ProbekdError, match=r"finished students made with other .*differs in: student\.head"):
        run_experiment(load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir)), finished_run)
    recorded["student"]["head"] = "biencoder"
    saved.write_text(yaml.safe_dump(recorded))


def test_student_stage_needs_no_teacher_caches(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The run directory copied without its teacher shards (as to a GPU machine) trains the missing students, and
    the retrained cell equals the one trained in the `all` run."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("shard-*"))
    shutil.rmtree(copy / "students" / "probe-f0.5-s1")
    cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir))
    redone = {r["cell"]: r for r in run_experiment(cfg, copy, stage="students")}["probe-f0.5-s1"]
    original = json.loads((finished_run / "students" / "probe-f0.5-s1" / "metrics.json").read_text())
    assert redone["accuracy"] == original["accuracy"] and redone["targets"] == original["targets"]
    assert redone["dev_accuracy_by_epoch"] == original["dev_accuracy_by_epoch"]
    assert not list((copy / "teacher").glob("*/shard-*"))  # the teacher was not run again
    (copy / "targets" / "hard-f1-s0.npz").unlink()
    shutil.rmtree(copy / "students" / "hard-f1-s0")
    with pytest.raises(ProbekdError, match=r"hard-f1-s0\.npz is missing: run the targets stage first"):
        run_experiment(cfg, copy, stage="students")
    with pytest.raises(ProbekdError, match="would delete the targets"):
        run_experiment(cfg, copy, stage="students", overwrite=True)
    (copy / "targets" / "answers-dev.npz").unlink()
    with pytest.raises(ProbekdError, match=r"answers-dev\.npz is missing"):
        run_experiment(cfg, copy, stage="students")


def test_targets_stage_needs_the_teacher_only_for_missing_targets(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A committed run (no teacher caches) with every targets file skips the targets stage; one targets file
    missing (an interrupted targets stage) re-extracts train and dev (not test, whose part is done), checks that
    the teacher gives the saved answers, and writes that file again, equal to the first."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("teacher"))
    cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir))
    run_experiment(cfg, copy, stage="targets")
    assert not (copy / "teacher").exists()
    (copy / "targets" / "probe-f0.5-s1.npz").unlink()
    answers = copy / "targets" / "answers-dev.npz"
    saved = answers.read_bytes()
    with np.load(answers) as z:
        other = {k: z[k] for k in z.files}
    other["scores"] = other["scores"] + 0.5  # as if another teacher had made them
    np.savez(answers, **other)
    with pytest.raises(ProbekdError, match=r"split 'dev' .* does not give the answers in .*answers-dev\.npz"):
        run_experiment(cfg, copy, stage="targets")
    answers.write_bytes(saved)
    run_experiment(cfg, copy, stage="targets")
    assert sorted(p.parent.name for p in (copy / "teacher").glob("*/manifest.json")) == ["dev", "train"]
    redone = SoftTargets.load(copy / "targets" / "probe-f0.5-s1.npz")
    first = SoftTargets.load(finished_run / "targets" / "probe-f0.5-s1.npz")
    np.testing.assert_allclose(redone.probs, first.probs, atol=1e-5)
    assert redone.meta["layer"] == first.meta["layer"]
    # the test split is extracted again when its part is not done: no probe predictions on it, or more options
    # on it than on train and dev (the targets would be too narrow)
    assert _test_part_done(copy)
    with np.load(copy / "targets" / "answers-test.npz") as z:
        wider = {k: z[k] for k in z.files}
    wider["mask"] = np.pad(wider["mask"], ((0, 0), (0, 1)))
    np.savez(copy / "targets" / "answers-test.npz", **wider)
    assert not _test_part_done(copy)
    (copy / "targets" / "answers-test.npz").unlink()
    assert not _test_part_done(copy)


def test_reuse_copies_what_the_new_grid_would_make_the_same(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A PACED-style grid from the finished plain grid: the targets and the forward-KL unweighted students it shares
    are copied (no checkpoints), its other cells are not there; another training setting keeps the targets but not
    the students; other probe settings are refused, naming the field."""
    paced = tiny_config(tiny_llama_dir, tiny_bert_dir, signals=["teacher", "probe"], fractions=[1.0], seeds=[0])
    paced["grid"].update(losses=["fkl", "fkl>rkl"], weightings=["none", "paced"])
    paced["train"].update(switch_at=0.3, weighting={"pass_rate": "sampled", "warmup_epochs": 1.0})
    cfg = load_config(None, base=paced)
    run = tmp_path / "paced"
    copied = reuse_run(finished_run, run, cfg)
    assert copied == {
        "targets": ["answers-train", "answers-dev", "answers-test", "teacher-f1-s0", "probe-f1-s0"],
        "students": ["teacher-f1-s0", "probe-f1-s0"],
        "zero_shot": ["s0.npz"],  # the same student: its untrained predictions are not computed again
    }
    assert (run / "zero_shot" / "s0.npz").read_bytes() == (finished_run / "zero_shot" / "s0.npz").read_bytes()
    for name in copied["students"]:
        assert (run / "students" / name / "metrics.json").read_bytes() == (
            finished_run / "students" / name / "metrics.json"
        ).read_bytes()
    assert sorted(p.name for p in (run / "students").iterdir()) == ["probe-f1-s0", "teacher-f1-s0"]
    assert (run / "probes" / "test.npz").exists() and (run / "config.yaml").exists()
    run_experiment(cfg, run, stage="targets")  # every targets file is there: the teacher is not needed
    assert not (run / "teacher").exists()
    assert reuse_run(finished_run, run, cfg) == {"targets": [], "students": [], "zero_shot": []}  # nothing twice

    other_lr = tiny_config(tiny_llama_dir, tiny_bert_dir, signals=["probe"], fractions=[0.5], seeds=[1])
    other_lr["train"]["learning_rate"] = 5e-4
    copied = reuse_run(finished_run, tmp_path / "lr", load_config(None, base=other_lr))
    assert copied == {"targets": ["answers-train", "answers-dev", "answers-test", "probe-f0.5-s1"], "students": [],
                      "zero_shot": ["s1.npz"]}  # fmt: skip

    # another dev policy: the probes and the teacher's answers stand, no targets file or student does
    other_dev = tiny_config(tiny_llama_dir, tiny_bert_dir, dev="proportional", min_dev=4)
    copied = reuse_run(finished_run, tmp_path / "dev", load_config(None, base=other_dev))
    assert copied == {"targets": ["answers-train", "answers-dev", "answers-test"], "students": [], "zero_shot": []}
    assert (tmp_path / "dev" / "probes" / "summary.json").exists()

    other_probe = tiny_config(tiny_llama_dir, tiny_bert_dir)
    other_probe["probe"]["l2_grid"] = [0.5]
    with pytest.raises(ProbekdError, match=r"differs in: probe\.l2_grid\); nothing of it can be reused"):
        reuse_run(finished_run, tmp_path / "probe", load_config(None, base=other_probe))
    assert not (tmp_path / "probe").exists()
    with pytest.raises(ProbekdError, match="is not a probekd run directory"):
        reuse_run(tmp_path / "nothing", tmp_path / "x", cfg)


def test_semi_supervised_mode_uses_the_pool(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        base=tiny_config(
            tiny_llama_dir, tiny_bert_dir, fractions=[0.25], seeds=[0], signals=["hard", "probe"], mode="semi"
        ),
    )
    results = {r["signal"]: r for r in run_experiment(cfg, tmp_path / "semi")}
    assert results["probe"]["n_train_rows"] == 40 and results["probe"]["n_labelled"] == 10
    assert results["hard"]["n_train_rows"] == 10  # hard labels exist only for the labelled rows


def test_loss_and_weighting_axes(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The grid's loss and weighting axes: one student per combination, sharing the cell's targets; the report
    compares each variant with the forward-KL, unweighted student of its signal."""
    grid = {"fractions": [1.0], "seeds": [0, 1], "signals": ["probe"], "losses": ["fkl", "fkl>rkl"]}
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, **grid, weightings=["none", "paced"])
    run = tmp_path / "axes"
    results = {r["cell"]: r for r in run_experiment(load_config(None, base=base), run)}
    assert sorted(results) == [
        "probe-f1-s0", "probe-f1-s0-fkl-paced", "probe-f1-s0-fkl_then_rkl-none", "probe-f1-s0-fkl_then_rkl-paced",
        "probe-f1-s1", "probe-f1-s1-fkl-paced", "probe-f1-s1-fkl_then_rkl-none", "probe-f1-s1-fkl_then_rkl-paced",
    ]  # fmt: skip
    assert sorted(p.name for p in (run / "targets").glob("probe-*")) == ["probe-f1-s0.npz", "probe-f1-s1.npz"]
    paced = results["probe-f1-s0-fkl-paced"]
    assert paced["weighting"] == "paced" and paced["weights"][0]["step"] == 0 and paced["weights"][0]["n"] == 40
    assert results["probe-f1-s0"]["weights"] == []
    text = write_report(run).read_text()
    assert "## Losses and weightings against forward KL, unweighted" in text
    assert "| 1 | Probe-KD · fkl>rkl · paced |" in text
    # the weights table: the range over seeds of each weighted variant's mean pass rate, ESS share, zero share
    rates = sorted(results[f"probe-f1-s{s}-fkl-paced"]["weights"][0]["mean_pass_rate"] for s in (0, 1))
    ess = sorted(results[f"probe-f1-s{s}-fkl-paced"]["weights"][0]["ess_share"] for s in (0, 1))
    zero = sorted(results[f"probe-f1-s{s}-fkl-paced"]["weights"][0]["zero_share"] for s in (0, 1))
    assert "## Weights of the weighted students (range over seeds)" in text

    def span(v: list[float]) -> str:
        return f"{v[0]:.3f}" if round(v[0], 3) == round(v[1], 3) else f"{v[0]:.3f}-{v[1]:.3f}"

    assert f"| 1 | Probe-KD · fkl · paced | {span(rates)} | {span(ess)} | {span(zero)} | 2 |" in text
    assert "| 1 | Probe-KD · fkl>rkl · none |" not in text.split("## Weights")[1]  # unweighted: not in that table
    table = csv.DictReader((run / "report" / "results.csv").read_text().splitlines())
    csv_rows = {(r["loss"], r["weighting"], r["seed"]): r for r in table}
    assert float(csv_rows[("fkl", "paced", "0")]["ess_share"]) == pytest.approx(
        results["probe-f1-s0-fkl-paced"]["weights"][0]["ess_share"]
    )
    assert csv_rows[("fkl", "none", "0")]["mean_pass_rate"] == ""
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert not any(kept_before_variant(c, train) for c in results.values())  # every variant acted within its epoch


def test_a_variant_kept_before_it_acted_is_the_default_student_and_reported_untested(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """One epoch, and PACED's warm-up is that epoch: the PACED student never saw a weight, so it is the unweighted
    student exactly, and the report says the comparison tested nothing."""
    grid = {"fractions": [1.0], "seeds": [0, 1], "signals": ["probe"], "weightings": ["none", "paced"]}
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, **grid)
    base["train"]["weighting"] = {"warmup_epochs": 1.0}
    run = tmp_path / "warm"
    results = {r["cell"]: r for r in run_experiment(load_config(None, base=base), run)}
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    for s in (0, 1):
        assert kept_before_variant(results[f"probe-f1-s{s}-fkl-paced"], train)
        assert not kept_before_variant(results[f"probe-f1-s{s}"], train)
        cells = (f"probe-f1-s{s}-fkl-paced", f"probe-f1-s{s}")
        probs = [np.load(run / "students" / n / "test_probs.npy") for n in cells]
        np.testing.assert_array_equal(*probs)
    text = write_report(run).read_text()
    assert "| Probe-KD · fkl · paced |" in text and "untested: every seed kept an epoch from before the variant" in text


def test_kept_before_variant_by_hand() -> None:
    """226 rows in batches of 16: 15 steps per epoch, 45 in 3 epochs; `fkl>rkl` switches after round(0.5 * 45) = 22
    steps, PACED's weights start after its 1-epoch warm-up (15 steps); AKL differs from step 0."""
    train = {"epochs": 3, "batch_size": 16, "switch_at": 0.5, "weighting": {"warmup_epochs": 1.0}}
    cell = {"n_train_rows": 226, "dev_accuracy_by_epoch": [0.41, 0.36, 0.36]}  # epoch 1 kept (step 15)
    assert kept_before_variant({**cell, "loss": "fkl>rkl", "weighting": "none"}, train)
    assert kept_before_variant({**cell, "loss": "fkl", "weighting": "paced"}, train)
    assert not kept_before_variant({**cell, "loss": "akl", "weighting": "none"}, train)
    assert not kept_before_variant({**cell, "loss": "fkl", "weighting": "none"}, train)  # the default itself
    later = {**cell, "dev_accuracy_by_epoch": [0.36, 0.41, 0.40]}  # epoch 2 kept: step 30
    assert not kept_before_variant({**later, "loss": "fkl>rkl", "weighting": "none"}, train)
    assert not kept_before_variant({**later, "loss": "fkl", "weighting": "paced"}, train)
    two_epochs_warmup = {**train, "weighting": {"warmup_epochs": 2}}
    assert kept_before_variant({**later, "loss": "fkl", "weighting": "paced"}, two_epochs_warmup)
    assert not kept_before_variant({"n_train_rows": 226, "dev_accuracy_by_epoch": [], "loss": "fkl>rkl"}, train)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.temprature: unknown field"):
        load_config(None, ["train.temprature=2"])
    with pytest.raises(ConfigError, match=r"grid\.signals: .*unknown signal\(s\) \['logits'\]"):
        load_config(None, ["grid.signals=[hard, logits]"])
    schemes = r"'none', 'paced', 'hard_filter', 'influence' or 'ddk'"
    with pytest.raises(ConfigError, match=r"train\.weighting\.scheme: .*" + schemes):
        load_config(None, ["train.weighting.scheme=always"])
    with pytest.raises(ConfigError, match=r"grid\.losses: .*'kll' is not a loss or `first>second`"):
        load_config(None, ["grid.losses=[fkl, kll]"])
    with pytest.raises(ConfigError, match=r"train\.loss: .*'fkl>rkl>js' is not a loss"):
        load_config(None, ["train.loss=fkl>rkl>js"])
    with pytest.raises(ConfigError, match="--set wants section.field=value"):
        load_config(None, ["train.alpha"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"grid": {"fractions": [0.5, 0.1, 0.5]}}))
    cfg = load_config(good, ["train.epochs=2", "student.lora=true"])
    assert cfg.grid.fractions == [0.1, 0.5] and cfg.train.epochs == 2 and cfg.student.lora is True


def test_grid_exclude_leaves_cells_out_and_the_record_keeps_only_safe_entries(tmp_path: Path) -> None:
    """`grid.exclude` drops the cells matching every axis an entry names; a run directory's record keeps an entry
    only while no invocation's grid has a cell it names (such a cell may be in the directory)."""
    axes = ["grid.fractions=[0.1, 1.0]", "grid.seeds=[0]", "grid.signals=[probe]"]
    axes += ["grid.losses=[fkl, akl]", "grid.weightings=[none, paced, hard_filter]"]
    akl_unweighted = ["grid.exclude=[{loss: akl, weighting: paced}, {loss: akl, weighting: hard_filter}]"]
    cfg = load_config(None, axes + akl_unweighted)
    cells = {(c.fraction, c.loss, c.weighting) for c in cfg.cells()}
    fkl = {(f, "fkl", w) for f in (0.1, 1.0) for w in ("none", "paced", "hard_filter")}
    assert cells == fkl | {(0.1, "akl", "none"), (1.0, "akl", "none")}
    by_fraction = load_config(None, [*axes, "grid.exclude=[{fraction: 1.0, loss: akl}]"])
    assert len(by_fraction.cells()) == 6 + 3 and all(c.fraction == 0.1 for c in by_fraction.cells() if c.loss == "akl")

    run = tmp_path / "run"
    check_run_dir(run, cfg)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["grid"]["exclude"]
    assert recorded == [{"loss": "akl", "weighting": "paced"}, {"loss": "akl", "weighting": "hard_filter"}]
    assert load_config(run / "config.yaml").cells() == cfg.cells()  # the record reads back as written
    # a second invocation that trains AKL with PACED: that entry no longer holds; the hard-filter one still does
    check_run_dir(run, load_config(None, [*axes[:3], "grid.losses=[akl]", "grid.weightings=[paced]"]))
    recorded = yaml.safe_load((run / "config.yaml").read_text())["grid"]["exclude"]
    assert recorded == [{"loss": "akl", "weighting": "hard_filter"}]
    # an invocation without exclude whose own cells avoid the entry leaves it in place
    check_run_dir(run, load_config(None, [*axes[:3], "grid.losses=[fkl]", "grid.weightings=[none]"]))
    assert yaml.safe_load((run / "config.yaml").read_text())["grid"]["exclude"] == recorded

    with pytest.raises(ConfigError, match=r"grid\.exclude\.0: .*names at least one of signal"):
        load_config(None, ["grid.exclude=[{}]"])
    unknown = r"grid\.exclude\.0\.loss: .*'kll' is not a loss.*grid\.exclude\.0\.wieghting: unknown field"
    with pytest.raises(ConfigError, match=unknown):
        load_config(None, ["grid.exclude=[{loss: kll, wieghting: paced}]"])
    with pytest.raises(ConfigError, match=r"grid\.exclude\.0\.signal: .*unknown signal 'logits'"):
        load_config(None, ["grid.exclude=[{signal: logits}]"])


def test_shipped_configs_are_valid() -> None:
    """Every configuration a user is pointed to loads: the experiments, the demo and the README's quickstart."""
    root = Path(__file__).resolve().parents[1]
    from probekd.config import is_generative
    from probekd.generative.pipeline import GenerativeRunConfig

    paths = sorted((root / "experiments").glob("*.yaml"))
    assert len(paths) >= 5
    generative = [p for p in paths if is_generative(yaml.safe_load(p.read_text()))]
    assert generative  # the generative track's configurations: their own schema
    for path in generative:
        assert GenerativeRunConfig.model_validate(yaml.safe_load(path.read_text())).name, path
        with pytest.raises(ConfigError, match="generative configuration"):
            load_config(path)
    for path in (p for p in paths if p not in generative):
        assert load_config(path).name, path
        assert load_config(path).grid.dev == "proportional", path  # an honest label budget
    readme = (root / "README.md").read_text()
    block = readme.split("```yaml\n# my.yaml\n", 1)[1].split("```", 1)[0]
    quick = load_config(None, base=yaml.safe_load(block))
    assert quick.probe.feature == "auto" and quick.grid.signals[-1] == "probe" and quick.extract.formulation == "option"
    demo = load_config(root / "src" / "probekd" / "configs" / "demo.yaml")
    assert demo.probe.feature == "last"  # the demo pins the setting its recorded numbers were made with
    assert demo.grid.dev == "proportional"


def test_split_invocations_record_the_union_and_refuse_another_mode(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Two processes over parts of one grid (`--set grid.signals=[...]` in each) leave a config.yaml that describes
    the whole directory; a grid mode or teacher temperature other than the recorded one is refused, and so is a
    finished student of another mode found in the folder."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    part = tiny_config(tiny_llama_dir, tiny_bert_dir, signals=["probe"], fractions=[1.0], seeds=[1])
    run_experiment(load_config(None, base=part), copy, stage="students")  # every cell is there: nothing trains
    grid = yaml.safe_load((copy / "config.yaml").read_text())["grid"]
    assert sorted(grid["signals"]) == ["hard", "probe", "smoothed", "teacher", "teacher_calibrated"]
    assert grid["fractions"] == [0.5, 1.0] and grid["seeds"] == [0, 1]
    for field, value in (("mode", "semi"), ("teacher_temperature", 2.0), ("dev", "proportional"), ("smoothing", 0.1)):
        other = tiny_config(tiny_llama_dir, tiny_bert_dir, **{field: value})
        with pytest.raises(ProbekdError, match=rf"differs in: grid\.{field}"):
            run_experiment(load_config(None, base=other), copy, stage="students")
    metrics = copy / "students" / "hard-f0.5-s0" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"mode": "semi"}))
    with pytest.raises(ProbekdError, match=r"hard-f0\.5-s0/metrics\.json is a semi student, this grid is supervised"):
        run_experiment(load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir)), copy, stage="students")


def test_proportional_dev_counts_every_label_and_trains_from_targets_alone(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`grid.dev: proportional`: a cell selects (layer, temperature, calibration, epoch) on its own share of dev, at
    least `min_dev`; the targets file records n_dev and a cell checks it; results.csv and the report state train +
    dev labels; the students stage still runs from RUN/targets/ alone; a run folder of another dev policy or minimum
    is refused, naming the field (the minimum matters only under `proportional`)."""
    grid = {"fractions": [0.25, 1.0], "seeds": [0], "signals": ["hard", "probe"], "dev": "proportional", "min_dev": 6}
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, **grid)
    cfg = load_config(None, base=base)
    run = tmp_path / "prop"
    results = {r["cell"]: r for r in run_experiment(cfg, run)}
    # 16 dev questions: ceil(0.25 * 16) = 4 < min_dev 6; fraction 1: all 16
    assert results["probe-f0.25-s0"]["n_dev"] == 6 and results["probe-f1-s0"]["n_dev"] == 16
    assert results["probe-f0.25-s0"]["n_labelled"] == 10 and results["probe-f0.25-s0"]["labels_used"] == 16
    assert SoftTargets.load(run / "targets" / "probe-f0.25-s0.npz").meta["n_dev"] == 6
    assert SoftTargets.load(run / "targets" / "hard-f1-s0.npz").meta["n_dev"] == 16
    write_report(run)
    table = csv.DictReader((run / "report" / "results.csv").read_text().splitlines())
    rows = {f"{r['signal']}-f{float(r['fraction']):g}": r for r in table}
    assert (rows["hard-f0.25"]["n_dev"], rows["hard-f0.25"]["labels_used"]) == ("6", "16")
    assert "| 0.25 | 10 | 6 | 16 |" in (run / "report" / "report.md").read_text()

    copy = tmp_path / "copy"  # as on a GPU machine: no teacher shards
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shard-*"))
    shutil.rmtree(copy / "students" / "probe-f0.25-s0")
    redone = {r["cell"]: r for r in run_experiment(cfg, copy, stage="students")}["probe-f0.25-s0"]
    assert redone["accuracy"] == results["probe-f0.25-s0"]["accuracy"] and redone["n_dev"] == 6
    assert redone["dev_accuracy_by_epoch"] == results["probe-f0.25-s0"]["dev_accuracy_by_epoch"]
    assert not list((copy / "teacher").glob("*/shard-*"))

    # a targets file made with another dev subset size is refused by the cell
    shutil.rmtree(copy / "students" / "probe-f0.25-s0")
    stale = SoftTargets.load(copy / "targets" / "probe-f0.25-s0.npz")
    stale.meta["n_dev"] = 16
    stale.save(copy / "targets" / "probe-f0.25-s0.npz")
    with pytest.raises(ProbekdError, match=r"made with 16 dev labels, this cell uses 6 \(grid\.dev: proportional\)"):
        run_experiment(cfg, copy, stage="students")

    for change, field in (({"dev": "full"}, "grid.dev"), ({"min_dev": 3}, "grid.min_dev")):
        other = tiny_config(tiny_llama_dir, tiny_bert_dir, **{**grid, **change})
        with pytest.raises(ProbekdError, match=rf"differs in: {field}\b"):
            run_experiment(load_config(None, base=other), run, stage="students")
    full = tmp_path / "full"
    check_run_dir(full, load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir)))
    check_run_dir(full, load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir, min_dev=3)))  # no matter


def test_zero_shot_is_the_untrained_student_on_the_same_questions(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    """Each cell's zero-shot accuracy is that of a freshly built student of its seed, predicted here by hand; the
    cells of one seed share one computation (RUN/zero_shot/s<seed>.npz)."""
    from probekd.experiment import examples_by_id
    from probekd.layout import load_answers, metrics_path, zero_shot_path
    from probekd.student.heads import build_student
    from probekd.student.train import Rows, predict

    cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir))
    caches = load_answers(finished_run)
    k = max(c.mask.shape[1] for c in caches.values())
    examples = examples_by_id(cfg)
    student = build_student(cfg.student, k, seed=1)
    want = {}
    for split in ("dev", "test"):
        c = caches[split]
        rows = Rows([student.encode(examples[split][i]) for i in c.ids], c.padded_mask(k), c.answers)
        want[f"{split}_accuracy"] = float((predict(student, rows).argmax(1) == c.answers).mean())
    for cell in ("hard-f0.5-s1", "probe-f1-s1"):
        got = json.loads(metrics_path(finished_run, cell).read_text())["zero_shot"]
        assert got == pytest.approx(want)
    assert sorted(p.name for p in zero_shot_path(finished_run, 0).parent.iterdir()) == ["s0.npz", "s1.npz"]


def test_the_encoder_head_is_no_difference_for_a_causal_student() -> None:
    """A causal run recorded before `student.head` existed (read as `cross`) is the same training as today's default."""
    from probekd.experiment import cell_training
    from probekd.layout import Cell

    cell = Cell("probe", 1.0, 0)
    causal = {"student": {"kind": "causal", "model": "smollm2-135m-instruct"}}
    old = load_config(None, base={**causal, "student": {**causal["student"], "head": "cross"}})
    assert cell_training(old, cell) == cell_training(load_config(None, base=causal), cell)
    encoder = load_config(None, base={"student": {"head": "cross"}})
    assert cell_training(encoder, cell) != cell_training(load_config(None), cell)


# --- one grid on several processes (probekd.workers) ----------------------------------------------------------


def test_shards_parse_and_split_the_grid_into_disjoint_parts() -> None:
    from probekd.layout import Cell
    from probekd.workers import parse_shard, shard_cells

    assert parse_shard("0/1") == (0, 1) and parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ProbekdError, match="--shard wants i/n"):
            parse_shard(bad)
    cells = [Cell("probe", 1.0, s) for s in range(7)]
    parts = [shard_cells(cells, (i, 3)) for i in range(3)]
    assert [c.seed for c in parts[1]] == [1, 4]
    assert sorted(c.seed for part in parts for c in part) == list(range(7))
    assert shard_cells(cells, None) == cells


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process holding the lock at `path` until it is killed."""
    code = (
        f"import time, filelock; lock = filelock.FileLock({str(path)!r}); lock.acquire(); print('held', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_cell_held_by_another_process_is_left_to_it_and_taken_over_when_it_dies(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker passes over a cell another process holds, trains the rest, waits, and finishes the held cell once
    its holder is killed (the OS drops the lock); a claimed cell cannot be claimed twice."""
    import probekd.workers as workers

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    for name in ("hard-f1-s1", "probe-f1-s1"):
        shutil.rmtree(copy / "students" / name)
    holder = _hold_lock(workers.lock_path(copy, "probe-f1-s1"))
    with workers.claimed(copy, "probe-f1-s1") as mine:
        assert not mine
    monkeypatch.setattr(workers, "POLL_SECONDS", 0.2)

    class KillOnWait(logging.Handler):  # the "other worker" dies once this one has passed its cell over and waits
        waited = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "being trained by other workers" in record.getMessage():
                KillOnWait.waited += 1
                holder.kill()
                holder.wait()

    handler = KillOnWait(level=logging.INFO)
    logger = logging.getLogger("probekd.workers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it also clears the logger's level cache)
    try:
        cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir))
        results = {r["cell"]: r for r in run_experiment(cfg, copy, stage="students")}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # it trained the free cell, waited (once) for the held one, and trained that only after its holder died
    assert KillOnWait.waited == 1 and holder.returncode is not None
    assert len(results) == 20 and (copy / "students" / "probe-f1-s1" / "metrics.json").is_file()
    assert results["hard-f1-s1"]["accuracy"] >= 0
    with workers.claimed(copy, "probe-f1-s1") as mine, workers.claimed(copy, "probe-f1-s1") as again:
        assert mine and not again


def test_two_workers_share_a_grid_and_train_each_cell_once(
    finished_run: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`probekd run --workers 2`: two spawned processes finish the missing cells, each cell trained once (one
    training log per cell), then the report is written; `--workers` and `--shard` are refused where they mean
    nothing."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    missing = ["hard-f0.5-s0", "probe-f1-s0", "smoothed-f1-s1"]
    for name in missing:
        shutil.rmtree(copy / "students" / name)
        (copy / "logs" / f"{name}.jsonl").unlink()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_llama_dir, tiny_bert_dir)))
    res = CliRunner().invoke(app, ["run", str(config), "--out", str(copy), "--stage", "students", "--workers", "2"])
    assert res.exit_code == 0, res.output
    for name in missing:
        logs = (copy / "logs" / f"{name}.jsonl").read_text().splitlines()
        assert sum("train_runtime" in line for line in logs) == 1, name
        assert (copy / "students" / name / "metrics.json").is_file()
    assert "report:" in res.output
    for args, message in ((["--stage", "targets", "--workers", "2"], "--stage targets trains no student"),
                          (["--shard", "2/2"], "--shard wants i/n"), (["--workers", "0"], "at least 1")):  # fmt: skip
        res = CliRunner().invoke(app, ["run", str(config), "--out", str(copy), *args])
        assert res.exit_code != 0 and message in str(res.exception), args


def test_selection_axis_labels_other_questions_at_the_same_budget(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`grid.selections: [random, pcoreset]`: a pcoreset cell has its own targets file and name suffix, the same
    number of labelled rows as the random cell of its fraction (other rows), and the report compares it with the
    random cell of its signal (variant `probe · pcoreset`)."""
    grid = {"fractions": [0.25], "seeds": [0], "signals": ["hard", "probe"], "selections": ["random", "pcoreset"]}
    cfg = load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir, **grid))
    assert [c.name for c in cfg.cells()] == ["hard-f0.25-s0", "probe-f0.25-s0", "hard-f0.25-s0-pcoreset",
                                             "probe-f0.25-s0-pcoreset"]  # fmt: skip
    run = tmp_path / "sel"
    results = {r["cell"]: r for r in run_experiment(cfg, run)}
    assert results["probe-f0.25-s0-pcoreset"]["selection"] == "pcoreset"
    assert results["probe-f0.25-s0-pcoreset"]["n_labelled"] == results["probe-f0.25-s0"]["n_labelled"] == 10
    random_ids = set(SoftTargets.load(run / "targets" / "hard-f0.25-s0.npz").ids)
    chosen_ids = set(SoftTargets.load(run / "targets" / "hard-f0.25-s0-pcoreset.npz").ids)
    assert len(random_ids) == len(chosen_ids) == 10 and random_ids != chosen_ids
    write_report(run)
    report = (run / "report" / "report.md").read_text()
    selection = report.split("## Label selection against random")[1].split("\n## ")[0]
    assert "| 0.25 | Probe-KD · pcoreset |" in selection and "| 0.25 | hard labels · pcoreset |" in selection
    assert "## Losses and weightings" not in report  # no loss or weighting variant: no such table
    targets = report.split("## Targets on train")[1].split("\n## ")[0]
    assert "Probe-KD · pcoreset" in targets  # its own targets, not the random cell's
    # keep_students: best prunes within a selection, never across (the random twin does not take its place)
    from probekd.experiment import prune_kept

    best = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"keep_students": "best"})})
    assert prune_kept(run, best) == []  # one seed per (signal, fraction, loss, weighting, selection)
    rows = list(csv.DictReader((run / "report" / "results.csv").read_text().splitlines()))
    assert sorted(r["selection"] for r in rows) == ["pcoreset", "pcoreset", "random", "random"]


def test_hidden_match_trains_on_the_probes_layer_and_keeps_the_plain_encoder(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`train.hidden_match`: each training row carries the teacher's state at the probe's chosen (feature, layer),
    standardized over the training split's options; the kept student is the plain encoder (no projection); without
    the teacher caches (a students-only copy of the run) the cell is refused naming the folder."""
    from safetensors import safe_open

    from probekd.experiment import matched_states
    from probekd.student.hidden_match import PROJECTION, standardize_states
    from probekd.teacher.cache import load_cache

    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[1.0], seeds=[0], signals=["probe"])
    base["train"] |= {"hidden_match": 0.5, "hidden_match_loss": "mi_alpha"}
    cfg = load_config(None, base=base)
    run = tmp_path / "hm"
    [metrics] = run_experiment(cfg, run)
    assert metrics["cell"] == "probe-f1-s0" and 0 <= metrics["accuracy"] <= 1
    summary = json.loads((run / "probes" / "summary.json").read_text())
    cache = load_cache(run / "teacher" / "train")
    name = "hidden_mean" if summary["chosen_feature"] == "mean" else "hidden"
    want = standardize_states(cache.layer_states(name, [cache.layers.index(summary["chosen_layer"])])[0], cache.mask)
    rows = np.array([3, 0, 7])
    np.testing.assert_array_equal(matched_states(run, rows, cache.mask.shape[1])[:, : want.shape[1]], want[rows])
    # a cell's states: the layer its own labels' probe chose (its targets file), not the probe stage's
    from probekd.config import Cell

    meta = SoftTargets.load(run / "targets" / "probe-f1-s0.npz").meta
    own = "hidden_mean" if meta["feature"] == "mean" else "hidden"
    own_states = standardize_states(cache.layer_states(own, [cache.layers.index(meta["layer"])])[0], cache.mask)
    got = matched_states(run, rows, cache.mask.shape[1], Cell("probe", 1.0, 0))
    np.testing.assert_array_equal(got[:, : own_states.shape[1]], own_states[rows])
    for f in (run / "students" / "probe-f1-s0" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert not [k for k in st.keys() if PROJECTION in k]  # noqa: SIM118
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shard-*", "students"))
    shutil.rmtree(copy / "teacher")
    with pytest.raises(ProbekdError, match=r"reads the teacher's states of the training split from .*teacher/train"):
        run_experiment(cfg, copy, stage="students")


def test_influence_is_a_value_of_the_weighting_axis(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`grid.weightings: [none, influence]` (KD-AIF): its own cell, weights from the cell's dev rows, logged like
    PACED's, and the report compares it with the unweighted student."""
    grid = {"fractions": [1.0], "seeds": [0], "signals": ["probe"], "weightings": ["none", "influence"]}
    run = tmp_path / "influence"
    results = {r["cell"]: r for r in run_experiment(load_config(None, base=tiny_config(tiny_llama_dir, tiny_bert_dir,
                                                                                        **grid)), run)}  # fmt: skip
    assert sorted(results) == ["probe-f1-s0", "probe-f1-s0-fkl-influence"]
    stats = results["probe-f1-s0-fkl-influence"]["weights"][0]
    assert stats["step"] == 0 and stats["n"] == 40 and 0 < stats["ess_share"] < 1
    assert "| 1 | Probe-KD · fkl · influence |" in write_report(run).read_text()


def test_students_under_torchrun_train_together_and_rank_0_writes(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc_per_node 2 -m probekd run CONFIG --stage students` (gloo on CPU): both ranks train each
    student together (DDP, each taking half of every optimizer step's rows, so a student takes as many steps as on
    one process); rank 0 alone writes (each logged step once, no checkpoints left); a finished cell is skipped by
    both; `--workers` under a launcher is refused."""
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[1.0], seeds=[0], signals=["hard", "probe"])
    base["train"] |= {"epochs": 2}
    run = tmp_path / "ddp"
    run_experiment(load_config(None, base=base), run, stage="targets")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(base))
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "probekd", "run", str(path), "--out", str(run), "--stage", "students"]  # fmt: skip
    proc = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cell in ("hard-f1-s0", "probe-f1-s0"):
        metrics = json.loads((run / "students" / cell / "metrics.json").read_text())
        assert metrics["processes"] == 2 and 0 <= metrics["accuracy"] <= 1
        assert sorted(p.name for p in (run / "students" / cell).iterdir()) == ["metrics.json", "model",
                                                                               "test_probs.npy"]  # fmt: skip
        logged = [json.loads(line) for line in (run / "logs" / f"{cell}.jsonl").read_text().splitlines()]
        loss_steps = [e["step"] for e in logged if "loss" in e]
        assert loss_steps == sorted(set(loss_steps))  # each step logged once: rank 1 writes no log
        assert logged[-1]["step"] == 2 * 5  # 40 rows, 8 per optimizer step (4 per rank), 2 epochs: as on one process
    # the loss has the one-process scale (a launcher-aware loss divided by the global count, or Trainer's token
    # averaging, would halve or double it): the first logged loss of the same cell trained by one process
    one = tmp_path / "one"
    shutil.copytree(run, one, ignore=shutil.ignore_patterns("students", "logs", "locks"))
    run_experiment(load_config(None, base=base), one, stage="students")

    def first_loss(folder: Path) -> float:
        lines = (folder / "logs" / "hard-f1-s0.jsonl").read_text().splitlines()
        return next(json.loads(x)["loss"] for x in lines if "loss" in json.loads(x))

    assert 0.75 < first_loss(run) / first_loss(one) < 1.33
    (run / "students" / "hard-f1-s0" / "metrics.json").unlink()
    before = (run / "students" / "probe-f1-s0" / "metrics.json").read_text()
    again = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "students" / "hard-f1-s0" / "metrics.json").is_file()
    assert (run / "students" / "probe-f1-s0" / "metrics.json").read_text() == before  # skipped by both ranks
    refused = subprocess.run([*torchrun, "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "use one or the other" in refused.stderr


def test_options_added_later_are_left_out_of_a_default_cells_fingerprint() -> None:
    """A cell trained with every later option off has the fingerprint it had before the options existed, so finished
    students and recipe-search trials stay valid: the recorded fingerprint of ARC-Challenge's first search trial
    (results/arc_challenge-smollm2-minilm/tune/hard/t0-s0.json, written on 2026-12-07 before Mixup, hidden-state
    matching, LELP, DDK and min_steps existed) and the training keys of such a cell."""
    from probekd.config import Cell
    from probekd.experiment import cell_training
    from probekd.teacher.cache import fingerprint

    cfg = load_config(Path(__file__).parents[1] / "experiments" / "arc_challenge-smollm2-minilm.yaml")
    recipe = {"epochs": 3.0, "learning_rate": 0.0003, "warmup_ratio": 0.1, "weight_decay": 0.01}
    cfg = cfg.model_copy(update={"train_by_signal": {"hard": recipe}})
    training = cell_training(cfg, Cell("hard", 0.25, 0, "fkl", "none"))
    assert sorted(training["train"]) == ["alpha", "batch_size", "bf16", "epochs", "eval_batch_size", "grad_accum",
                                         "group_by_length", "learning_rate", "loss", "loss_options", "report_to",
                                         "temperature", "warmup_ratio", "weight_decay"]  # fmt: skip
    assert fingerprint(training) == "d8b8a1f6bbccd6352389d3ac4c2d085a5dba69d4de9376053ad0e303305ae5b5"


def test_a_ddk_grid_without_domains_is_refused_before_any_stage(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`grid.weightings: [none, ddk]` on ARC (no domain field, no subject) stops at once, naming the missing domains
    and where to give them; nothing is extracted."""
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[1.0], seeds=[0], signals=["probe"],
                       weightings=["none", "ddk"])  # fmt: skip
    with pytest.raises(ProbekdError, match=r"training questions have no domain .* `domain` field or column"):
        run_experiment(load_config(None, base=base), tmp_path / "ddk")
    assert not (tmp_path / "ddk" / "teacher").exists()
