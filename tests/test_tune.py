"""`probekd tune` on tiny random models: the same trials for every signal, the choice made on dev alone (test labels
changed, the same recipe), resumable trials, the chosen recipe applied by the grid and shown in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import probekd
from probekd.cli import app
from probekd.config import load_config
from probekd.data.tasks import builtin_root
from probekd.errors import ConfigError, ProbekdError
from probekd.experiment import run_experiment
from probekd.report.report import write_report
from probekd.tuning import TuneConfig, recipes, run_tune, trial_path, tuned_overrides

SIZES = {"train": 24, "dev": 12, "test": 12}


def _task_folder(folder: Path, *, shuffle_test_answers: bool = False) -> Path:
    """The first rows of the bundled ARC-Easy splits as a user's folder; optionally every test answer moved to
    another option (what a search that read test would notice)."""
    folder.mkdir(parents=True)
    src = builtin_root() / "arc_easy"
    for split, n in SIZES.items():
        rows = [json.loads(x) for x in (src / f"{split}.jsonl").read_text().splitlines()[:n]]
        if split == "test" and shuffle_test_answers:
            for r in rows:
                labels = [c["label"] for c in r["question"]["choices"]]
                r["answerKey"] = labels[(labels.index(r["answerKey"]) + 1) % len(labels)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _config(teacher: Path, student: Path, task: Path) -> dict:
    return {
        "name": "tiny tune",
        "task": str(task),
        "teacher": str(teacher),
        "extract": {"formulation": "option", "prompt": "base", "storage_dtype": "float32"},
        "probe": {"l2_grid": [0.1], "max_iter": 20, "layers": [1, 2]},
        "student": {"model": str(student), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-4},
        "grid": {"fractions": [1.0], "seeds": [0], "signals": ["hard", "probe"]},
        "tune": {"trials": 3, "epochs": [1, 2], "learning_rate": [1e-4, 3e-3], "seed": 1},
    }


@pytest.fixture(scope="module")
def tuned(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tune")
    task = _task_folder(root / "task")
    cfg = load_config(None, base=_config(tiny_llama_dir, tiny_bert_dir, task))
    return root / "run", run_tune(cfg, root / "run")


def test_every_signal_gets_the_same_trials_and_the_best_dev_score_is_chosen(tuned: tuple[Path, dict]) -> None:
    run, summary = tuned
    assert set(summary["signals"]) == {"hard", "probe"}
    per_signal = [[t["recipe"] for t in s["trials"]] for s in summary["signals"].values()]
    assert per_signal[0] == per_signal[1] and len(per_signal[0]) == 3
    assert per_signal[0][0] == {"learning_rate": 1e-4, "epochs": 1.0, "warmup_ratio": 0.1, "weight_decay": 0.01}
    for signal, s in summary["signals"].items():
        scores = [t["score"] for t in s["trials"]]
        assert s["chosen"] == int(np.argmax(scores))  # the first best: ties go to the earlier trial
        assert s["recipe"] == s["trials"][s["chosen"]]["recipe"]
        for t in s["trials"]:
            record = json.loads(trial_path(run, signal, t["trial"], 0).read_text())
            assert record["best_dev_accuracy"] == max(record["dev_accuracy_by_epoch"]) == t["score"]
            assert len(record["dev_accuracy_by_epoch"]) == t["recipe"]["epochs"]
    assert not list((run / "tune").glob("*/*-checkpoints"))
    assert json.loads((run / "tune" / "summary.json").read_text()) == summary
    assert tuned_overrides(summary) == {s: v["recipe"] for s, v in summary["signals"].items()}


def test_the_search_never_reads_test_labels(
    tuned: tuple[Path, dict], tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Every test answer moved to another option: the probes' test accuracy changes, the trials' dev scores and the
    chosen recipes do not."""
    run, summary = tuned
    task = _task_folder(tmp_path / "task", shuffle_test_answers=True)
    other = run_tune(load_config(None, base=_config(tiny_llama_dir, tiny_bert_dir, task)), tmp_path / "run")
    assert other["signals"] == summary["signals"]
    probes = [json.loads((r / "probes" / "summary.json").read_text()) for r in (run, tmp_path / "run")]
    assert probes[0]["teacher_accuracy"]["test"] != probes[1]["teacher_accuracy"]["test"]


