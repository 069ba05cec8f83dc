"""Student training: a thin adapter on Hugging Face `Trainer` (checkpoints, resume, gradient accumulation, mixed
precision and logging come from it); only the loss is ours.

Per example i with student logits s_i, soft targets p_i, gold label y_i (-1 when unlabelled) and weight w_i:

    l_i = alpha * T^2 * KD(p_i, s_i; T) + (1 - alpha) * CE(y_i, s_i)      (the CE term only where y_i is known)
    loss = sum_i w_i l_i / n

with n the number of examples in the whole optimizer step (all gradient-accumulation micro-batches: the
`num_items_in_batch` that `Trainer` counts from the `labels` column), so batch size and accumulation do not change
the loss's scale. Weights are 1 unless a weighting scheme (PACED) gives them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from probekd import losses
from probekd.atomic import write_json
from probekd.errors import ProbekdError
from probekd.losses.common import masked_log_softmax
from probekd.weighting import WeightingConfig, weight_stats, weights_for

log = logging.getLogger(__name__)


def check_loss(v: str) -> str:
    """A registered loss name or a two-stage `first>second`; anything else is a ValueError listing the losses."""
    parts = v.split(">")
    if len(parts) > 2 or any(x not in losses.names() for x in parts):
        raise ValueError(f"{v!r} is not a loss or `first>second`; losses: {', '.join(losses.names())}")
    return v


class TrainConfig(BaseModel):
    """How a student is trained (identical for every signal)."""

    model_config = ConfigDict(extra="forbid")

    loss: str = Field(
        "fkl",
        description="Distillation divergence (`probekd.losses` registry name), or `first>second`: a two-stage "
        "schedule that switches after `switch_at` of the optimizer steps (PACED's best: `fkl>rkl`).",
    )
    switch_at: float = Field(
        0.5, gt=0, lt=1, description="Share of the steps trained with the first of `first>second`."
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation term; 1 - alpha goes to gold CE.")
    temperature: float = Field(2.0, gt=0, description="Student softmax temperature in the distillation term.")
    epochs: float = Field(4, gt=0, description="Passes over the training rows.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear warm-up, then linear decay).")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step (micro-batch x accumulation).")
    grad_accum: int = Field(1, ge=1, description="Gradient-accumulation micro-batches per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with a linear warm-up.")
    eval_batch_size: int = Field(32, ge=1, description="Examples per forward pass when predicting.")
    group_by_length: bool = Field(
        True, description="Batch training rows of similar length (less padding; random within groups of ~4 batches)."
    )
    bf16: bool = Field(False, description="bfloat16 mixed precision (only on hardware with native bf16).")
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)  # type: ignore[arg-type]

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return check_loss(v)

    def first_changed_step(self, weighting: str, steps_per_epoch: int) -> int | None:
        """Optimizer steps a student with this loss and `weighting` trains exactly like the forward-KL, unweighted
        one of the same cell (same data order): 0 for a different loss from the start, the switch of `fkl>...`, the
        weighting's warm-up; None when it is that default. A model kept (best dev epoch) at or before this step is
        the default's model, so it says nothing about the variant."""
        max_steps = math.ceil(self.epochs * steps_per_epoch)
        parts = self.loss.split(">")
        changes = []
        if parts[0] != "fkl":
            changes.append(0)
        elif len(parts) > 1 and parts[1] != "fkl":
            changes.append(round(self.switch_at * max_steps))
        if weighting != "none":
            changes.append(round(self.weighting.warmup_epochs * steps_per_epoch))
        return min(changes) if changes else None

    def loss_at(self, step: int, max_steps: int) -> str:
        """The divergence used at optimizer step `step` of `max_steps` (the two-stage schedule's switch)."""
        parts = self.loss.split(">")
        return parts[0] if len(parts) == 1 or step < round(self.switch_at * max_steps) else parts[1]


