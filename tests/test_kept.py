"""The kept student, the product of a run: saved as a standard Hugging Face folder that `AutoModel*` loads, answering
with the same probabilities as the run's own evaluation (`probekd predict`, `probekd.load_student`), exported by
dev accuracy (never test), and refusing what it cannot answer with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from probekd.config import load_config
from probekd.errors import ProbekdError
from probekd.experiment import prune_kept, run_experiment
from probekd.layout import metrics_path, model_dir, student_dir
from probekd.predict import KeptStudent, load_questions
from probekd.student.heads import StudentConfig
from probekd.student.kept import MANIFEST, KeptManifest, read_manifest
from test_cli import run
from test_experiment import tiny_config


@pytest.fixture(scope="module")
def encoder_run(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("kept") / "run"
    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[1.0], signals=["hard", "probe"])
    base["student"]["head"] = "cross"  # the bi-encoder's: `test_biencoder_student_is_kept_with_its_learned_scale`
    assert len(run_experiment(load_config(None, base=base), run_dir)) == 4
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir: Path, tiny_tied_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("kept-lora") / "run"
    base = tiny_config(tiny_llama_dir, tiny_tied_llama_dir, fractions=[1.0], seeds=[0], signals=["probe"])
    base["student"] |= {"kind": "causal", "formulation": "option", "prompt": "base", "lora": True}
    assert len(run_experiment(load_config(None, base=base), run_dir)) == 1
    return run_dir


def _test_questions(run_dir: Path) -> list:
    cfg = load_config(run_dir / "config.yaml")
    return load_questions(cfg.task, "test", None, limit=cfg.limit["test"])[0]


def test_encoder_student_is_a_standard_folder_and_predicts_as_the_run_did(encoder_run: Path) -> None:
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    questions = _test_questions(encoder_run)
    for cell in ("hard-f1-s0", "probe-f1-s1"):
        folder = model_dir(encoder_run, cell)
        assert {"config.json", "model.safetensors", MANIFEST, "README.md", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }
        model = AutoModelForMultipleChoice.from_pretrained(folder)  # no `model.` prefix: the standard class loads it
        assert type(model).__name__ == "BertForMultipleChoice" and AutoTokenizer.from_pretrained(folder)
        manifest = read_manifest(folder)
        metrics = json.loads(metrics_path(encoder_run, cell).read_text())
        assert manifest.cell == cell and manifest.signal == cell.split("-")[0]
        assert manifest.num_options == max(q.k for q in questions) == 4
        assert manifest.metrics.test_accuracy == metrics["accuracy"] and manifest.n_dev == 16
        kept = KeptStudent(folder)
        # the same probabilities as the in-run evaluation, bit for bit, hence the same accuracy
        np.testing.assert_array_equal(
            kept.probabilities(questions), np.load(student_dir(encoder_run, cell) / "test_probs.npy")
        )
        card = (folder / "README.md").read_text()
        assert f"| this student | {metrics['accuracy']:.3f}" in card and "never on test" in card


def test_lora_causal_student_is_merged_and_keeps_its_adapter(lora_run: Path, tiny_tied_llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = model_dir(lora_run, "probe-f1-s0")
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the adapter alone, on the base model, gives the same weights as the merged folder
    base = AutoModelForCausalLM.from_pretrained(tiny_tied_llama_dir)
    adapted = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload()
    for (n, a), (_, b) in zip(adapted.state_dict().items(), merged.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    manifest = read_manifest(folder)
    assert manifest.student.kind == "causal" and manifest.template is not None and manifest.student.lora
    probs = KeptStudent(folder).probabilities(_test_questions(lora_run))
    np.testing.assert_array_equal(probs, np.load(student_dir(lora_run, "probe-f1-s0") / "test_probs.npy"))


@pytest.mark.parametrize("cell", ["probe-f1-s0", "hard-f1-s1"])
def test_predict_cli_on_the_run_split_equals_metrics(encoder_run: Path, cell: str) -> None:
    """Accuracy and interval as in the cell's metrics.json (the interval bootstrapped with the cell's seed)."""
    metrics = json.loads(metrics_path(encoder_run, cell).read_text())
    out = run("predict", str(model_dir(encoder_run, cell)), "--task", "arc_easy", "--limit", "16")
    lo, hi = metrics["accuracy_ci"]
    assert f"accuracy {metrics['accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] on 16 labelled" in out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    probs = np.load(student_dir(encoder_run, cell) / "test_probs.npy")
    assert len(lines) == 16 and all(set(x) == {"id", "prediction", "probs"} for x in lines)
    for x, p in zip(lines, probs, strict=True):
        assert x["probs"] == [float(v) for v in p[: len(x["probs"])]] and x["prediction"] in "ABCDE1234"


def test_predict_file_schema_unlabelled_and_labelled(encoder_run: Path, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    rows = [
        {"id": "u1", "question": "Which is a mammal?", "options": ["dog", "fish", "frog"]},
        {"id": "u2", "question": "What gives plants energy?", "options": ["sun", "water", "heat", "soil"]},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "preds.jsonl"
    res = run("predict", str(model_dir(encoder_run, "hard-f1-s0")), "--file", str(questions), "--out", str(out_file))
    assert "accuracy" not in res.stderr and res.stdout == ""  # unlabelled: no accuracy; the lines went to --out
    got = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [g["id"] for g in got] == ["u1", "u2"] and [len(g["probs"]) for g in got] == [3, 4]
    for g in got:
        assert abs(sum(g["probs"]) - 1) < 1e-5 and g["prediction"] == "ABCD"[int(np.argmax(g["probs"]))]
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r | {"answer": 0}) + "\n" for r in rows))
    res = run("predict", str(model_dir(encoder_run, "hard-f1-s0")), "--file", str(labelled))
    assert "on 2 labelled" in res.stderr and len(res.stdout.splitlines()) == 2


def test_predict_refuses_what_it_cannot_answer(encoder_run: Path, tmp_path: Path) -> None:
    folder = str(model_dir(encoder_run, "hard-f1-s0"))
    bad = run("predict", str(student_dir(encoder_run, "hard-f1-s0")), "--task", "arc_easy", check=False)
    assert bad.returncode == 2 and "not a kept probekd student" in bad.stderr and "probekd.json" in bad.stderr
    six = tmp_path / "six.jsonl"
    six.write_text(json.dumps({"id": "q6", "question": "Pick one", "options": list("abcdef")}) + "\n")
    bad = run("predict", folder, "--file", str(six), check=False)
    assert bad.returncode == 2 and "'q6' has 6 options" in bad.stderr and "at most 4" in bad.stderr
    assert "six.jsonl:1" in bad.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "e", "question": "Pick one", "options": ["a", " ", "c"]}) + "\n")
    bad = run("predict", folder, "--file", str(empty), check=False)
    assert bad.returncode == 2 and "no text for option(s) [1]" in bad.stderr and "empty.jsonl:1" in bad.stderr
    bad = run("predict", folder, check=False)
    assert bad.returncode == 2 and "either --task" in bad.stderr


def test_export_chooses_by_dev_never_test(encoder_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(encoder_run, copy)
    # dev and test rank the students in opposite orders: the export follows dev
    made = {"hard-f1-s0": (0.9, 0.1), "hard-f1-s1": (0.2, 0.99), "probe-f1-s0": (0.6, 0.5), "probe-f1-s1": (0.5, 0.6)}
    for cell, (dev, test) in made.items():
        m = json.loads(metrics_path(copy, cell).read_text())
        metrics_path(copy, cell).write_text(json.dumps(m | {"best_dev_accuracy": dev, "accuracy": test}))
    out = run("export", str(copy), "--best", "--out", str(tmp_path / "best")).stdout
    assert f"exported to {tmp_path / 'best'}" in out
    exported = read_manifest(tmp_path / "best")
    assert exported.cell == "hard-f1-s0" and exported.exported["chosen_by"] == "best dev accuracy"
    assert exported.exported["candidates"] == 4 and "Why this student" in (tmp_path / "best" / "README.md").read_text()
    run("export", str(copy), "--best", "--signal", "probe", "--out", str(tmp_path / "probe"))
    assert read_manifest(tmp_path / "probe").cell == "probe-f1-s0"
    bad = run("export", str(copy), "--best", "--signal", "probes", check=False)
    assert bad.returncode == 2 and "unknown signal 'probes'" in bad.stderr
    bad = run("export", str(copy), "--best", "--signal", "teacher", check=False)
    assert bad.returncode == 2 and "kept: hard at 1, probe at 1" in bad.stderr


def test_keep_best_keeps_one_student_per_signal_and_fraction(encoder_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(encoder_run, copy)
    cfg = load_config(copy / "config.yaml", ["grid.keep_students=best"])
    devs = {c: json.loads(metrics_path(copy, c).read_text())["best_dev_accuracy"] for c in ("hard-f1-s0", "hard-f1-s1")}
    removed = prune_kept(copy, cfg)
    assert len(removed) == 2
    for signal in ("hard", "probe"):
        kept = [s for s in (0, 1) if model_dir(copy, f"{signal}-f1-s{s}").is_dir()]
        assert len(kept) == 1
    best_hard = max((0, 1), key=lambda s: (devs[f"hard-f1-s{s}"], -s))
    assert model_dir(copy, f"hard-f1-s{best_hard}").is_dir()
    assert prune_kept(copy, cfg) == []  # nothing more to remove


def test_a_failed_save_leaves_no_folder_that_looks_complete(encoder_run: Path, tmp_path: Path, monkeypatch) -> None:
    from probekd.student.kept import save_kept

    kept = KeptStudent(model_dir(encoder_run, "hard-f1-s0"))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(kept.student.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_kept(kept.student, tmp_path / "model", kept.manifest)
    assert list(tmp_path.iterdir()) == []  # neither `model` nor a leftover partial folder


def test_a_cell_without_a_kept_model_still_reports(encoder_run: Path, tmp_path: Path) -> None:
    """Cells finished before students were kept have no model folder: export skips them, nothing crashes."""
    copy = tmp_path / "run"
    shutil.copytree(encoder_run, copy)
    for cell in ("hard-f1-s0", "hard-f1-s1", "probe-f1-s0", "probe-f1-s1"):
        shutil.rmtree(model_dir(copy, cell))
    with pytest.raises(ProbekdError, match="no kept student"):
        from probekd.exporter import choose

        choose(copy)
    assert "report.md" in run("report", str(copy)).stdout


def test_biencoder_student_is_kept_with_its_learned_scale(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A bi-encoder student saves as a plain `AutoModel` folder whose weights carry the learned scale; the kept
    student answers as the run did; the metrics hold the zero-shot accuracy measured before training."""
    from safetensors import safe_open
    from transformers import AutoModel

    from probekd.student.heads import LOGIT_SCALE

    base = tiny_config(tiny_llama_dir, tiny_bert_dir, fractions=[1.0], seeds=[0], signals=["probe"])
    base["student"]["head"] = "biencoder"
    base["train"]["learning_rate"] = 1e-2
    run_dir = tmp_path / "run"
    (metrics,) = run_experiment(load_config(None, base=base), run_dir)
    folder = model_dir(run_dir, "probe-f1-s0")
    assert type(AutoModel.from_pretrained(folder)).__name__ == "BertModel"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        scale = float(st.get_tensor(LOGIT_SCALE).exp())
    assert scale != pytest.approx(20.0)  # trained, and saved with the weights
    kept = KeptStudent(folder)
    assert float(getattr(kept.student.model, LOGIT_SCALE).detach().exp()) == pytest.approx(scale)
    np.testing.assert_array_equal(
        kept.probabilities(_test_questions(run_dir)), np.load(student_dir(run_dir, "probe-f1-s0") / "test_probs.npy")
    )
    zs = metrics["zero_shot"]
    assert set(zs) == {"dev_accuracy", "test_accuracy"} and 0 <= zs["test_accuracy"] <= 1
    # the model card's transformers-only code gives the run's probabilities too
    card = (folder / "README.md").read_text()
    code = card.split("```python\n")[2].split("```")[0].replace("THIS_FOLDER", str(folder))
    scope: dict = {}
    exec(code, scope)  # the card's own snippet, run as a user would
    run_probs = np.load(student_dir(run_dir, "probe-f1-s0") / "test_probs.npy")
    for q, p in zip(_test_questions(run_dir), run_probs, strict=True):
        np.testing.assert_allclose(scope["probabilities"](q.question, list(q.options)).numpy(), p[: q.k], atol=1e-5)
    st = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in st] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True


def test_a_manifest_written_before_the_biencoder_head_reads_as_a_cross_encoder() -> None:
    """Kept students from before `student.head` existed were cross-encoders; today's default is the bi-encoder."""
    old = KeptManifest.model_validate({"student": {"model": "minilm-l6", "kind": "encoder"}, "num_options": 4})
    assert old.student.head == "cross"
    new = KeptManifest.model_validate({"student": {"model": "minilm-l6", "head": "biencoder"}, "num_options": 4})
    assert new.student.head == "biencoder" and StudentConfig().head == "biencoder"
