"""Token-level distillation of solution sequences, each problem's loss weighted (PACED), on Hugging Face `Trainer`.

A training row is one problem's solution (a teacher-generated rationale, the gold worked solution, or one of the
student's own rollouts) after two prompts: the student's (the question) and the teacher's (the same, or the
question with privileged context such as the worked solution, for self-distillation). At every solution token the
student's next-token distribution is compared with the teacher's (`probekd.generative.token_losses`):

    l_i = alpha * T^2 * mean_t D(teacher_t || student_t; T) + (1 - alpha) * mean_t CE(token_t)
    loss = sum_i w_i l_i / n          (n: problems in the optimizer step, micro-batch x accumulation steps)

with w_i the problem's weight (PACED: p^alpha (1-p)^beta of the student's pass rate, normalized to mean 1). The
teacher is a frozen model that shares the student's vocabulary, or, for self-distillation of a LoRA student,
`None`: the student with its adapters disabled is then the frozen initial student. With alpha = 0 no teacher
distribution is used (sequence-level KD: cross-entropy on the solution text, which any teacher can have written).

The output layer runs only at the solution positions (a vocabulary of 50k entries at every prompt token would be
most of the memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from probekd.errors import ProbekdError
from probekd.generative.token_losses import TOKEN_DIVERGENCES, per_problem, token_divergence
from probekd.student.heads import base_model
from probekd.student.train_config import TrainConfig


class SequenceTrainConfig(TrainConfig):
    """The `train:` section for sequences: the same fields as the multiple-choice students' (epochs, learning
    rate, batch, the two-stage `first>second` schedule, weighting), with token-level divergences (fkl, rkl, js,
    akl) and pure distillation (alpha 1, T 1) by default. `loss_options` may set `beta` (js), `head_mass` (akl)
    and `top_k` (the teacher's top-k tokens instead of the whole vocabulary). Not used here: `group_by_length`,
    `report_to`, and of `weighting` only `alpha`, `beta` and `filter_tol` (weights come with the rows)."""

    loss: str = "fkl"
    alpha: float = Field(1.0, ge=0, le=1, description="Weight of the distillation term; 1 - alpha: cross-entropy.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions.")

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        parts = v.split(">")
        if len(parts) > 2 or any(x not in TOKEN_DIVERGENCES for x in parts):
            raise ValueError(f"{v!r} is not a token divergence or `first>second`; divergences: {TOKEN_DIVERGENCES}")
        return v

    @model_validator(mode="after")
    def _options_fit_the_loss(self) -> SequenceTrainConfig:
        bad = sorted(set(self.loss_options) - {"beta", "head_mass", "top_k"})
        if bad:
            raise ValueError(f"loss_options {bad} are not options of the token divergences (beta, head_mass, top_k)")
        return self


def check_shared_vocabulary(student_tok: Any, teacher_tok: Any, student: str, teacher: str) -> None:
    """Token-level distillation compares distributions over one vocabulary: refuse a pair whose tokenizers differ,
    naming both."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ProbekdError(
            f"teacher {teacher} and student {student} have different tokenizers ({len(teacher_tok)} and "
            f"{len(student_tok)} tokens): token-level distillation needs one vocabulary. Use a teacher of the "
            "student's family, self-distillation (the student with privileged context as its own teacher), or "
            "distil the teacher's generated solutions as plain text (sequence-level KD: the teacher's rationales as "
            "targets with alpha 0)"
        )


