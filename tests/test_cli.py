"""The `probekd` command through its installed entry point, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probekd.cli import app
from probekd.data.tasks import builtin_root
from probekd.errors import ProbekdError

EXE = shutil.which("probekd", path=str(Path(sys.executable).parent)) or shutil.which("probekd")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert EXE, "the probekd entry point is not installed (pip install -e .)"
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_data_stats_json_exact() -> None:
    out = json.loads(run("data", "stats", "arc_challenge", "--json").stdout)
    assert out == {
        "train": {"n": 1119, "labelled": 1119, "options": {"3": 1, "4": 1117, "5": 1}},
        "dev": {"n": 299, "labelled": 299, "options": {"3": 3, "4": 295, "5": 1}},
        "test": {"n": 1170, "labelled": 1170, "options": {"3": 4, "4": 1163, "5": 3}},
    }


def test_data_stats_on_a_folder_table(tmp_path: Path) -> None:
    lines = (builtin_root() / "arc_easy" / "dev.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[30:40]) + "\n")
    out = run("data", "stats", str(tmp_path)).stdout.splitlines()
    assert out[0].split() == ["split", "n", "labelled", "options", "(K:", "count)"]
    assert out[1].split()[:3] == ["train", "30", "30"]
    assert out[2].split()[:3] == ["test", "10", "10"]


def test_generic_csv_with_columns_option(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("prompt,o1,o2,o3,gold\nq1,a,b,c,2\nq2,a,b,,0\nq3,a,b,c,\n")
    cols = json.dumps({"question": "prompt", "options": ["o1", "o2", "o3"], "answer": "gold"})
    out = json.loads(run("data", "stats", str(tmp_path), "--json", "--columns", cols).stdout)
    assert out == {"train": {"n": 3, "labelled": 2, "options": {"2": 1, "3": 2}}}


def test_bad_input_exits_2_with_location(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"id": "a", "question": {"stem": "s", "choices": [\n')
    proc = run("data", "stats", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: malformed JSON line")
    assert f"{tmp_path / 'train.jsonl'}:1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("data", "stats", "nosuchtask", check=False)
    assert proc.returncode == 2 and "unknown task 'nosuchtask'" in proc.stderr
    proc = run("data", "stats", "arc_easy", "--colums", "{}", check=False)
    assert proc.returncode == 2 and "No such option: --colums" in proc.stderr
    proc = run("data", "stats", "arc_easy", "--columns", '{"questoin": "q"}', check=False)
    assert proc.returncode == 2 and "questoin" in proc.stderr
    (tmp_path / "bad.yaml").write_text("grid: {mode: sideways}\n")
    proc = run("run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "grid.mode" in proc.stderr and "Traceback" not in proc.stderr


def test_models_prepare_prints_folder_last(tiny_llama_dir: Path) -> None:
    out = run("models", "prepare", str(tiny_llama_dir)).stdout.strip().splitlines()
    assert out[-1] == str(tiny_llama_dir.resolve())
    proc = run("models", "prepare", "no-such-org/no-such-model", check=False)
    assert proc.returncode == 2 and "not found in the local Hugging Face cache" in proc.stderr


def test_models_list_and_help() -> None:
    rows = json.loads(run("models", "list", "--json").stdout)
    assert {r["name"] for r in rows} >= {"smollm2-135m-instruct", "minilm-l6"}
    for args in ([], ["data"], ["models"], ["data", "stats"], ["models", "prepare"], ["models", "install"]):
        proc = run(*args, "--help")
        assert "Usage:" in proc.stdout


@pytest.mark.parametrize("args", [["data", "tasks"]])
def test_data_tasks_lists_builtins(args: list[str]) -> None:
    out = run(*args).stdout
    for name in ("arc_easy", "arc_challenge", "mmlu", "aqua_rat"):
        assert name in out


def test_probe_cli(tiny_run: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_run / "teacher", tmp_path / "teacher")
    out = run("probe", str(tmp_path), "--folds", "3", "--l2-grid", "0.01,0.1").stdout
    assert "chosen layer" in out and out.strip().splitlines()[-1].endswith("summary.json")
    s = json.loads((tmp_path / "probes" / "summary.json").read_text())
    assert s["config"]["l2_grid"] == [0.01, 0.1]
    bad = run("probe", str(tmp_path), "--folds", "2", check=False)
    assert bad.returncode == 2 and "n_folds" in bad.stderr


def tiny_demo_args(teacher: Path, student: Path) -> list[str]:
    """`--set` flags that run the embedded demo configuration on the tiny random models, small and fast."""
    return [
        "--set", f"teacher={teacher}", "--set", f"student.model={student}",
        "--set", "limit={train: 30, dev: 12, test: 12}", "--set", "extract.prompt=base",
        "--set", "train.epochs=1", "--set", "train.batch_size=8",
    ]  # fmt: skip


def terminal_table(lines: list[str]) -> list[str]:
    """The short table a run prints at its end: from its `signal f=...` header to the `report:` line."""
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["signal"])
    end = next(i for i, line in enumerate(lines) if line.startswith("report: "))
    return lines[head : end + 1]


def test_demo_code_path_on_tiny_models(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The demo's whole path (option extraction of ARC-Easy, probes, the student grid, the report) on tiny models."""
    out_dir = tmp_path / "demo"
    args = ["demo", "--out", str(out_dir), *tiny_demo_args(tiny_llama_dir, tiny_bert_dir)]
    out = run(*args).stdout
    lines = out.strip().splitlines()
    table = terminal_table(lines)
    assert table[-1] == f"report: {out_dir / 'report' / 'report.md'}"
    assert table[0].split() == ["signal", "f=1"]
    assert [x.split()[0] for x in table[1:-1]] == ["hard", "logit-KD", "Probe-KD"]  # the demo's signals
    # it ends with the kept student of the best dev accuracy and a `predict` command that works as printed
    kept, ask = lines[-2:]
    folder = Path(kept.split(": ", 1)[1])
    cells = {
        c: json.loads((out_dir / "students" / c / "metrics.json").read_text())
        for c in ("hard-f1-s0", "teacher-f1-s0", "probe-f1-s0")
    }
    best = max(cells.values(), key=lambda m: (m["best_dev_accuracy"], m["fraction"], -m["seed"]))
    assert kept.startswith("kept student (best dev accuracy): ") and folder.parent.name == best["cell"]
    assert ask.startswith("ask it: probekd predict ")
    answered = run(*ask.split()[3:])
    assert f"accuracy {best['accuracy']:.3f} [95% CI {best['accuracy_ci'][0]:.3f}, " in answered.stderr
    assert len(answered.stdout.splitlines()) == 12
    assert "probe at layer" in out
    s = json.loads((out_dir / "probes" / "summary.json").read_text())
    assert s["formulation"] == "option" and s["kind"] == "conditional" and s["layers"] == [0, 1, 2]
    # option caches can be probed on both states, the (feature, layer) pair chosen on dev
    both = run("probe", str(out_dir), "--feature", "auto", "--overwrite").stdout.strip().splitlines()
    s = json.loads(Path(both[-1]).read_text())
    assert s["config"]["feature"] == "auto" and both[0].split()[:2] == ["feature", "layer"]
    assert any(x.startswith(f"chosen layer {s['chosen_layer']}, {s['chosen_feature']} state (on dev)") for x in both)
    run("probe", str(out_dir), "--feature", "last", "--overwrite")  # back to the demo's settings
    # a second run reuses the caches, the probes and the students; `report` rewrites the report alone
    again = run(*args).stdout
    assert terminal_table(again.splitlines()) == table
    assert run("report", str(out_dir)).stdout.splitlines()[-1] == str(out_dir / "report" / "report.md")
    # another configuration in the same folder is refused, naming the field
    bad = run(*args, "--set", "train.alpha=0.9", check=False)
    assert bad.returncode == 2 and "train.alpha" in bad.stderr


