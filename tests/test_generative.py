"""The generative track: grading by the final answer, the free-form tasks, and rollouts from a tiny real model."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from probekd.cli import app
from probekd.data import load_task
from probekd.errors import DataError, ProbekdError
from probekd.generative.grading import canonical, grade, parse_number
from probekd.generative.problems import Problem, load_problems, parse_arith
from probekd.generative.rollouts import (
    RolloutConfig,
    answer_line_end,
    encode_prompts,
    load_rollouts,
    run_rollouts,
    sample_solutions,
)
from probekd.teacher.cache import CacheMismatchError

# --- grading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,000", Fraction(1000)),
        ("$1,234.50", Fraction(246900, 200)),
        ("-3/4", Fraction(-3, 4)),
        ("−12", Fraction(-12)),  # a Unicode minus
        ("12% of them", Fraction(12)),
        ("5 dollars", Fraction(5)),
        (".5", Fraction(1, 2)),
        ("0.750", Fraction(3, 4)),
        ("no digits here", None),
        ("7/0", None),
    ],
)
def test_parse_number_golden(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("solution", "gold", "right"),
    [
        ("48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72", True),
        ("She earns $1,000.00 in total.\n#### $1,000", "1000", True),
        ("#### 1000 dollars\nthen some chatter 5", "1000", True),  # the answer line wins over a later number
        ("So the answer is 18.", "18", True),
        ("Answer: -7", "-7", True),
        ("The result: 3 + 4 = 7", "7", True),  # no answer line: the last number
        ("3/4 of the cake\n#### 0.75", "3/4", True),
        ("#### 71", "72", False),
        ("#### I am not sure", "72", False),
        ("I have no idea.", "72", False),
        ("He answered 3 questions, 4 points each: 3*4=12", "12", True),  # "answered" is no answer statement
        ("Each answer takes 2 minutes, so 5*2=10", "10", True),
        ("#### Step 1: the total\n6 + 6 = 12\n#### 12", "12", True),  # a Markdown heading is no answer line
        ("She needs 20 - 5 = 15", "15", True),  # "- 5" is a subtraction, not a negative answer
        ("The total is 12\n#### \n", "12", True),  # an answer line cut off empty: the last number
        ("The answer is -4 degrees", "-4", True),
    ],
)
def test_grade_numbers(solution: str, gold: str, right: bool) -> None:
    assert grade(solution, gold, "number") is right


@pytest.mark.parametrize(
    ("solution", "gold", "right"),
    [
        ("Speed = 60 * 540 = 32400\n#### A", "A", True),
        ("x = 250 m. The answer is (D)", "D", True),
        ("Answer: e", "E", False),  # a lower-case letter is a word, not an option
        ("Correct answer - C", "C", True),
        ("We get 4 apples.\n#### B)", "B", True),
        ("A train goes fast. 12 km", "A", False),  # no answer statement: no guess from the first word
    ],
)
def test_grade_letters(solution: str, gold: str, right: bool) -> None:
    assert grade(solution, gold, "letter") is right


@given(st.integers(-(10**9), 10**9), st.booleans(), st.booleans())
def test_grade_any_integer_in_any_format(n: int, commas: bool, dollars: bool) -> None:
    body = f"{abs(n):,}" if commas else str(abs(n))
    shown = ("-" if n < 0 else "") + ("$" if dollars else "") + body
    assert grade(f"Some work.\n#### {shown}", str(n), "number")
    assert not grade(f"Some work.\n#### {shown}", str(n + 1), "number")


def _decimal(q: Fraction) -> str:
    """A terminating fraction's exact decimal digits, e.g. -13/8 -> "-1.625000"."""
    scaled = abs(q.numerator) * (10**6 // q.denominator)
    return f"{'-' if q < 0 else ''}{scaled // 10**6}.{scaled % 10**6:06d}"


@given(st.fractions(max_denominator=64))
def test_a_fraction_equals_its_decimal_when_it_has_one(q: Fraction) -> None:
    as_ratio = f"{q.numerator}/{q.denominator}"
    assert canonical(as_ratio, "number") == str(q)
    if 10**6 % q.denominator == 0:  # a terminating decimal, written out exactly
        assert grade(f"#### {_decimal(q)}", as_ratio, "number")


# --- problems --------------------------------------------------------------------------------------------------


def test_gsm8k_splits_and_solutions_grade_themselves() -> None:
    ps = load_problems("gsm8k")
    sizes = {k: len(v) for k, v in ps.splits.items()}
    assert sizes == {"train": 6726, "dev": 747, "test": 1319}
    assert sizes["train"] + sizes["dev"] == 7473
    train_ids = {p.id for p in ps.splits["train"]}
    assert not train_ids & {p.id for p in ps.splits["dev"]}
    assert [p.id for p in load_problems("gsm8k").splits["dev"]] == [p.id for p in ps.splits["dev"]]
    for p in ps.splits["train"] + ps.splits["test"]:
        assert p.rationale is not None and "<<" not in p.rationale
        assert grade(p.rationale, p.answer or "", "number"), p.id  # the grader reads the data's own solutions


def test_aqua_problems_share_ids_and_splits_with_the_multiple_choice_task() -> None:
    ps = load_problems("aqua_rat")
    mcq = load_task("aqua_rat")
    for split in ("train", "dev", "test"):
        assert [p.id for p in ps.splits[split]] == [ex.id for ex in mcq.splits[split]]
        for p, ex in zip(ps.splits[split], mcq.splits[split], strict=True):
            assert p.kind == "letter" and "ABCDE".index(p.answer or "?") == ex.answer
            assert grade(p.rationale or "", p.answer or "", "letter")


def test_arith_problems_are_correct_deterministic_and_parametrized() -> None:
    ps = load_problems("arith:steps=4,digits=3,n_train=50,n_dev=5,n_test=7")
    assert {k: len(v) for k, v in ps.splits.items()} == {"train": 50, "dev": 5, "test": 7}
    again = load_problems("arith:steps=4,digits=3,n_train=50,n_dev=5,n_test=7")
    assert [p.question for p in again.splits["train"]] == [p.question for p in ps.splits["train"]]
    other_seed = load_problems("arith:steps=4,digits=3,n_train=50,seed=1")
    assert [p.question for p in other_seed.splits["train"]] != [p.question for p in ps.splits["train"]]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in ps.splits["train"]:
        lines = (p.rationale or "").splitlines()
        assert len(lines) == 5
        value = int(re.search(r"Start with (\d+)", p.question).group(1))  # type: ignore[union-attr]
        for line in lines[:-1]:
            a, op, b, _, c = line.split()
            assert int(a) == value and int(c) == ops[op](int(a), int(b))
            value = int(c)
        assert p.answer == str(value) and lines[-1] == f"#### {value}"


@pytest.mark.parametrize("name", ["arith:steps=0", "arith:digits=12", "arith:depth=3", "arith:steps=x", "gsm8k:n=3"])
def test_bad_free_form_task_names_are_refused(name: str) -> None:
    with pytest.raises(DataError):
        load_problems(name)


def test_arith_defaults_and_the_multiple_choice_loader_refuses_free_form_tasks() -> None:
    assert parse_arith("arith")["steps"] == 3
    with pytest.raises(DataError, match="free-form"):
        load_task("gsm8k")


def test_problem_validates_its_gold_answer() -> None:
    with pytest.raises(DataError, match="not a number"):
        Problem("p1", "How many?", "many")


# --- rollouts (tiny random Llama: the sampling, caching and grading path, not the answers) ---------------------


def _tiny(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_answer_line_end() -> None:
    assert answer_line_end("work\n#### 72\nmore") == len("work\n#### 72\n")
    assert answer_line_end("work\n#### 72") is None  # the line is not finished yet
    assert answer_line_end("####\n") is None
    assert answer_line_end("#### Step 1: add\n") is None  # a Markdown heading goes on
    assert answer_line_end("so\n#### B\n") == len("so\n#### B\n")


def test_batched_sampling_with_a_shared_prompt_cache_matches_greedy_generate_alone(tiny_llama_dir: Path) -> None:
    """Near-zero temperature turns sampling into argmax: the batched, left-padded path with the prompt cache
    repeated K times must then give what `generate` gives each prompt alone (positions and masks are right)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # weights far from the usual tiny init, so that positions and masks change the argmax (with the default
    # 0.02 init, wrong position ids for the left-padded prompts went unnoticed)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_llama_dir, initializer_range=0.5)
    model, tok = AutoModelForCausalLM.from_config(config).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)
    problems = [Problem(f"p{i}", q, "1") for i, q in enumerate(["Start with 3.", "Add 12345 to 9 and then 7", "1"])]
    cfg = RolloutConfig(k=2, temperature=1e-6, top_p=1.0, max_new_tokens=12)
    prompts = encode_prompts(tok, problems, cfg.prompt)
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    batched = sample_solutions(model, tok, prompts, cfg, seed=0)
    for prompt, sols in zip(prompts, batched, strict=True):
        alone = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id
        )
        text = tok.decode(alone[0, len(prompt) :], skip_special_tokens=True)
        assert [s for s, _ in sols] == [text, text]


def test_rollouts_are_cached_graded_and_resume_identically(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tok = _tiny(tiny_llama_dir)
    problems = load_problems("arith:steps=1,digits=1,n_train=5").splits["train"]
    cfg = RolloutConfig(k=3, max_new_tokens=5, batch_size=2, temperature=1.0, top_p=1.0)
    out = tmp_path / "ro"
    first = run_rollouts(model, tok, problems, cfg, out, model_id="tiny", progress=False)
    assert first.ids == [p.id for p in problems]
    assert [len(r) for r in first.rollouts] == [3] * 5
    assert sorted(f.name for f in out.glob("shard-*")) == [
        "shard-00000.jsonl",
        "shard-00001.jsonl",
        "shard-00002.jsonl",
    ]
    for p, rs, rate in zip(problems, first.rollouts, first.pass_rates, strict=True):
        assert rate == sum(grade(r.text, p.answer or "", "number") for r in rs) / 3
        assert all(0 <= r.tokens <= 5 for r in rs)  # EOS is not counted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and sum(summary["pass_rate_histogram"]["counts"]) == 5

    (out / "shard-00001.jsonl").unlink()  # a killed run: the batch is sampled again, with the same seed
    with pytest.raises(ProbekdError, match="incomplete"):
        load_rollouts(out)
    resumed = run_rollouts(model, tok, problems, cfg, out, model_id="tiny", progress=False)
    assert [[r.text for r in rs] for rs in resumed.rollouts] == [[r.text for r in rs] for rs in first.rollouts]

    with pytest.raises(CacheMismatchError, match="sampling"):
        run_rollouts(model, tok, problems, cfg.model_copy(update={"k": 4}), out, model_id="tiny", progress=False)


def test_rollouts_refuse_unlabelled_problems(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tok = _tiny(tiny_llama_dir)
    with pytest.raises(ProbekdError, match="gold answer"):
        run_rollouts(model, tok, [Problem("u", "How many?", None)], RolloutConfig(), tmp_path, model_id="tiny")


def test_cli_rollouts_and_free_form_stats(tiny_llama_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["rollouts", "arith:steps=1,digits=1", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--limit", "3",
         "--k", "2", "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "3 problems x 2 rollouts: mean pass rate" in res.output
    assert (tmp_path / "rollouts" / "train" / "summary.json").is_file()
    bad = runner.invoke(app, ["rollouts", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(tmp_path),
                              "--split", "validation"])  # fmt: skip
    assert isinstance(bad.exception, ProbekdError) and "no split 'validation'" in str(bad.exception)  # `main`: exit 2
    stats = runner.invoke(app, ["data", "stats", "gsm8k", "--json"])
    assert json.loads(stats.output)["test"] == {"n": 1319, "labelled": 1319, "with_rationale": 1319}
    tasks = runner.invoke(app, ["data", "tasks"])
    assert re.search(r"gsm8k\s+free-form", tasks.output) and re.search(r"arc_easy\s+multiple-choice", tasks.output)


def test_python_api_rollouts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import probekd

    assert len(probekd.load_problems("arith:n_test=9").splits["test"]) == 9
    ro = probekd.rollouts("arith:steps=1", str(tiny_llama_dir), tmp_path, split="dev", limit=2, k=2, max_new_tokens=3)
    assert ro.pass_rates.shape == (2,) and (tmp_path / "rollouts" / "dev" / "manifest.json").is_file()


# --- token-level divergences -----------------------------------------------------------------------------------


def test_token_divergences_equal_a_hand_computation_on_a_three_token_vocabulary() -> None:
    import torch

    from probekd.generative.token_losses import token_divergence

    p, q = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]  # teacher, student
    teacher, student = torch.tensor([[math.log(x) for x in p]]), torch.tensor([[math.log(x) for x in q]])
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m, strict=True)
    )
    assert token_divergence(student, teacher, "fkl").item() == pytest.approx(fkl, rel=1e-5)
    assert token_divergence(student, teacher, "rkl").item() == pytest.approx(rkl, rel=1e-5)
    assert token_divergence(student, teacher, "js").item() == pytest.approx(jsd, rel=1e-5)
    # top-2 of the teacher: tokens 0 and 1, both renormalized: p = (5/8, 3/8), q = (1/2, 1/2)
    # AKL with head_mass 0.45: the head is token 0 (no mass above it); token 1 has 0.5 above it (a boundary at
    # exactly 0.5 would be decided by float rounding)
    g_head, g_tail = abs(0.5 - 0.2), abs(0.3 - 0.2) + abs(0.2 - 0.6)
    akl = g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl
    assert token_divergence(student, teacher, "akl", head_mass=0.45).item() == pytest.approx(akl, rel=1e-5)
    top2 = 5 / 8 * math.log((5 / 8) / 0.5) + 3 / 8 * math.log((3 / 8) / 0.5)
    assert token_divergence(student, teacher, "fkl", top_k=2).item() == pytest.approx(top2, rel=1e-5)


@given(st.integers(0, 2**31 - 1), st.floats(0.5, 4.0))
def test_token_fkl_agrees_with_the_multiple_choice_forward_kl(seed: int, temperature: float) -> None:
    import torch

    from probekd.generative.token_losses import token_divergence
    from probekd.losses import get

    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 7, generator=g) * 3, torch.randn(3, 7, generator=g) * 3
    ours = token_divergence(s, t, "fkl", temperature=temperature)
    reference = get("fkl")(s, torch.softmax(t / temperature, -1), temperature=temperature)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (token_divergence(s, t, "rkl") >= -1e-6).all() and (token_divergence(s, t, "js") <= math.log(2) + 1e-6).all()
    assert torch.allclose(token_divergence(t, t, "rkl"), torch.zeros(3), atol=1e-6)


def test_per_problem_is_the_mean_over_solution_tokens_only() -> None:
    import torch

    from probekd.generative.token_losses import per_problem

    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert per_problem(values, mask).tolist() == [1.5, 4.0]
    with pytest.raises(ValueError, match="no solution tokens"):
        per_problem(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))


# --- token-level distillation of sequences (tiny random Llamas sharing one tokenizer) ---------------------------


def _seq_rows(tok, weights=None, teacher_prefix: str = ""):
    from probekd.generative.seq_train import SequenceRows

    student_prompts = ["Question: Start with 3. Add 4.\nSolution:\n", "Question: 1 plus 1?\nSolution:\n"]
    solutions = ["3 + 4 = 7\n#### 7\n", "#### 2\n"]
    teacher_prompts = [teacher_prefix + p for p in student_prompts]
    return SequenceRows(tok, student_prompts, teacher_prompts, solutions, weights)


def _seq_trainer(model, teacher, rows, tmp_path: Path, **cfg):
    from transformers import TrainingArguments

    from probekd.generative.seq_train import SequenceDistillTrainer, SequenceTrainConfig

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    return SequenceDistillTrainer(model=model, args=args, train_dataset=rows, data_collator=rows.collate,
                                  teacher=teacher, train_cfg=SequenceTrainConfig(**cfg))  # fmt: skip


def test_sequence_rows_mark_exactly_the_positions_that_predict_solution_tokens(tiny_tokenizer) -> None:
    rows = _seq_rows(tiny_tokenizer, teacher_prefix="A worked solution: 3 + 4 = 7.\n")
    batch = rows.collate([rows[0], rows[1]])
    for side in ("", "teacher_"):
        ids, mask = batch[f"{side}input_ids"], batch[f"{side}loss_mask"].bool()
        for r, solution in enumerate(["3 + 4 = 7\n#### 7\n", "#### 2\n"]):
            predicted = ids[r][1:][mask[r][:-1]]  # the tokens that the marked positions predict
            assert tiny_tokenizer.decode(predicted) == solution
    assert batch["loss_mask"].sum(1).tolist() == batch["teacher_loss_mask"].sum(1).tolist()


def test_each_problem_loss_is_multiplied_by_its_weight(tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    """Weights (1, 0) over two problems give half the first problem's loss alone: the second takes no part, and the
    loss is divided by the problems in the step. Dropping the weight would give the mean of both."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(student.config)
    rows = _seq_rows(tiny_tokenizer, weights=[1.0, 0.0])
    trainer = _seq_trainer(student, teacher, rows, tmp_path)
    both = trainer.compute_loss(student, rows.collate([rows[0], rows[1]]))
    per = trainer.problem_losses(student, rows.collate([rows[0], rows[1]]))
    assert per[1] > 0 and both.item() == pytest.approx(per[0].item() / 2, rel=1e-5)
    alone = trainer.compute_loss(student, rows.collate([rows[0]]))
    assert alone.item() == pytest.approx(per[0].item(), rel=1e-5)


def test_lora_self_distillation_starts_at_zero_and_privileged_context_makes_it_positive(
    tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    """A LoRA student is its own frozen initial teacher with the adapters disabled: the same prompt on both sides
    gives divergence 0 before training (the adapters start at zero); the worked solution in the teacher's prompt
    gives a positive one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    student = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    same = _seq_rows(tiny_tokenizer)
    trainer = _seq_trainer(student, None, same, tmp_path, loss="rkl")
    assert trainer.problem_losses(student, same.collate(same.rows)).abs().max().item() < 1e-7
    privileged = _seq_rows(tiny_tokenizer, teacher_prefix="Worked solution: 3 + 4 = 7. ")
    assert (trainer.problem_losses(student, privileged.collate(privileged.rows)) > 1e-5).all()  # a tiny model's scale


def test_distilling_sequences_moves_the_student_toward_the_teacher(
    tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from probekd.generative.seq_train import SequenceTrainConfig, distill_sequences

    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(3)
    teacher = AutoModelForCausalLM.from_config(
        student.config.__class__(**{**student.config.to_dict(), "initializer_range": 0.3})
    )
    rows = _seq_rows(tiny_tokenizer)
    cfg = SequenceTrainConfig(loss="fkl>rkl", epochs=30, learning_rate=1e-2, batch_size=2, warmup_ratio=0.0)
    before = _seq_trainer(student, teacher, rows, tmp_path / "a").problem_losses(student, rows.collate(rows.rows))
    history = distill_sequences(student, teacher, rows, cfg, tmp_path / "ckpt", seed=0, save_strategy="no")
    after = _seq_trainer(student, teacher, rows, tmp_path / "b").problem_losses(student, rows.collate(rows.rows))
    assert (after < 0.5 * before).all(), (before, after)
    assert any("loss" in h for h in history)


def test_token_distillation_refuses_tokenizers_that_differ(tiny_tokenizer) -> None:
    from tests.conftest import build_bert_tokenizer

    from probekd.generative.seq_train import check_shared_vocabulary

    with pytest.raises(ProbekdError, match="teacher big-model and student small-model have different tokenizers"):
        check_shared_vocabulary(tiny_tokenizer, build_bert_tokenizer(), "small-model", "big-model")
    check_shared_vocabulary(tiny_tokenizer, tiny_tokenizer, "a", "b")


# --- a generative run end to end (tiny random Llama as teacher and LoRA student; fixed initial rollouts) ---------


def _write_fixed_rollouts(folder: Path, problems, cfg: RolloutConfig, model_id: str, hits: list[int]) -> None:
    """A finished rollout cache whose problem i has hits[i] of K rollouts correct (what a killed run left)."""
    from probekd.atomic import write_json
    from probekd.generative.rollouts import _manifest

    manifest = _manifest(problems, cfg, model_id)
    folder.mkdir(parents=True)
    write_json(folder / "manifest.json", manifest)
    for i in range(manifest["n_shards"]):
        lines = []
        for j in range(i * cfg.batch_size, min((i + 1) * cfg.batch_size, len(problems))):
            p = problems[j]
            right = [r < hits[j] for r in range(cfg.k)]
            rs = [{"text": f"#### {p.answer if ok else 'none'}\n", "tokens": 3, "answer": p.answer if ok else None,
                   "correct": ok} for ok in right]  # fmt: skip
            lines.append(json.dumps({"id": p.id, "rollouts": rs}))
        (folder / f"shard-{i:05d}.jsonl").write_text("\n".join(lines) + "\n")


def _tiny_generative_run(tiny_llama_dir: Path, tmp_path: Path, train: dict, generate: dict, weightings: list[str]):
    """A tiny generative run's configuration tree, validated configuration and folder, with the initial student's
    rollouts already there (fixed: problem i has hits[i] of 2 right, pass rates 1, .5, 0, .5, .5, 0)."""
    from probekd.generative.pipeline import GenerativeRunConfig

    tree = {
        "name": "tiny generative run",
        "task": "arith:steps=1,digits=1,n_train=6,n_dev=3,n_test=4",
        "teacher": str(tiny_llama_dir),
        "student": {"model": str(tiny_llama_dir), "kind": "causal", "lora": True, "lora_r": 4},
        "train": {"batch_size": 2, "learning_rate": 1e-3, **train},
        "generate": {"source": "gold", "rollouts": {"k": 2, "max_new_tokens": 4, "batch_size": 4},
                     "eval_max_new_tokens": 4, **generate},
        "grid": {"seeds": [0], "losses": ["fkl"], "weightings": weightings},
    }  # fmt: skip
    cfg = GenerativeRunConfig.model_validate(tree)
    run = tmp_path / "run"
    problems = load_problems(cfg.task).splits["train"]
    _write_fixed_rollouts(run / "rollouts" / "s0" / "train", problems, cfg.generate.rollouts,
                          f"{tiny_llama_dir} (initial)", hits=[2, 1, 0, 1, 1, 0])  # fmt: skip
    return tree, cfg, run


def test_generative_run_end_to_end_weights_by_pass_rate_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import yaml

    from probekd.generative.pipeline import GenerativeRunConfig, run_generative

    tree, cfg, run = _tiny_generative_run(
        tiny_llama_dir, tmp_path, {"epochs": 1}, {"forgetting": {"limit": 12}}, ["none", "paced"]
    )
    results = {r["weighting"]: r for r in run_generative(cfg, run)}
    # pass rates (1, .5, 0, .5, .5, 0): PACED keeps the three problems with 0 < p < 1, the unweighted cell all six
    assert results["paced"]["trained_problems"] == 3 and results["none"]["trained_problems"] == 6
    assert results["none"]["pass_rates"]["mean"] == pytest.approx(5 / 12)
    for r in results.values():
        assert r["test"]["n"] == 4 and 0 <= r["test"]["pass_at_1"] <= 1 and len(r["test"]["correct"]) == 4
        before, after = r["forgetting"]["before"], r["forgetting"]["after"]  # ARC-Easy test[:12], option scores
        assert before["n"] == after["n"] == 12 and 0 <= after["accuracy"] <= 1 and before["task"] == "arc_easy"
        model = run / "students" / r["cell"] / "model"
        assert (model / "config.json").is_file() and not (model / "adapter_config.json").exists()  # LoRA merged
    report = (run / "report" / "report.md").read_text()
    assert "gold-fkl-paced-s0" in report and "Mean over seeds" in report and "arc_easy test[:12]" in report

    # a rerun (here through the CLI) trains nothing again and rewrites the same report
    stamp = (run / "students" / "gold-fkl-paced-s0" / "metrics.json").stat().st_mtime_ns
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(tree))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "gen.yaml"), "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert "gold-fkl-paced-s0" in res.output
    assert (run / "students" / "gold-fkl-paced-s0" / "metrics.json").stat().st_mtime_ns == stamp

    # a changed setting in the same folder is refused by name
    tree["generate"]["source"] = "self"
    with pytest.raises(ProbekdError, match="generate"):
        run_generative(GenerativeRunConfig.model_validate(tree), run)


def test_generative_config_errors_name_the_field(tiny_llama_dir: Path) -> None:
    from pydantic import ValidationError

    from probekd.generative.pipeline import GenerativeRunConfig

    with pytest.raises(ValidationError, match="free-form"):
        GenerativeRunConfig(task="arc_easy")
    with pytest.raises(ValidationError, match="lora"):
        GenerativeRunConfig.model_validate(
            {"student": {"kind": "causal", "lora": False}, "generate": {"source": "self"}}
        )
    with pytest.raises(ValidationError, match="token divergence"):
        GenerativeRunConfig.model_validate({"grid": {"losses": ["sinkhorn"]}})


def test_alpha_zero_is_cross_entropy_on_the_solution_without_a_teacher(
    tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = _seq_rows(tiny_tokenizer)
    trainer = _seq_trainer(student, None, rows, tmp_path, alpha=0.0)  # no teacher, no LoRA: allowed at alpha 0
    batch = rows.collate(rows.rows)
    per = trainer.problem_losses(student, batch)
    logp = torch.log_softmax(student(input_ids=batch["input_ids"]).logits.float(), -1)
    for r in range(2):
        pos = batch["loss_mask"][r].nonzero()[:, 0]
        expected = -logp[r, pos, batch["input_ids"][r, pos + 1]].mean()
        assert per[r].item() == pytest.approx(expected.item(), rel=1e-4)


def test_sequence_gradient_accumulation_1x2_equals_batch_2(
    tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    """One plain SGD step (lr 1) is the same with one batch of 2 problems and with 2 micro-batches of 1 (the loss
    is divided by the problems of the whole step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from probekd.generative.seq_train import SequenceTrainConfig, distill_sequences

    torch.manual_seed(2)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    teacher = AutoModelForCausalLM.from_config(teacher.config)
    deltas = []
    for ga in (1, 2):
        student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        start = [p.detach().clone() for p in student.parameters()]
        cfg = SequenceTrainConfig(batch_size=2, grad_accum=ga, learning_rate=1.0, warmup_ratio=0.0, weight_decay=0.0)
        distill_sequences(student, teacher, _seq_rows(tiny_tokenizer, weights=[1.5, 0.5]), cfg, tmp_path / f"ga{ga}",
                          max_steps=1, max_grad_norm=0.0, save_strategy="no", optim="sgd",
                          lr_scheduler_type="constant")  # fmt: skip
        deltas.append([p.detach() - s for p, s in zip(student.parameters(), start, strict=True)])
    assert sum(float(d.abs().sum()) for d in deltas[0]) > 0
    for a, b in zip(*deltas, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_teacher_whose_output_layer_is_padded_beyond_the_tokenizer_is_fine(
    tiny_llama_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    """Models of one family share a tokenizer but may pad their output layers to different sizes (Qwen2.5: 151936
    and 152064 rows): the divergence is taken over the tokenizer's entries."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(4)
    bigger = student.config.__class__(**{**student.config.to_dict(), "vocab_size": student.config.vocab_size + 8})
    padded = AutoModelForCausalLM.from_config(bigger)
    rows = _seq_rows(tiny_tokenizer)
    per = _seq_trainer(student, padded, rows, tmp_path).problem_losses(student, rows.collate(rows.rows))
    assert torch.isfinite(per).all() and (per > 0).all()


def test_refreshed_pass_rates_come_from_new_rollouts_and_survive_all_zero(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """With `refresh_epochs: 1` every problem takes part (a first weight of 0 may change), the weights are
    recomputed after each epoch from the student's new rollouts (cached per step), and a refresh whose weights
    would all be 0 (the tiny random student solves nothing) keeps the previous ones."""
    from probekd.generative.pipeline import run_generative

    _, cfg, run = _tiny_generative_run(
        tiny_llama_dir, tmp_path, {"epochs": 2, "weighting": {"refresh_epochs": 1}}, {"forgetting": None}, ["paced"]
    )
    (metrics,) = run_generative(cfg, run)
    assert metrics["trained_problems"] == 6
    steps = [st["step"] for st in metrics["weighting_stats"]]
    assert steps == [0, 3]  # at the start (the initial rollouts) and after epoch 1; not after the last step
    assert metrics["weighting_stats"][0]["zero_share"] == pytest.approx(0.5)
    assert metrics["weighting_stats"][1]["zero_share"] == pytest.approx(0.5)  # all-zero refresh: previous weights
    assert (run / "students" / metrics["cell"] / "rollouts" / "step-3" / "summary.json").is_file()


def test_a_replaced_solution_is_the_row_built_with_it(tiny_tokenizer) -> None:
    from probekd.generative.seq_train import SequenceRows

    rows = _seq_rows(tiny_tokenizer, teacher_prefix="Worked: 7.\n")
    rows.replace_solution(1, "1 + 1 = 2\n#### 2\n")
    fresh = SequenceRows(tiny_tokenizer, ["Question: 1 plus 1?\nSolution:\n"],
                         ["Worked: 7.\nQuestion: 1 plus 1?\nSolution:\n"], ["1 + 1 = 2\n#### 2\n"])  # fmt: skip
    assert rows[1] == fresh[0]
    assert rows[0] == _seq_rows(tiny_tokenizer, teacher_prefix="Worked: 7.\n")[0]  # the other row is untouched
    with pytest.raises(ProbekdError, match="row 0: the solution is empty"):
        rows.replace_solution(0, "")


def test_a_resumed_on_policy_run_puts_the_last_refresh_solutions_back(tiny_tokenizer, tmp_path: Path) -> None:
    """On resume the weights come from the checkpoint; with `replay_on_resume` every refresh's rollouts (read from
    their cache) are put back into the rows in order, as an uninterrupted run left them."""
    from types import SimpleNamespace

    import numpy as np

    from probekd.atomic import write_json
    from probekd.generative.pass_rate_weights import RolloutPassRateWeights
    from probekd.student.callbacks import WEIGHTS_FILE
    from probekd.weighting import WeightingConfig

    rows = _seq_rows(tiny_tokenizer)
    asked: list[int] = []

    def pass_rates(model: object, step: int) -> np.ndarray:
        asked.append(step)
        rows.replace_solution(0, f"#### {step}\n")
        return np.array([0.5, 0.5])

    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    stats = [{"step": s, "mean_pass_rate": 0.5} for s in (0, 3, 6)]
    write_json(checkpoint / WEIGHTS_FILE, {"weights": [1.5, 0.5], "stats": stats})
    model = SimpleNamespace(training=True, train=lambda mode=True: None, eval=lambda: None)
    for replay, expected in ((False, []), (True, [3, 6])):
        asked.clear()
        cb = RolloutPassRateWeights(rows.rows, pass_rates, WeightingConfig(scheme="paced", refresh_epochs=1), 3, 0,
                                    replay_on_resume=replay)  # fmt: skip
        cb.resume_from = str(checkpoint)
        cb.on_train_begin(None, SimpleNamespace(global_step=7), None, model=model)
        assert asked == expected
        assert [r["weights"] for r in rows.rows] == [1.5, 0.5]  # the checkpoint's weights, not recomputed ones
    assert tiny_tokenizer.decode(rows[0]["input_ids"]).endswith("#### 6\n")  # the last refresh's, applied last


def test_on_policy_run_trains_on_own_rollouts_and_histograms_pass_rates(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`source: on_policy`: the initial student's rollouts are the solutions (all six problems have one), refreshed
    after epoch 1; the pass-rate histogram before training is the fixed rollouts' (2, 1, 0, 1, 1, 0 of 2 right)."""
    from pydantic import ValidationError

    from probekd.generative.pipeline import GenerativeRunConfig, run_generative
    from probekd.generative.seq_train import SequenceRows
    from probekd.report.plots import plots_available

    tree, cfg, run = _tiny_generative_run(
        tiny_llama_dir, tmp_path, {"epochs": 2, "weighting": {"refresh_epochs": 1}},
        {"source": "on_policy", "forgetting": None}, ["none"],
    )  # fmt: skip
    replaced: list[tuple[int, str]] = []
    original = SequenceRows.replace_solution

    def spy(self: SequenceRows, i: int, solution: str) -> None:
        replaced.append((i, solution))
        original(self, i, solution)

    monkeypatch.setattr(SequenceRows, "replace_solution", spy)
    (metrics,) = run_generative(cfg, run)
    assert metrics["cell"] == "on_policy-fkl-none-s0" and metrics["trained_problems"] == 6
    assert [st["step"] for st in metrics["weighting_stats"]] == [0, 3]
    assert metrics["weighting_stats"][0]["ess_share"] == pytest.approx(1.0)  # unweighted: all weights 1
    folder = run / "students" / metrics["cell"]
    assert (folder / "rollouts" / "step-3" / "summary.json").is_file()
    # the first 6 calls build the rows from the initial rollouts; then each non-empty first rollout of the refresh
    # at step 3 replaces its own problem's solution
    assert [i for i, _ in replaced[:6]] == list(range(6))
    refreshed = load_rollouts(folder / "rollouts" / "step-3")
    expected = [(j, rs[0].text) for j, rs in enumerate(refreshed.rollouts) if rs[0].text.strip()]
    assert replaced[6:] == expected
    hist = metrics["pass_rate_histogram"]
    assert hist["problems"] == 6 and hist["k"] == 2 and hist["before"] == [2, 3, 1] and sum(hist["after"]) == 6
    report = (run / "report" / "report.md").read_text()
    assert re.search(r"\| fkl, none \| 2 3 1 \| \d+ \d+ \d+ \| 0\.417 -> \d\.\d{3} \|", report)
    if plots_available():
        assert (run / "report" / "pass_rates.png").stat().st_size > 0 and "pass_rates.png" in report
    with pytest.raises(ValidationError, match="alpha > 0"):
        GenerativeRunConfig.model_validate({**tree, "train": {"alpha": 0.0}})


def test_unweighted_losses_and_comparison_verdicts_by_hand() -> None:
    """`grid.unweighted_losses` keeps a baseline loss out of the weighted cells; the report compares each weighting
    with the unweighted student of its loss and each loss with the first one, with the verdict rule."""
    from pydantic import ValidationError

    from probekd.generative.pipeline import GenerativeRunConfig, comparison_lines

    grid = {"seeds": [0, 1], "losses": ["fkl", "akl"], "weightings": ["none", "paced", "hard_filter"]}
    cfg = GenerativeRunConfig.model_validate({"grid": {**grid, "unweighted_losses": ["akl"]}})
    assert [c for c in cfg.cells() if c[0] == 0] == [(0, "fkl", "none"), (0, "fkl", "paced"),
                                                     (0, "fkl", "hard_filter"), (0, "akl", "none")]  # fmt: skip
    with pytest.raises(ValidationError, match=r"unweighted_losses \['js'\] are not in grid.losses"):
        GenerativeRunConfig.model_validate({"grid": {"losses": ["fkl"], "unweighted_losses": ["js"]}})

    def cell(loss: str, w: str, seed: int, correct: list[int]) -> dict:
        return {"loss": loss, "weighting": w, "seed": seed,
                "test": {"pass_at_1": sum(correct) / len(correct), "correct": correct}}  # fmt: skip

    right, wrong, half = [1] * 10, [0] * 10, [1, 0] * 5
    results = [cell("fkl", "none", s, half) for s in (0, 1)]
    results += [cell("fkl", "paced", s, right) for s in (0, 1)]  # always right: wins
    results += [cell("fkl", "hard_filter", 0, right), cell("fkl", "hard_filter", 1, wrong)]  # seeds disagree: tie
    results += [cell("akl", "none", s, wrong) for s in (0, 1)]  # always wrong: loses
    lines = {line.split(" | ")[0]: line for line in comparison_lines(cfg, results) if line.startswith("| ")}
    # paced: +0.5 in both seeds; per problem +1 or 0 (the unweighted student gets every other one right)
    paced = r"\| fkl, none \| \+0\.500 ± 0\.000 \| \[\+0\.\d+, \+0\.\d+\] \| 2 \| wins \|$"
    assert re.search(paced, lines["| fkl, paced"])
    assert "| 2 | ties (an interval includes 0) |" in lines["| fkl, hard_filter"]
    assert re.search(r"\| -0\.500 ± 0\.000 \| \[-0\.\d+, -0\.\d+\] \| 2 \| loses \|$", lines["| akl, none"])


def test_a_generative_run_folder_from_before_a_new_field_resumes(tmp_path: Path) -> None:
    """A recorded config.yaml that lacks a field added since (its default holds) is no difference; a changed
    setting is refused naming the field."""
    import yaml

    from probekd.generative.pipeline import GenerativeRunConfig, _check_run_dir

    cfg = GenerativeRunConfig()
    old = cfg.model_dump(mode="json")
    del old["generate"]["histogram_problems"]  # as written before the field existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    _check_run_dir(tmp_path, cfg)
    other = GenerativeRunConfig.model_validate({"generate": {"rollouts": {"k": 4}}})
    with pytest.raises(ProbekdError, match=r"differs in: generate\.rollouts"):
        _check_run_dir(tmp_path, other)