class SequenceRows(Dataset):
    """Tokenized (student prompt + solution, teacher prompt + solution) pairs with their weights."""

    def __init__(
        self,
        tokenizer: Any,
        student_prompts: Sequence[str],
        teacher_prompts: Sequence[str],
        solutions: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        max_solution_tokens: int = 512,
        prompt_special_tokens: bool = False,
    ) -> None:
        n = len(solutions)
        if not len(student_prompts) == len(teacher_prompts) == n or (weights is not None and len(weights) != n):
            raise ValueError("student prompts, teacher prompts, solutions and weights must have one entry per row")
        self.tokenizer, self.max_solution_tokens = tokenizer, max_solution_tokens
        self.prompt_ids = [
            {side: tokenizer(prompt, add_special_tokens=prompt_special_tokens)["input_ids"] for side, prompt in pair}
            for pair in ((("", s), ("teacher_", t)) for s, t in zip(student_prompts, teacher_prompts, strict=True))
        ]
        self.rows = [{"weights": float(weights[i]) if weights is not None else 1.0} for i in range(n)]
        for i in range(n):
            self.replace_solution(i, solutions[i])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def replace_solution(self, i: int, solution: str) -> None:
        """Row `i` with another solution after the same prompts (on-policy sources re-sample their solutions)."""
        sol = self.tokenizer(solution, add_special_tokens=False)["input_ids"][: self.max_solution_tokens]
        if not sol:
            raise ProbekdError(f"row {i}: the solution is empty; nothing to distil")
        row = self.rows[i]
        for side, ids in self.prompt_ids[i].items():
            # logits at position t predict token t + 1: the solution's tokens are predicted from P - 1 on
            row[f"{side}input_ids"] = ids + sol
            row[f"{side}loss_mask"] = [0] * (len(ids) - 1) + [1] * len(sol) + [0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded tensors: ids, attention masks and loss masks of both sides, and the weights."""
        out: dict[str, torch.Tensor] = {"weights": torch.tensor([r["weights"] for r in rows])}
        for side in ("", "teacher_"):
            ids = [r[f"{side}input_ids"] for r in rows]
            t = max(map(len, ids))
            out[f"{side}input_ids"] = torch.tensor([x + [self.pad_id] * (t - len(x)) for x in ids])
            out[f"{side}attention_mask"] = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids])
            masks = [r[f"{side}loss_mask"] for r in rows]
            out[f"{side}loss_mask"] = torch.tensor([m + [0] * (t - len(m)) for m in masks])
        return out


def solution_logits(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits [M, V] at the positions of `mask` (row-major), the output layer run there only
    (Gemma's final logit soft-capping applied when its config has it)."""
    base = base_model(model)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    rows, pos = mask.bool().nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, pos]).float()
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class SequenceDistillTrainer(Trainer):
    """`Trainer` with the weighted token-level distillation loss of this module; everything else is `Trainer`'s."""

    loss_is_scaled_for_ga = True  # divided by the problems of the whole optimizer step in `compute_loss`

    def __init__(self, *args: Any, teacher: nn.Module | None, train_cfg: SequenceTrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        self.train_cfg = train_cfg
        if teacher is None and train_cfg.alpha > 0 and not hasattr(_unwrap(self.model), "disable_adapter"):
            raise ProbekdError("self-distillation without a teacher model needs a LoRA student (the frozen initial "
                               "student is the one with its adapters disabled)")  # fmt: skip
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        per = self.problem_losses(model, inputs)
        # rows have no `labels` for Trainer to count; a short last micro-batch is counted as a full one
        n = len(per) * self.args.gradient_accumulation_steps
        value = (inputs["weights"].float() * per).sum() / n
        return (value, {}) if return_outputs else value

    def problem_losses(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """l_i of every row of a collated batch [B] (unweighted)."""
        cfg = self.train_cfg
        mask, tmask = inputs["loss_mask"], inputs["teacher_loss_mask"]
        if not torch.equal(mask.sum(1), tmask.sum(1)):
            raise ProbekdError("student and teacher rows hold different numbers of solution tokens")
        s = solution_logits(model, inputs["input_ids"], inputs["attention_mask"], mask)
        rows, pos = mask.bool().nonzero(as_tuple=True)
        if cfg.alpha == 0:  # sequence-level KD: cross-entropy on the solution text only, no teacher distribution
            return per_problem(self._dense(self._ce(s, inputs["input_ids"], rows, pos), rows, pos, mask), mask)
        with torch.no_grad():
            if self.teacher is not None:
                t = solution_logits(self.teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], tmask)
            else:
                with _unwrap(model).disable_adapter():
                    t = solution_logits(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], tmask)
        v = min(s.shape[-1], t.shape[-1])  # one tokenizer; a model may pad its output layer beyond it (Qwen)
        s, t = s[:, :v], t[:, :v]
        kind = cfg.loss_at(self.state.global_step, self.state.max_steps)
        options = {k: (int(v) if k == "top_k" else v) for k, v in cfg.loss_options.items()}
        div = token_divergence(s, t, kind, temperature=cfg.temperature, **options) * cfg.temperature**2
        per = per_problem(self._dense(div, rows, pos, mask), mask)
        if cfg.alpha < 1:
            ce = self._ce(s, inputs["input_ids"], rows, pos)
            per = cfg.alpha * per + (1 - cfg.alpha) * per_problem(self._dense(ce, rows, pos, mask), mask)
        return per

    @staticmethod
    def _ce(logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the solution's tokens [M] (position t predicts token t + 1)."""
        return -torch.log_softmax(logits, -1).gather(1, ids[rows, pos + 1][:, None])[:, 0]

    @staticmethod
    def _dense(values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token values [M] back in place as [B, T] (0 elsewhere)."""
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put((rows, pos), values)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def distill_sequences(
    model: nn.Module,
    teacher: nn.Module | None,
    rows: SequenceRows,
    cfg: SequenceTrainConfig,
    out_dir: Path,
    seed: int = 0,
    *,
    description: str = "distil",
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train `model` (a causal LM, or a peft model around one) on `rows` in place; checkpoints each epoch to
    `out_dir` (a rerun resumes from the last one); one progress bar named `description`; `callbacks` are added
    (one with a `resume_from` attribute learns the checkpoint training resumes from); `overrides` go to
    `TrainingArguments`. Returns `Trainer`'s log history."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    from probekd.student.callbacks import StudentProgress

    if cfg.batch_size % cfg.grad_accum:
        raise ProbekdError(f"train.batch_size {cfg.batch_size} is not a multiple of train.grad_accum {cfg.grad_accum}")
    steps = math.ceil(len(rows) / cfg.batch_size) * cfg.epochs
    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(cfg.warmup_ratio * steps),
        lr_scheduler_type="linear",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=max(1, int(steps) // 8),
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**(kwargs | overrides))
    trainer = SequenceDistillTrainer(
        model=model, args=args, train_dataset=rows, data_collator=rows.collate, teacher=teacher, train_cfg=cfg
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StudentProgress(description))
    last = get_last_checkpoint(str(out_dir)) if Path(out_dir).is_dir() else None
    for cb in callbacks or []:
        if hasattr(cb, "resume_from"):
            cb.resume_from = last
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=last)
    return list(trainer.state.log_history)
