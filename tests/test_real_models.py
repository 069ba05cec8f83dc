"""Tests with the packaged real models (`make test-real`): conversion is interruptible and exact, extraction on
real ARC-Easy prompts matches the naive reference in both formulations (SmolLM2, and Gemma-3 for `option`), SmolLM2
trains as a LoRA student, and the demo runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from probekd.data import load_task
from probekd.data.prompts import get_template
from probekd.models import zoo
from probekd.teacher.extract import (
    extract_letter_batch,
    letter_token_ids,
    load_teacher,
    naive_letter_extract,
    option_tokens,
    resolve_layers,
)
from probekd.teacher.pipeline import _option_shard

pytestmark = pytest.mark.real
NAME = "smollm2-135m-instruct"


def _prepared(name: str) -> Path:
    if not zoo.PACKAGED[name].installed():
        pytest.fail(f"{name} is not installed: run `probekd models install {name}` (make test-real does)")
    folder = zoo.prepare(name)
    assert zoo.prepare(name) == folder  # the second call reuses the converted folder
    return folder


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return _prepared(NAME)


def test_interrupted_conversion_is_redone(tmp_path: Path) -> None:
    env = os.environ | {"PROBEKD_CACHE": str(tmp_path)}
    exe = [sys.executable, "-m", "probekd", "models", "prepare", NAME]
    proc = subprocess.Popen(exe, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(8)  # inside the GGUF conversion (it takes 20-60 s)
    proc.kill()
    proc.wait()
    target = zoo.PACKAGED[NAME].target().relative_to(zoo.cache_root())
    assert not (tmp_path / target / zoo.MARKER).exists()
    out = subprocess.run(exe, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / target)
    assert (tmp_path / target / zoo.MARKER).exists()
    assert not [p for p in (tmp_path / "models").iterdir() if "partial" in p.name]
    shutil.rmtree(tmp_path / "models")


def test_converted_model_matches_gguf(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = zoo.PACKAGED[NAME].sources()[0]
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    x = tok("Question: Which gas do plants take in?\nAnswer:", return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(model(**x).logits, ref(**x).logits, atol=0, rtol=0)


def test_real_letter_extraction_matches_naive(smollm2: Path) -> None:
    teacher = load_teacher(str(smollm2), "cpu")
    tpl = get_template("auto", teacher.tokenizer)
    exs = load_task("arc_easy").splits["dev"][:6]
    ids = letter_token_ids(teacher.tokenizer, tpl, 4)
    assert teacher.tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]
    prompts = [tpl.letter_prompt(e, teacher.tokenizer) for e in exs]
    hidden, logits = extract_letter_batch(teacher, prompts, list(range(31)), ids)
    for i, p in enumerate(prompts):
        ref_h, ref_logits = naive_letter_extract(teacher, p, ids)
        torch.testing.assert_close(hidden[i, :-1], ref_h[:-1], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(logits[i], ref_logits, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", [NAME, "gemma3-270m"])
def test_real_option_extraction_matches_whole_sequences(name: str) -> None:
    """The pipeline's `option` loop (questions batched, shared chat header cached, options on each question's cache)
    against every (question, option) run whole and alone: states at each layer and length-normalized
    log-likelihoods, on real ARC-Easy questions (Gemma-3 adds sliding-window layers and its own embedding scale)."""
    from tqdm import tqdm

    teacher = load_teacher(str(_prepared(name)), "cpu")
    tpl = get_template("auto", teacher.tokenizer)
    exs = load_task("arc_easy").splits["dev"][:5]
    layers = resolve_layers("all", teacher.num_layers)
    got = _option_shard(teacher, exs, tpl, layers, 5, 4, tqdm(disable=True))  # batches of up to 4 questions
    for i, e in enumerate(exs):
        pre, conts = option_tokens(teacher.tokenizer, *tpl.option_texts(e, teacher.tokenizer))
        for j, cid in enumerate(conts):
            with torch.inference_mode():
                out = teacher.model(input_ids=torch.tensor([pre + cid]), output_hidden_states=True)
            ref = torch.stack([h[0, -1].float() for h in out.hidden_states[:-1]])  # the last is after the norm
            torch.testing.assert_close(got["hidden"][i, j, :-1], ref, atol=2e-3, rtol=1e-3)
            logp = torch.log_softmax(out.logits[0, len(pre) - 1 : -1].float(), -1)
            ll = logp.gather(-1, torch.tensor(cid)[:, None]).mean()
            assert got["scores"][i, j].item() == pytest.approx(ll.item(), abs=2e-3)
        assert torch.isinf(got["scores"][i, e.k :]).all()


def test_demo_runs(tmp_path: Path, smollm2: Path) -> None:
    """The real demo (SmolLM2 teacher, MiniLM student), made small: every stage on the real models."""
    out = subprocess.run(
        [sys.executable, "-m", "probekd", "demo", "--out", str(tmp_path / "demo"),
         "--set", "limit={train: 40, dev: 20, test: 20}", "--set", "train.epochs=1"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "demo" / "report" / "report.md")
    assert "probe at layer" in out.stdout and "Probe-KD" in lines[-2]
    for name in ("layers.png", "data_efficiency.png", "results.csv"):
        assert (tmp_path / "demo" / "report" / name).exists()


def test_smollm2_lora_student_trains_and_keeps_its_best_epoch(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2 as a LoRA causal student (`option` formulation) on real ARC-Easy questions: training ends by
    reloading the best dev epoch (its output layer is tied to the embeddings, which once crashed here)."""
    import numpy as np

    from probekd.data.examples import answers_array, option_mask
    from probekd.student.heads import StudentConfig, build_student
    from probekd.student.train import Rows, predict, train_student
    from probekd.student.train_config import TrainConfig

    cfg = StudentConfig(model=NAME, kind="causal", formulation="option", lora=True, max_length=96)
    student = build_student(cfg, k=5, seed=0)
    splits = load_task("arc_easy").splits
    train, dev = splits["train"][:8], splits["dev"][:6]

    def rows(exs: list) -> Rows:
        y = answers_array(exs)
        return Rows([student.encode(e) for e in exs], option_mask(exs, 5), y, np.eye(5, dtype=np.float32)[y])

    history = train_student(student, rows(train), rows(dev), TrainConfig(epochs=2, batch_size=4), tmp_path / "ck", 0)
    base = student.model.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    by_epoch = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
    probs = predict(student, rows(dev))
    assert len(by_epoch) == 2 and (probs.argmax(1) == answers_array(dev)).mean() == pytest.approx(max(by_epoch))
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