def test_run_from_a_config_file_and_config_errors(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    template = run("demo", "--show-config").stdout
    import yaml

    cfg = yaml.safe_load(template)
    assert cfg["student"]["model"] == "minilm-l6" and cfg["grid"]["signals"][-1] == "probe"
    cfg.update(teacher=str(tiny_llama_dir), limit={"train": 24, "dev": 10, "test": 10})
    cfg["student"]["model"] = str(tiny_bert_dir)
    cfg["extract"]["prompt"] = "base"
    cfg["train"].update(epochs=1, batch_size=8)
    cfg["grid"]["signals"] = ["hard", "probe"]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run("run", str(path), "--out", str(tmp_path / "mine")).stdout
    assert f"report: {tmp_path / 'mine' / 'report' / 'report.md'}" in out.splitlines()
    # another run that makes the same cells (switch_at is read only by two-stage losses) takes them all over
    same = tmp_path / "same"
    reused = run(
        "run", str(path), "--out", str(same), "--reuse", str(tmp_path / "mine"), "--set", "train.switch_at=0.3"
    )
    assert (f"reused from {tmp_path / 'mine'}: 5 targets files, 2 finished students, 1 untrained-student prediction "
            "files") in reused.stdout  # fmt: skip
    assert not (same / "teacher").exists() and f"report: {same / 'report' / 'report.md'}" in reused.stdout.splitlines()
    # errors in input (in-process: `main` turns these into one line and exit 2, test_bad_input_exits_2_with_location)
    runner = CliRunner()
    both = runner.invoke(app, ["run", str(path), "--out", str(same), "--reuse", str(tmp_path / "mine"), "--overwrite"])
    assert isinstance(both.exception, ProbekdError) and "--reuse with --overwrite" in str(both.exception)
    bad = runner.invoke(app, ["run", str(path), "--set", "grid.mode=sideways"])
    assert isinstance(bad.exception, ProbekdError) and "grid.mode" in str(bad.exception)
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert isinstance(missing.exception, ProbekdError) and "no finished students" in str(missing.exception)


@pytest.mark.slow
def test_stages_on_two_machines(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`--stage targets` where the teacher is; `scripts/bundle_students_stage.sh` packs the run without the
    teacher's caches, with the student model, unpacked at another path as on a GPU machine; there, `probekd run
    RUN/config.yaml --stage students --workers 2` (run from the unpacked folder) trains the grid and writes the
    report."""
    import yaml

    cfg = yaml.safe_load(run("demo", "--show-config").stdout)
    cfg.update(teacher=str(tiny_llama_dir), limit={"train": 24, "dev": 10, "test": 10})
    cfg["student"]["model"] = str(tiny_bert_dir)
    cfg["extract"]["prompt"] = "base"
    cfg["train"].update(epochs=1, batch_size=8)
    cfg["grid"].update(signals=["hard", "probe"], seeds=[0, 1])
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    here = tmp_path / "here"
    out = run("run", str(path), "--out", str(here), "--stage", "targets").stdout
    assert out.strip().splitlines()[-1] == f"targets of 4 grid cells under {here / 'targets'}"
    assert not (here / "students").exists()
    scripts = Path(__file__).parents[1] / "scripts"
    bundle = tmp_path / "bundle.tgz"
    packed = subprocess.run(
        [str(scripts / "bundle_students_stage.sh"), str(bundle), str(tiny_bert_dir), str(here)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    elsewhere = tmp_path / "elsewhere"
    shutil.unpack_archive(bundle, elsewhere)
    there, model = elsewhere / "runs" / "here", elsewhere / "student"
    assert (there / "targets").is_dir() and not (there / "teacher").exists()  # the teacher's caches stay here
    proc = subprocess.run(
        [sys.executable, "-m", "probekd", "run", "runs/here/config.yaml", "--out", "runs/here", "--stage", "students",
         "--workers", "2"],
        capture_output=True, text=True, cwd=elsewhere, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (there / "students").iterdir()) == [
        "hard-f1-s0", "hard-f1-s1", "probe-f1-s0", "probe-f1-s1",
    ]  # fmt: skip
    assert (there / "report" / "report.md").exists() and not list((there / "teacher").glob("*/shard-*"))
    saved = yaml.safe_load((there / "config.yaml").read_text())
    assert saved["student"]["model"] == "student" and (model / "config.json").is_file()
    assert saved["grid"]["seeds"] == [0, 1]