def distill_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: str = "fkl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    **options: Any,
) -> torch.Tensor:
    """Per-example loss [B]: alpha T^2 KD(targets, logits; T) + (1 - alpha) CE(labels) (CE where labels >= 0).

    Rows whose targets are all zero (no soft target) take no KD term."""
    has_target = targets.sum(-1) > 0
    kd = losses.get(loss)(logits, targets, mask, temperature=temperature, **options) * temperature**2
    kd = torch.where(has_target, kd, torch.zeros_like(kd))
    labelled = labels >= 0
    logp = masked_log_softmax(logits, mask, 1.0)
    ce = -logp.gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    ce = torch.where(labelled, ce, torch.zeros_like(ce))
    return alpha * kd + (1 - alpha) * ce


class Rows(Dataset):
    """Encoded examples with their targets [K], label and weight, as `Trainer` reads them."""

    def __init__(
        self,
        encoded: list[dict[str, Any]],
        mask: np.ndarray,
        labels: np.ndarray,
        targets: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        n = len(encoded)
        if not (mask.shape[0] == labels.shape[0] == n) or (targets is not None and targets.shape != mask.shape):
            raise ValueError(
                f"rows: {n} encoded, mask {mask.shape}, labels {labels.shape}, "
                f"targets {None if targets is None else targets.shape}"
            )
        self.rows = []
        # longest token sequence of each row (the encoder's longest option pair, the prompt, or the prefix and its
        # longest continuation): for batching
        self.lengths = [_longest(e["input_ids"]) + _longest(e.get("option_ids", [])) for e in encoded]
        for i, enc in enumerate(encoded):
            row = dict(enc)
            row["option_mask"] = torch.from_numpy(mask[i])
            row["labels"] = int(labels[i])
            row["targets"] = torch.from_numpy(
                (targets[i] if targets is not None else np.zeros(mask.shape[1])).astype(np.float32)
            )
            row["weights"] = float(weights[i]) if weights is not None else 1.0
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def longest_first(self) -> list[int]:
        """Row indices by decreasing length (ties in row order): batches cut from this order pad little (on ARC-Easy
        dev with the MiniLM encoder, 2.2x fewer token slots than file order), and the largest batch comes first, so
        running out of memory happens at once, not at the end."""
        return sorted(range(len(self.rows)), key=lambda i: -self.lengths[i])


def _longest(ids: list[Any]) -> int:
    """Length of a token list, or of the longest of a list of them."""
    return max(map(len, ids), default=0) if ids and isinstance(ids[0], list) else len(ids)


def _make_trainer_class() -> type:
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """`Trainer` with the distillation loss of this module; everything else is `Trainer`'s."""

        loss_is_scaled_for_ga = True  # our loss is divided by the step's example count, see the module docstring

        def __init__(self, *args: Any, train_cfg: TrainConfig, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.train_cfg = train_cfg
            self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch over the whole step

        def compute_loss(
            self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            targets = inputs.pop("targets")
            weights = inputs.pop("weights")
            labels = inputs.pop("labels")
            logits = model(**inputs)
            per = distill_loss(
                logits,
                targets,
                labels,
                inputs["option_mask"],
                loss=self.train_cfg.loss_at(self.state.global_step, self.state.max_steps),
                alpha=self.train_cfg.alpha,
                temperature=self.train_cfg.temperature,
            )
            n = num_items_in_batch if num_items_in_batch is not None else len(per)
            value = (weights.float() * per).sum() / n
            return (value, {"logits": logits}) if return_outputs else value

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            ds = train_dataset if train_dataset is not None else self.train_dataset
            if not self.train_cfg.group_by_length or not isinstance(ds, Rows):
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=ds.lengths
            )

        def _get_eval_sampler(self, eval_dataset: Any) -> Any:
            # predictions and labels come back in the sampler's order together, so the metrics are unchanged
            if isinstance(eval_dataset, Rows) and self.args.world_size <= 1:
                return eval_dataset.longest_first()
            return super()._get_eval_sampler(eval_dataset)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            # Trainer writes a plain module's state dict with safetensors.save_file, which refuses tied weights (a
            # causal LM's embeddings and output layer); save_model keeps one copy, and loading is non-strict.
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_model(self.model, str(out / "model.safetensors"), metadata={"format": "pt"})

        def _issue_warnings_after_load(self, load_result: Any) -> None:
            # Trainer's own version reads `model._keys_to_ignore_on_save`, which only a PreTrainedModel has (an
            # AttributeError on our student modules, at the end of training). The names save_model left out share
            # their tensor with one it kept, so they were loaded through it: only the others are worth a warning.
            missing = untied_missing_keys(self.model, load_result.missing_keys)
            if missing:
                log.warning("the best checkpoint lacks these weights (left as they were): %s", missing)
            if load_result.unexpected_keys:
                log.warning("the best checkpoint has weights the student does not: %s", load_result.unexpected_keys)

    return DistillTrainer


def untied_missing_keys(module: nn.Module, missing: list[str]) -> list[str]:
    """The names in `missing` that were not loaded through a tied twin: a state-dict entry that shares its tensor
    with an entry not in `missing` (a causal LM's embeddings and output layer) got its values from that entry."""
    by_storage: dict[tuple[Any, int], list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t.numel():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), []).append(name)
    gone = set(missing)
    loaded_through_twin = {n for names in by_storage.values() if not gone.issuperset(names) for n in names}
    return [k for k in missing if k not in loaded_through_twin]


WEIGHTS_FILE = "probekd_weights.json"  # in a checkpoint of a weighted student: its rows' weights and their stats


def _make_pass_rate_callback(
    rows: Rows, collate: Any, cfg: WeightingConfig, steps_per_epoch: int, batch_size: int, seed: int
) -> Any:
    """A `TrainerCallback` that (re)computes the rows' weights from the student's pass rates: at the start (or
    after `warmup_epochs` of unweighted steps), then every `refresh_epochs`; the weights are written into the
    rows, which the data loader reads at each batch. Each computation's statistics are kept in `.stats`.

    The weights in force and the statistics so far are saved in every checkpoint (`WEIGHTS_FILE`) and restored
    from the one training resumes from (`.resume_from`), so that a resumed student is weighted as an uninterrupted
    one, not by pass rates of the later model it resumes with (`train_student` restarts a weighted student whose
    checkpoint is past the warm-up but has no saved weights)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    refresh = max(1, round(cfg.refresh_epochs * steps_per_epoch)) if cfg.refresh_epochs > 0 else 0
    gold = np.array([r["labels"] if r["labels"] >= 0 else int(np.argmax(r["targets"].numpy())) for r in rows.rows])

    class PassRateWeights(TrainerCallback):
        def __init__(self) -> None:
            self.stats: list[dict[str, Any]] = []
            self.resume_from: str | None = None
            self.warmup = warmup  # optimizer steps before the first weights

        def _update(self, model: nn.Module, step: int) -> None:
            was_training = model.training
            probs = predict(model, collate, rows, batch_size)
            model.train(was_training)
            w = weights_for(cfg, probs, gold, seed + step)
            for row, wi in zip(rows.rows, w, strict=True):
                row["weights"] = float(wi)
            p = probs[np.arange(len(gold)), gold]
            self.stats.append({"step": step, **weight_stats(w, p)})
            log.info(
                "%s weights at step %d: mean pass rate %.3f, effective sample size %.1f%%, zero weight %.1f%%",
                cfg.scheme, step, p.mean(), 100 * self.stats[-1]["ess_share"], 100 * self.stats[-1]["zero_share"],
            )  # fmt: skip

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kw: Any) -> None:
            saved = Path(self.resume_from) / WEIGHTS_FILE if self.resume_from else None
            if saved is not None and saved.is_file():  # resumed: the weights in force when the checkpoint was saved
                kept = json.loads(saved.read_text())
                if len(kept["weights"]) != len(rows.rows):
                    raise ProbekdError(f"{saved} holds {len(kept['weights'])} weights for {len(rows.rows)} rows")
                for row, wi in zip(rows.rows, kept["weights"], strict=True):
                    row["weights"] = float(wi)
                self.stats = kept["stats"]
                log.info("%s weights restored from %s (computed at steps %s)", cfg.scheme, saved,
                         [st["step"] for st in self.stats])  # fmt: skip
            elif state.global_step >= warmup:  # from the start, without a warm-up (`train_student` never resumes
                self._update(model, state.global_step)  # past the warm-up without saved weights)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                data = {"weights": [row["weights"] for row in rows.rows], "stats": self.stats}
                write_json(folder / WEIGHTS_FILE, data)

        def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kw: Any) -> None:
            since = state.global_step - warmup
            if since == 0 or (since > 0 and refresh and since % refresh == 0):
                self._update(model, state.global_step)

    return PassRateWeights()


def _accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    lab = labels >= 0
    return {"accuracy": float((logits[lab].argmax(-1) == labels[lab]).mean()) if lab.any() else float("nan")}


def _steps_per_epoch(rows: Rows, cfg: TrainConfig) -> int:
    return math.ceil(len(rows) / cfg.batch_size)


def make_trainer(
    module: nn.Module,
    collate: Any,
    train_rows: Rows,
    dev_rows: Rows | None,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    **overrides: Any,
) -> Any:
    """The `Trainer` of one student: evaluation and checkpoint each epoch, the best dev accuracy kept at the end
    (when `dev_rows` is given). `overrides` go to `TrainingArguments` (tests use them)."""
    from transformers import TrainingArguments

    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of grad_accum {cfg.grad_accum}")
    steps_per_epoch = _steps_per_epoch(train_rows, cfg)
    with_dev = dev_rows is not None
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": cfg.batch_size // cfg.grad_accum,
        "per_device_eval_batch_size": cfg.eval_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs),
        "lr_scheduler_type": "linear",
        "eval_strategy": "epoch" if with_dev else "no",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "load_best_model_at_end": with_dev,
        "metric_for_best_model": "accuracy" if with_dev else None,
        "greater_is_better": True,
        "logging_steps": max(1, steps_per_epoch // 4),
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "use_cpu": not torch.cuda.is_available(),
        "bf16": cfg.bf16,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return _make_trainer_class()(
        model=module,
        args=TrainingArguments(**kwargs),
        train_dataset=train_rows,
        eval_dataset=dev_rows,
        data_collator=collate,
        compute_metrics=_accuracy,
        train_cfg=cfg,
    )


def train_student(
    module: nn.Module,
    collate: Any,
    train_rows: Rows,
    dev_rows: Rows,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
) -> list[dict[str, Any]]:
    """Train `module` in place; keep the epoch with the best dev accuracy. Checkpoints go to `out_dir` (a rerun
    resumes from the last one) and are removed at the end. Returns Trainer's log history, followed by one
    `{"weighting": stats}` entry per computation of the weights (`probekd.weighting.weight_stats`)."""
    from transformers.trainer_utils import get_last_checkpoint

    trainer = make_trainer(module, collate, train_rows, dev_rows, cfg, out_dir, seed)
    weigher = None
    if cfg.weighting.scheme != "none":
        weigher = _make_pass_rate_callback(
            train_rows, collate, cfg.weighting, _steps_per_epoch(train_rows, cfg), cfg.eval_batch_size, seed
        )
        trainer.add_callback(weigher)
    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if weigher is not None:
        if last and int(last.rsplit("-", 1)[1]) >= weigher.warmup and not (Path(last) / WEIGHTS_FILE).is_file():
            # weights computed before this checkpoint but not saved in it (made before they were): they cannot be
            # recomputed from the later model, so this student starts again
            log.warning("%s has no %s; training this weighted student from the start", last, WEIGHTS_FILE)
            shutil.rmtree(out_dir)
            last = None
        weigher.resume_from = last
    if last:
        log.info("resuming student training from %s", last)
    trainer.train(resume_from_checkpoint=last)
    history = list(trainer.state.log_history)
    if weigher is not None:
        history += [{"weighting": st} for st in weigher.stats]
    shutil.rmtree(out_dir, ignore_errors=True)
    return history


@torch.inference_mode()
def predict(module: nn.Module, collate: Any, rows: Rows, batch_size: int = 32) -> np.ndarray:
    """Probabilities [N, K] (0 on masked options) of the student on `rows`, in row order (computed in batches of
    similar length)."""
    module.eval()
    device = next(module.parameters()).device
    order = rows.longest_first()
    out = []
    for s in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[s : s + batch_size]])
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("targets", "weights", "labels")}
        out.append(torch.softmax(module(**inputs).float(), -1).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    probs = torch.cat(out).numpy()
    result = np.empty_like(probs)
    result[order] = probs
    return result