def test_an_interrupted_search_resumes_with_the_trials_it_has(
    tuned: tuple[Path, dict], tiny_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    run, summary = tuned
    done = trial_path(run, "probe", 1, 0)
    before = done.stat().st_mtime_ns
    missing = trial_path(run, "hard", 2, 0)
    missing.unlink()
    task = Path(load_config(None, base=yaml.safe_load((run / "config.yaml").read_text())).task)
    again = run_tune(load_config(None, base=_config(tiny_llama_dir, tiny_bert_dir, task)), run)
    assert done.stat().st_mtime_ns == before  # kept, not trained again
    assert (
        missing.exists()
        and again["signals"]["hard"]["trials"][2]["recipe"] == summary["signals"]["hard"]["trials"][2]["recipe"]
    )
    # another search (other draws, or another training setting) in the same folder is refused, not mixed in
    other = _config(tiny_llama_dir, tiny_bert_dir, task)
    other["tune"]["seed"] = 2
    with pytest.raises(ProbekdError, match=r"t1-s0.json was trained with other .* settings than this search's trial 1"):
        run_tune(load_config(None, base=other), run)
    other = _config(tiny_llama_dir, tiny_bert_dir, task)
    other["train"]["alpha"] = 0.9
    with pytest.raises(ProbekdError, match=r"t0-s0.json was trained with other"):
        run_tune(load_config(None, base=other), run)


def test_cli_tune_writes_a_config_the_grid_runs_with_in_the_same_folder(
    tuned: tuple[Path, dict], tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    run, summary = tuned
    task = Path(load_config(None, base=yaml.safe_load((run / "config.yaml").read_text())).task)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_llama_dir, tiny_bert_dir, task)))
    res = CliRunner().invoke(app, ["tune", str(config), "--out", str(run)])  # every trial is there
    assert res.exit_code == 0, res.output
    assert "chosen" in res.output and f"probekd run {run / 'tune' / 'tuned.yaml'} --out {run}" in res.output
    cfg = load_config(run / "tune" / "tuned.yaml")
    assert cfg.train_by_signal == tuned_overrides(summary)
    assert probekd.tune(str(config), run) == cfg  # the Python API: the same search (every trial there), same config
    for signal in ("hard", "probe"):
        assert cfg.train_for(signal).learning_rate == summary["signals"][signal]["recipe"]["learning_rate"]
    # the tune folder's config differs in train_by_signal while no student is made: fine. (A tiny random student
    # scores the same on dev whatever its recipe, so the chosen one may be the current one: set another here.)
    recipe = {"epochs": 2.0, "learning_rate": 3e-3}
    applied = cfg.model_copy(update={"train_by_signal": {"probe": recipe}})
    results = run_experiment(applied, run)
    for m in results:
        want = recipe if m["signal"] == "probe" else {"epochs": 1.0, "learning_rate": 1e-4}
        assert m["train"]["learning_rate"] == want["learning_rate"]
        assert len(m["dev_accuracy_by_epoch"]) == want["epochs"]
    text = write_report(run).read_text()
    assert "## Training recipe per signal" in text
    assert "| probe | 0.003 | 2 | 0.1 | 0.01 | the configuration's `train_by_signal.probe` |" in text
    if summary["signals"]["hard"]["chosen"] == 0:  # hard's students used the recipe the search chose for it
        assert "| hard | 0.0001 | 1 | 0.1 | 0.01 | `probekd tune`: best mean dev accuracy of 3 trials" in text
    # now that students are made with it, another recipe in this folder is refused, naming the field and students
    with pytest.raises(ProbekdError, match=r"differs in: .*train_by_signal.probe; students: .*probe-f1-s0"):
        run_experiment(cfg, run)


def test_recipes_are_seeded_draws_after_the_current_one() -> None:
    tune = TuneConfig(trials=5, learning_rate=(1e-5, 1e-3), epochs=[2, 4], seed=3)
    current = {"learning_rate": 5e-5, "epochs": 4, "warmup_ratio": 0.1, "weight_decay": 0.01, "alpha": 0.5}
    drawn = recipes(tune, current)
    assert drawn == recipes(tune, current) and drawn != recipes(tune.model_copy(update={"seed": 4}), current)
    assert drawn[0] == {"learning_rate": 5e-5, "epochs": 4.0, "warmup_ratio": 0.1, "weight_decay": 0.01}
    assert all(1e-5 <= r["learning_rate"] <= 1e-3 and r["epochs"] in (2, 4) for r in drawn[1:])


def test_tune_and_recipe_config_errors() -> None:
    with pytest.raises(ConfigError, match="learning_rate range must be 0 < low <= high"):
        load_config(None, base={"tune": {"learning_rate": [1e-3, 1e-5]}})
    with pytest.raises(ConfigError, match=r"train_by_signal: .*unknown signal 'probes'"):
        load_config(None, base={"train_by_signal": {"probes": {"learning_rate": 1e-4}}})
    with pytest.raises(ConfigError, match=r"cannot be set per signal; these can: \['learning_rate'"):
        load_config(None, base={"train_by_signal": {"probe": {"alpha": 0.1}}})
    with pytest.raises(ConfigError, match=r"train_by_signal.probe: .*epochs"):
        load_config(None, base={"train_by_signal": {"probe": {"epochs": -1}}})
    cfg = load_config(None, base={"train_by_signal": {"probe": {"learning_rate": 1e-4}}})
    assert cfg.train_for("probe").learning_rate == 1e-4 and cfg.train_for("hard") == cfg.train
    with pytest.raises(ProbekdError, match=r"tune.signals \['teacher'\] are not among grid.signals \['probe'\]"):
        bad = load_config(None, base={"grid": {"signals": ["probe"]}, "tune": {"signals": ["teacher"]}})
        run_tune(bad, Path("/nonexistent"))
