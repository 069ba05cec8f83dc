"""Students on tiny random models: both kinds learn a learnable task through the Trainer adapter; gradient
accumulation 2 x 4 equals batch 8; a tokenizer without single-token letters is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probekd.data.examples import MCQExample, answers_array, option_mask
from probekd.errors import ProbekdError
from probekd.student.heads import StudentConfig, build_student
from probekd.student.train import Rows, make_trainer, predict, train_student
from probekd.student.train_config import TrainConfig

WORDS = ["fish", "frog", "ant", "water", "plants", "sun", "energy", "heat", "light"]


def mammal_task(n: int, k: int = 4, seed: int = 0, position: int | None = None) -> list[MCQExample]:
    """'Which is a mammal?': the answer is always 'dog', at a random position (or always at `position`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        opts = rng.sample(WORDS, k - 1)
        a = rng.randrange(k) if position is None else position
        opts.insert(a, "dog")
        out.append(MCQExample(f"q{i}", "Which is a mammal?", tuple(opts), a))
    return out


def rows_for(student, exs: list[MCQExample], k: int, soft: bool = True) -> Rows:
    m, y = option_mask(exs, k), answers_array(exs)
    targets = np.where(m, 0.1, 0.0) + np.eye(k)[y] * 0.6 if soft else None
    if targets is not None:
        targets = targets / targets.sum(1, keepdims=True)
    return Rows([student.encode(e) for e in exs], m, y, targets)


@pytest.mark.parametrize(
    ("kind", "formulation", "head"),
    [("encoder", "letter", "cross"), ("encoder", "letter", "biencoder"), ("causal", "letter", "cross"),
     ("causal", "option", "cross")],
)  # fmt: skip
def test_student_learns_and_loss_goes_down(
    kind: str, formulation: str, head: str, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    folder = tiny_bert_dir if kind == "encoder" else tiny_llama_dir
    cfg_s = StudentConfig(model=str(folder), kind=kind, formulation=formulation, prompt="base", head=head)
    student = build_student(cfg_s, k=4, seed=0)
    # a tiny random causal LM cannot learn to map a word's position to its letter in a few steps: for it the
    # answer sits at one position, which it must learn from the targets
    position = 1 if (kind, formulation) == ("causal", "letter") else None
    train, dev = mammal_task(48, position=position), mammal_task(16, seed=1, position=position)
    cfg = TrainConfig(epochs=6, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0)
    history = train_student(student, rows_for(student, train, 4), rows_for(student, dev, 4), cfg, tmp_path / "ck", 0)
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    probs = predict(student, rows_for(student, dev, 4))
    assert probs.shape == (16, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == answers_array(dev)).mean() >= 0.75
    assert not (tmp_path / "ck").exists()  # checkpoints are removed once the best model is loaded


def _full_sequence_scores(student, ex: MCQExample) -> torch.Tensor:
    """The reference: each (prefix + option) sequence run alone through the whole LM, its full logits, the mean
    log-probability of the option's tokens."""
    prefix, conts = student.template.option_texts(ex, student.tokenizer)
    p = student.tokenizer(prefix)["input_ids"]
    out = []
    for cont in conts:
        c = student.tokenizer(cont, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(student.model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        out.append(torch.stack([logp[len(p) + n - 1, c[n]] for n in range(len(c))]).mean())
    return torch.stack(out)


def test_causal_option_scores_are_length_normalized_log_likelihoods(tiny_llama_dir: Path) -> None:
    """Batched, padded and gathered scores equal the mean log-probability of each option's tokens computed from
    the full logits of each sequence run alone."""
    cfg = StudentConfig(model=str(tiny_llama_dir), kind="causal", formulation="option", prompt="base", max_length=64)
    student = build_student(cfg, k=5)
    exs = [
        MCQExample("a", "Which is a mammal?", ("dog", "a small green frog", "ant"), 0),
        MCQExample("b", "What gives plants energy?", ("sun", "water", "heat", "light of the moon", "soil"), 3),
    ]
    rows = rows_for(student, exs, 5, soft=False)
    batch = student.collate([rows[i] for i in range(2)])
    with torch.no_grad():
        got = student.logits({k: v for k, v in batch.items() if k not in ("targets", "weights", "labels")})
        for i, ex in enumerate(exs):
            assert torch.allclose(got[i, : ex.k], _full_sequence_scores(student, ex), atol=1e-4), i
    assert torch.isinf(got[0, 3:]).all() and torch.isfinite(got[1]).all()


def test_causal_option_gradients_flow_through_the_shared_prefix(tiny_llama_dir: Path) -> None:
    """Training runs the prefix once and its cache for every option: the gradients of every weight equal those of
    the K full sequences run alone (the prefix's share reaches it through the cache)."""
    cfg = StudentConfig(model=str(tiny_llama_dir), kind="causal", formulation="option", prompt="base")
    student = build_student(cfg, k=5)
    student.model.train()
    exs = [
        MCQExample("a", "Which is a mammal that lives in the sea?", ("dog", "a small green frog", "whale"), 2),
        MCQExample("b", "What gives plants energy?", ("sun", "water", "heat", "light of the moon", "soil"), 3),
    ]
    rows = rows_for(student, exs, 5, soft=False)
    batch = student.collate([rows[0], rows[1]])
    weights = torch.tensor([[1.0, -2.0, 0.5, 0, 0], [0.3, 1.0, -1.0, 2.0, 0.7]])  # a loss that uses every option
    params = [q for q in student.model.parameters() if q.requires_grad]
    scores = student.logits({k: v for k, v in batch.items() if k not in ("targets", "weights", "labels")})
    got = torch.autograd.grad((scores[:, :5].nan_to_num(neginf=0.0) * weights).sum(), params)
    want_scores = [_full_sequence_scores(student, ex) for ex in exs]
    want = torch.autograd.grad(sum((w[: len(s)] * s).sum() for w, s in zip(weights, want_scores, strict=True)), params)
    assert torch.allclose(scores[0, :3], want_scores[0], atol=1e-5) and torch.allclose(scores[1], want_scores[1])
    for q, g, w in zip(params, got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4), [n for n, x in student.model.named_parameters() if x is q]


def test_causal_option_prefix_loses_its_start_to_fit_max_length(tiny_llama_dir: Path) -> None:
    cfg = StudentConfig(model=str(tiny_llama_dir), kind="causal", formulation="option", prompt="base", max_length=12)
    student = build_student(cfg, k=4)
    ex = MCQExample("a", "Which of these animals is a mammal that lives in the cold sea?", ("a dog", "whale"), 1)
    enc = student.encode(ex)
    prefix, _ = student.template.option_texts(ex, student.tokenizer)
    full = student.tokenizer(prefix)["input_ids"]
    longest = max(len(c) for c in enc["option_ids"])
    assert len(enc["input_ids"]) + longest == 12 and enc["input_ids"] == full[-(12 - longest) :]
    assert enc["option_ids"][2:] == [[], []]  # K = 4: two missing options, no tokens


@pytest.mark.parametrize("lora", [False, True])
def test_tied_embeddings_student_keeps_its_best_dev_epoch(
    lora: bool, tiny_tied_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SmolLM2, Gemma and Qwen tie the output layer to the embeddings: the checkpoint stores the tensor once, and
    reloading the best dev epoch at the end must neither fail nor untie them, and leaves the best epoch's model."""
    cfg_s = StudentConfig(model=str(tiny_tied_llama_dir), kind="causal", formulation="option", prompt="base", lora=lora)
    student = build_student(cfg_s, k=4, seed=0)
    train, dev = mammal_task(16), mammal_task(12, seed=1)
    cfg = TrainConfig(epochs=3, learning_rate=3e-3, batch_size=8, warmup_ratio=0.0)
    with caplog.at_level("WARNING"):
        history = train_student(
            student, rows_for(student, train, 4), rows_for(student, dev, 4), cfg,
            tmp_path / "ck", 0,
        )  # fmt: skip
    assert not [r for r in caplog.records if "checkpoint" in r.getMessage()]
    base = student.model.get_base_model() if lora else student.model
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    by_epoch = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
    probs = predict(student, rows_for(student, dev, 4))
    assert len(by_epoch) == 3 and (probs.argmax(1) == answers_array(dev)).mean() == pytest.approx(max(by_epoch))


def test_missing_options_are_masked(tiny_bert_dir: Path) -> None:
    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=5)
    exs = mammal_task(3, k=3)
    probs = predict(student, rows_for(student, exs, 5, soft=False))
    assert probs.shape == (3, 5) and (probs[:, 3:] == 0).all()


def test_predictions_come_back_in_row_order(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Batches run longest first; the probabilities are those of each row alone, in the rows' order, and the
    Trainer's evaluation (same order trick) reports the accuracy of those predictions."""
    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4)
    rng = random.Random(3)
    exs = [
        MCQExample(f"q{i}", " ".join(rng.choices(WORDS, k=rng.randrange(1, 12))), tuple(rng.sample(WORDS, 4)), i % 4)
        for i in range(13)
    ]
    rows = rows_for(student, exs, 4, soft=False)
    assert rows.longest_first() != list(range(13))  # the lengths differ: the order is not the identity
    alone = np.concatenate([predict(student, Rows(*_one(student, e))) for e in exs])
    batched = predict(student, rows, batch_size=5)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    trainer = make_trainer(student, rows, rows, TrainConfig(eval_batch_size=5), tmp_path, 0)
    want = float((alone.argmax(1) == answers_array(exs)).mean())
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(want)


def _one(student, ex: MCQExample) -> tuple[list[dict], np.ndarray, np.ndarray]:
    return [student.encode(ex)], option_mask([ex], 4), answers_array([ex])


def _one_sgd_step(student, rows: Rows, grad_accum: int, tmp_path: Path) -> list[torch.Tensor]:
    start = [p.detach().clone() for p in student.model.parameters()]
    cfg = TrainConfig(batch_size=8, grad_accum=grad_accum, learning_rate=1.0, warmup_ratio=0.0, weight_decay=0.0)
    trainer = make_trainer(
        student, rows, None, cfg, tmp_path / f"ga{grad_accum}", 0,
        max_steps=1, max_grad_norm=0.0, save_strategy="no", optim="sgd", lr_scheduler_type="constant",
    )  # fmt: skip
    trainer.train()
    return [
        p.detach().cpu() - s for p, s in zip(student.model.parameters(), start, strict=True)
    ]  # Trainer may move it to a GPU


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_gradient_accumulation_2x4_equals_batch_8(
    kind: str, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """One plain SGD step (lr 1) moves the weights by minus the gradient: the same with 2 micro-batches of 4. The
    causal student matters: `Trainer`'s own count of a causal LM's labels skips one row per micro-batch."""
    exs = mammal_task(8)
    exs = [*exs[:3], MCQExample("short", "Which is a mammal?", ("dog", "ant", "sun"), 0), *exs[4:]]  # K = 3 and 4
    deltas = []
    for ga in (1, 2):
        cfg = (
            StudentConfig(model=str(tiny_bert_dir))
            if kind == "encoder"
            else StudentConfig(
                model=str(tiny_llama_dir), kind="causal", formulation="option", prompt="base", max_length=64
            )
        )
        student = build_student(cfg, k=4, seed=0)
        rows = rows_for(student, exs, 4)
        rows.rows[5]["labels"] = -1  # an unlabelled row: soft target only
        rows.rows[5]["weights"] = 0.5
        deltas.append(_one_sgd_step(student, rows, ga, tmp_path / kind))
    moved = sum(float(d.abs().sum()) for d in deltas[0])
    assert moved > 0
    for a, b in zip(*deltas, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_letters_must_be_single_tokens(tiny_bert_dir: Path) -> None:
    # the WordPiece vocabulary lacks most letters: a causal student with it cannot score " B", " C", ...
    with pytest.raises(ProbekdError, match=r"student .*"):
        build_student(StudentConfig(model=str(tiny_bert_dir), kind="causal", prompt="base"), k=4)


def _batch(student, rows: Rows) -> dict[str, torch.Tensor]:
    return student.collate([rows[i] for i in range(len(rows))])


def test_loss_options_reach_the_loss(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`train.loss_options` are passed to the loss: the trainer's loss equals the hand-assembled one with that
    option, and another value of the option gives another loss."""
    from probekd.losses import jensen_shannon
    from probekd.losses.common import masked_log_softmax

    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    rows = rows_for(student, mammal_task(8), 4)
    got = {}
    for beta in (0.1, 0.9):
        cfg = TrainConfig(loss="js", loss_options={"beta": beta}, alpha=0.7, temperature=2.0)
        trainer = make_trainer(student, rows, None, cfg, tmp_path / f"b{beta}", 0)
        batch = _batch(student, rows)
        with torch.no_grad():
            got[beta] = float(trainer.compute_loss(student.model, dict(batch)))
            logits = student.logits({k: v for k, v in batch.items() if k not in ("targets", "weights", "labels")})
            m = batch["option_mask"]
            kd = jensen_shannon(logits, batch["targets"], m, temperature=2.0, beta=beta) * 4.0
            ce = -masked_log_softmax(logits, m, 1.0).gather(1, batch["labels"][:, None])[:, 0]
        assert got[beta] == pytest.approx(float((0.7 * kd + 0.3 * ce).mean()), rel=1e-5)
    assert abs(got[0.1] - got[0.9]) > 1e-4


def test_loss_options_are_checked_against_the_loss() -> None:
    from pydantic import ValidationError

    from probekd.config import load_config
    from probekd.errors import ConfigError

    with pytest.raises(ValidationError, match=r"\['beta'\] are not options of loss 'fkl'"):
        TrainConfig(loss="fkl", loss_options={"beta": 0.5})
    with pytest.raises(ValidationError, match="not options of loss 'rkl'"):
        TrainConfig(loss="js>rkl", loss_options={"beta": 0.5})  # both stages must take it
    assert TrainConfig(loss="akl", loss_options={"head_mass": 0.7, "eps": 1e-3}).loss_options["head_mass"] == 0.7
    with pytest.raises(ConfigError, match=r"grid.losses.*'fkl'"):
        load_config(None, ["train.loss=js", "train.loss_options={beta: 0.3}", "grid.losses=[js, fkl]"])


def test_trainer_logs_go_to_a_file_and_tensorboard(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The per-step dictionaries go to RUN/logs/<cell>.jsonl, not to the terminal; with `report_to: [tensorboard]`
    an event file is written beside it."""
    pytest.importorskip("tensorboard")
    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    rows = rows_for(student, mammal_task(16), 4)
    cfg = TrainConfig(epochs=2, batch_size=8, report_to=["tensorboard"])
    log_file = tmp_path / "logs" / "cell.jsonl"
    train_student(student, rows, rows, cfg, tmp_path / "ck", 0, log_file=log_file, description="cell")
    entries = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert any("loss" in e for e in entries) and [e["step"] for e in entries if "eval_accuracy" in e] == [2, 4]
    assert list((tmp_path / "logs" / "cell").rglob("events.out.tfevents.*"))
    assert "'loss'" not in capsys.readouterr().out


def test_an_uninstalled_tracker_is_named(tiny_bert_dir: Path, tmp_path: Path) -> None:
    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    rows = rows_for(student, mammal_task(8), 4)
    with pytest.raises(ProbekdError, match=r"train.report_to names \['no_such_tracker'\]"):
        make_trainer(student, rows, None, TrainConfig(report_to=["no_such_tracker"]), tmp_path, 0)


def test_tied_head_notice_drops_only_the_tied_output_layer(tiny_tied_llama_dir: Path, tiny_llama_dir: Path) -> None:
    import logging

    from probekd.student.train import TiedHeadNotice

    def record(missing: list[str]) -> logging.LogRecord:
        msg = f"There were missing keys in the checkpoint model loaded: {missing}."
        return logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, msg, None, None)

    tied = TiedHeadNotice(build_student(StudentConfig(model=str(tiny_tied_llama_dir), kind="causal"), k=4).model)
    untied = TiedHeadNotice(build_student(StudentConfig(model=str(tiny_llama_dir), kind="causal"), k=4).model)
    assert not tied.filter(record(["lm_head.weight"]))  # the same tensor as the embeddings: nothing is missing
    assert tied.filter(record(["lm_head.weight", "model.norm.weight"]))  # a real loss is still reported
    assert untied.filter(record(["lm_head.weight"]))
    other = logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, "something else", None, None)
    assert tied.filter(other)


def test_biencoder_scores_are_scaled_cosines_of_mean_pooled_texts(tiny_bert_dir: Path) -> None:
    """Batched and padded bi-encoder logits equal s * cos(mean of the question's token states, mean of the option's),
    each text run alone through the encoder; missing options are -inf; the scale is a trainable parameter."""
    from probekd.student.heads import LOGIT_SCALE

    student = build_student(StudentConfig(model=str(tiny_bert_dir), head="biencoder"), k=5)
    exs = [
        MCQExample("a", "Which is a mammal?", ("dog", "a small green frog", "ant"), 0),
        MCQExample("b", "What gives plants energy?", ("sun", "water", "heat", "light of the moon", "soil"), 3),
    ]
    rows = rows_for(student, exs, 5, soft=False)
    batch = student.collate([rows[0], rows[1]])
    scale = getattr(student.model, LOGIT_SCALE)
    assert scale.requires_grad and float(scale.detach().exp()) == pytest.approx(20.0)

    def embed(text: str) -> torch.Tensor:
        ids = student.tokenizer(text, return_tensors="pt")
        return student.model(**ids).last_hidden_state[0].mean(0)

    with torch.no_grad():
        got = student.logits({k: v for k, v in batch.items() if k not in ("targets", "weights", "labels")})
        for i, ex in enumerate(exs):
            q = embed(ex.question)
            want = torch.stack([20.0 * torch.nn.functional.cosine_similarity(q, embed(o), dim=0) for o in ex.options])
            torch.testing.assert_close(got[i, : ex.k], want, atol=1e-4, rtol=1e-4)
    assert torch.isinf(got[0, 3:]).all() and torch.isfinite(got[1]).all()


def test_mixup_pairs_rows_of_the_same_options_and_mixes_embeddings_and_losses(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.mixup`: rows are paired only with rows of the same option mask; at lambda = 1 the loss is the plain
    one; at lambda = 0.3 it is 0.3 l(mixed logits; own targets) + 0.7 l(mixed logits; partner's targets), the
    logits from the mixed question and option embeddings (by hand); evaluation is never mixed; a cross-encoder
    student is refused."""
    from probekd.student import mixup
    from probekd.student.heads import biencoder_embeddings, biencoder_scores
    from probekd.student.train import distill_loss

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    for seed in range(5):
        perm = mixup.same_option_pairs(mask, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(5)) and (mask[perm] == mask).all() and perm[4] == 4

    exs = mammal_task(6)
    exs = [*exs[:4], MCQExample("s1", "Which is a mammal?", ("dog", "ant", "sun"), 0),
           MCQExample("s2", "Which is a mammal?", ("ant", "dog", "sun"), 1)]  # fmt: skip
    student = build_student(StudentConfig(model=str(tiny_bert_dir), head="biencoder"), k=4, seed=0)
    rows = rows_for(student, exs, 4)
    batch = _batch(student, rows)
    plain_cfg = TrainConfig(alpha=0.5, temperature=2.0)
    plain = make_trainer(student, rows, None, plain_cfg, tmp_path / "plain", 0)
    mixed = make_trainer(student, rows, None, TrainConfig(alpha=0.5, temperature=2.0, mixup=0.4), tmp_path / "mix", 0)
    student.model.train()
    with torch.no_grad():
        base = float(plain.compute_loss(student.model, dict(batch)))
        lams = iter([1.0, 0.3])
        monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self: torch.tensor(next(lams)))
        pairs = torch.tensor([1, 0, 3, 2, 5, 4])
        monkeypatch.setattr(mixup, "same_option_pairs", lambda m, generator=None: pairs)
        assert float(mixed.compute_loss(student.model, dict(batch))) == pytest.approx(base, rel=1e-5)
        got = float(mixed.compute_loss(student.model, dict(batch)))
        q, o = biencoder_embeddings(student.model, batch["input_ids"], batch["attention_mask"], batch["option_ids"],
                                    batch["option_attention"])  # fmt: skip
        logits = biencoder_scores(student.model, 0.3 * q + 0.7 * q[pairs], 0.3 * o + 0.7 * o[pairs],
                                  batch["option_mask"])  # fmt: skip
        kw = dict(loss="fkl", alpha=0.5, temperature=2.0)
        own = distill_loss(logits, batch["targets"], batch["labels"], batch["option_mask"], **kw)
        other = distill_loss(logits, batch["targets"][pairs], batch["labels"][pairs], batch["option_mask"], **kw)
        assert got == pytest.approx(float((0.3 * own + 0.7 * other).mean()), rel=1e-5)
        assert abs(got - base) > 1e-4
        student.model.eval()  # evaluation: no mixing
        assert float(mixed.compute_loss(student.model, dict(batch))) == pytest.approx(base, rel=1e-5)
    cross = build_student(StudentConfig(model=str(tiny_bert_dir), head="cross"), k=4, seed=0)
    with pytest.raises(ProbekdError, match="train.mixup .* needs student.head: biencoder"):
        make_trainer(cross, rows_for(cross, exs, 4), None, TrainConfig(mixup=0.4), tmp_path / "cross", 0)


def test_causal_students_under_ddp_step_as_one_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Under torchrun (2 gloo ranks, 8 rows each) one SGD step of a causal student leaves both ranks with the same
    parameters, equal to one process's step on all 16 rows: its scorers go through the DDP-wrapped forward, so the
    gradients are all-reduced (the letter scorer trained in full, the option scorer with LoRA). Without the
    synchronization each rank would step on its own 8 rows and the ranks would differ. Two steps of 2 accumulated
    micro-batches also leave the ranks equal (the ranks' shares of the rows are not one process's order, so there
    only the ranks are compared)."""
    script = Path(__file__).with_name("ddp_student_worker.py")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    alone = subprocess.run([sys.executable, str(script), str(tiny_llama_dir), str(tmp_path)], capture_output=True,
                           text=True, env=env, timeout=600)  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                str(script), str(tiny_llama_dir), str(tmp_path)]  # fmt: skip
    both = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert both.returncode == 0, both.stderr[-3000:]
    for name in ("letter", "option-lora"):
        one = torch.load(tmp_path / f"{name}-world1-rank0.pt")
        r0, r1 = (torch.load(tmp_path / f"{name}-world2-rank{r}.pt") for r in (0, 1))
        start = build_student(
            StudentConfig(
                model=str(tiny_llama_dir),
                kind="causal",
                prompt="base",
                formulation=name.split("-")[0],
                lora=name.endswith("lora"),
            ),
            k=4,
            seed=0,
        )
        before = torch.cat([p.detach().flatten() for p in start.model.parameters() if p.requires_grad])
        assert (one - before).abs().max() > 1e-3  # the step moved the parameters
        torch.testing.assert_close(r0, r1, rtol=0, atol=1e-6)
        torch.testing.assert_close(r0, one, rtol=1e-4, atol=1e-5)
    r0, r1 = (torch.load(tmp_path / f"option-lora-ga2-world2-rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0, r1, rtol=0, atol=1e-6)


def test_min_steps_gives_a_small_training_set_more_epochs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """`train.min_steps`: 12 rows at batch 4 are 3 steps an epoch; 2 epochs are 6 steps, so min_steps 15 trains
    5 epochs (15 steps, a dev evaluation after each epoch), and min_steps 4 changes nothing."""
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3)
    assert cfg.epochs_for(3) == 2
    assert cfg.model_copy(update={"min_steps": 15}).epochs_for(3) == 5
    assert cfg.model_copy(update={"min_steps": 4}).epochs_for(3) == 2
    assert cfg.model_copy(update={"min_steps": 7}).epochs_for(3) == pytest.approx(7 / 3)
    assert cfg.model_copy(update={"epochs": 1, "min_steps": 21}).total_steps(19) == 21  # 21 / 19 x 19: 22 in float
    assert cfg.total_steps(3) == 6 and cfg.model_copy(update={"min_steps": 4}).total_steps(3) == 6
    student = build_student(StudentConfig(model=str(tiny_bert_dir)), k=4, seed=0)
    rows, dev = rows_for(student, mammal_task(12), 4), rows_for(student, mammal_task(8, seed=1), 4)
    history = train_student(student, rows, dev, cfg.model_copy(update={"min_steps": 15}), tmp_path / "ck", 0)
    assert [h["step"] for h in history if "train_runtime" in h] == [15]
    assert len([h for h in history if "eval_accuracy" in h]) == 5
