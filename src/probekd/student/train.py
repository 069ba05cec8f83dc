"""Student training: a thin adapter on Hugging Face `Trainer` (checkpoints, resume, gradient accumulation, mixed
precision and logging come from it); only the loss is ours.

Per example i with student logits s_i, soft targets p_i, gold label y_i (-1 when unlabelled) and weight w_i:

    l_i = alpha * T^2 * KD(p_i, s_i; T) + (1 - alpha) * CE(y_i, s_i)      (the CE term only where y_i is known)
    loss = sum_i w_i l_i / n

with n the number of examples in the whole optimizer step (the micro-batch's rows times the gradient-accumulation
steps; a short last micro-batch counts as a full one), so batch size and accumulation do not change the loss's
scale. (Not `Trainer`'s `num_items_in_batch`: for a causal-LM model it counts `labels[..., 1:]`, one row short
per micro-batch when labels are one per example.) Weights are 1 unless a weighting scheme (PACED) gives them.
"""

from __future__ import annotations

import ast
import copy
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from probekd import losses
from probekd.errors import ProbekdError
from probekd.losses.common import masked_log_softmax
from probekd.ranks import ranks
from probekd.student.callbacks import WEIGHTS_FILE, JsonlLog, PassRateWeights, StudentProgress
from probekd.student.heads import Scorer, Student, attach_training_head, biencoder_logits, detach_training_head
from probekd.student.hidden_match import PROJECTION
from probekd.student.lelp import HEAD as LELP_HEAD
from probekd.student.train_config import TrainConfig

log = logging.getLogger(__name__)


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


# what a row holds besides the student's model inputs (the loss reads them; the model never sees them); the
# per-option ones [K, ...] feed the extra training terms (hidden-state matching, LELP)
PER_OPTION_EXTRAS = ("teacher_states", "subclass_targets")
ROW_EXTRAS = ("targets", "weights", "labels", *PER_OPTION_EXTRAS)


class Rows(Dataset):
    """Encoded examples with their targets [K], label and weight (and, for hidden-state matching, the teacher's
    standardized states [K, H]; for LELP, the pseudo-subclass distributions [K, S2]), as `Trainer` reads them;
    `domains`, the rows' domains for DDK's mixture, are kept beside them."""

    def __init__(
        self,
        encoded: list[dict[str, Any]],
        mask: np.ndarray,
        labels: np.ndarray,
        targets: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        teacher_states: np.ndarray | None = None,
        subclass_targets: np.ndarray | None = None,
        domains: list[str | None] | None = None,
    ) -> None:
        n = len(encoded)
        given = (teacher_states, subclass_targets)
        per_option = {k: v for k, v in zip(PER_OPTION_EXTRAS, given, strict=True) if v is not None}
        if (
            not (mask.shape[0] == labels.shape[0] == n)
            or (targets is not None and targets.shape != mask.shape)
            or any(v.shape[:2] != mask.shape for v in per_option.values())
            or (domains is not None and len(domains) != n)
        ):
            raise ValueError(
                f"rows: {n} encoded, mask {mask.shape}, labels {labels.shape}, "
                f"targets {None if targets is None else targets.shape}, "
                + ", ".join(f"{k} {v.shape}" for k, v in per_option.items())
            )
        self.domains = domains  # each row's domain (DDK's mixture), outside the row dicts: the model never sees it
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
            for key, value in per_option.items():
                row[key] = torch.from_numpy(np.ascontiguousarray(value[i], dtype=np.float32))
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

    def subset(self, idx: list[int]) -> Rows:
        """The rows at `idx`, in that order (the row dicts are shared, not copied)."""
        out = copy.copy(self)
        out.rows = [self.rows[i] for i in idx]
        out.lengths = [self.lengths[i] for i in idx]
        out.domains = [self.domains[i] for i in idx] if self.domains is not None else None
        return out


def _longest(ids: list[Any]) -> int:
    """Length of a token list, or of the longest of a list of them."""
    return max(map(len, ids), default=0) if ids and isinstance(ids[0], list) else len(ids)


class DistillTrainer(Trainer):
    """`Trainer` with the distillation loss of this module (`compute_loss`) and length-grouped training batches
    (`get_train_dataloader`); everything else is `Trainer`'s. `model` is the student's `PreTrainedModel` (or peft
    model); `scorer` turns it and a batch into option logits (`probekd.student.heads`)."""

    loss_is_scaled_for_ga = True  # our loss is divided by the step's example count, see the module docstring

    def __init__(self, *args: Any, scorer: Scorer, train_cfg: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.train_cfg = train_cfg
        terms = (("mixup", train_cfg.mixup), ("hidden_match", train_cfg.hidden_match), ("lelp", train_cfg.lelp))
        for name, value in terms:
            if value > 0 and scorer is not biencoder_logits:
                raise ProbekdError(f"train.{name} works on the bi-encoder's embeddings; it needs student.head: "
                                   "biencoder (an encoder student)")  # fmt: skip
        # the extra training terms on the option embeddings that are on: (config name, the row extra they read,
        # what it is, the student submodule they train; its output width is the row extra's last dimension)
        terms_on = [t[:4] for t in (
            ("hidden_match", "teacher_states", "the teacher's states", PROJECTION, train_cfg.hidden_match > 0),
            ("lelp", "subclass_targets", "the pseudo-subclass targets", LELP_HEAD, train_cfg.lelp > 0),
        ) if t[4]]  # fmt: skip
        for name, extra, what, module in terms_on:
            if train_cfg.mixup > 0:
                raise ProbekdError(f"train.mixup and train.{name} together are not supported: choose one")
            if hasattr(self.model, "get_base_model"):  # peft checkpoints keep the adapters, not the extra head
                raise ProbekdError(f"train.{name} with a LoRA student (student.lora: true) is not supported: its "
                                   "checkpoints would not keep the term's head; train the encoder in full")  # fmt: skip
            rows = self.train_dataset.rows if isinstance(self.train_dataset, Rows) else []
            if not rows or extra not in rows[0]:
                raise ProbekdError(f"train.{name} needs {what} in the training rows "
                                   f"(Rows(..., {extra}=...))")  # fmt: skip
            width = self.model.config.hidden_size
            device = next(self.model.parameters()).device
            attach_training_head(self.model, module, width, rows[0][extra].shape[-1]).to(device)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        targets = inputs.pop("targets")
        weights = inputs.pop("weights")
        labels = inputs.pop("labels")
        cfg = self.train_cfg
        teacher_states = inputs.pop("teacher_states", None)
        subclass = inputs.pop("subclass_targets", None)
        teacher_states = teacher_states if cfg.hidden_match > 0 else None  # rows may carry what a term left off
        subclass = subclass if cfg.lelp > 0 else None  # does not read
        match = None  # the hidden-state matching term, when it is on and the model trains
        kw = dict(loss=cfg.loss_at(self.state.global_step, self.state.max_steps), alpha=cfg.alpha,
                  temperature=cfg.temperature, **cfg.loss_options)  # fmt: skip
        if cfg.mixup > 0 and model.training:
            from probekd.student.heads import biencoder_embeddings, biencoder_scores
            from probekd.student.mixup import mix, same_option_pairs

            lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
            perm = same_option_pairs(inputs["option_mask"]).to(labels.device)
            q, o = biencoder_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["option_ids"],
                                        inputs["option_attention"])  # fmt: skip
            logits = biencoder_scores(model, mix(q, q[perm], lam), mix(o, o[perm], lam), inputs["option_mask"])
            per = mix(distill_loss(logits, targets, labels, inputs["option_mask"], **kw),
                      distill_loss(logits, targets[perm], labels[perm], inputs["option_mask"], **kw), lam)  # fmt: skip
            weights = mix(weights.float(), weights.float()[perm], lam)
        elif model.training and (teacher_states is not None or subclass is not None):
            from probekd.student.heads import biencoder_embeddings, biencoder_scores

            q, o = biencoder_embeddings(model, inputs["input_ids"], inputs["attention_mask"], inputs["option_ids"],
                                        inputs["option_attention"])  # fmt: skip
            logits = biencoder_scores(model, q, o, inputs["option_mask"])
            per = distill_loss(logits, targets, labels, inputs["option_mask"], **kw)
            k = o.shape[1]  # the batch's options; the row extras are padded to the run's widest
            if teacher_states is not None:
                from probekd.student.hidden_match import match_loss

                match = match_loss(cfg.hidden_match_loss, getattr(self.model, PROJECTION)(o), teacher_states[:, :k],
                                   inputs["option_mask"][:, :k], cfg.hidden_match_alpha)  # fmt: skip
            if subclass is not None:
                from probekd.student.lelp import subclass_loss

                per = per + cfg.lelp * subclass_loss(getattr(self.model, LELP_HEAD)(o), subclass[:, :k],
                                                     targets[:, :k], inputs["option_mask"][:, :k])  # fmt: skip
        else:
            logits = self.scorer(model, **inputs)
            per = distill_loss(logits, targets, labels, inputs["option_mask"], **kw)
        n = len(per) * self.args.gradient_accumulation_steps
        value = (weights.float() * per).sum() / n
        if match is not None:
            value = value + cfg.hidden_match * match / self.args.gradient_accumulation_steps
        return (value, {"logits": logits}) if return_outputs else value

    def get_train_dataloader(self) -> DataLoader:
        """With `group_by_length` on one process: batches of rows of similar length (`Rows.lengths`; Trainer's own
        grouping measures `len(input_ids)`, which for the encoder is the number of options)."""
        ds = self.train_dataset
        if not (self.train_cfg.group_by_length and isinstance(ds, Rows)) or self.args.world_size > 1:
            return super().get_train_dataloader()
        batch = self.args.train_batch_size
        sampler = LengthGroupedSampler(batch * self.args.gradient_accumulation_steps, lengths=ds.lengths)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=self.data_collator, num_workers=0)
        return self.accelerator.prepare(loader)


class TiedHeadNotice(logging.Filter):
    """Drops `Trainer`'s warning that a tied output layer is missing from a checkpoint: when it reloads the best
    epoch of a causal student with tied embeddings (SmolLM2, Gemma, Qwen), the checkpoint holds the shared tensor
    once, under the embeddings, and the output layer is that same tensor, so nothing is missing. Other missing
    keys are still reported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head, emb = base.get_output_embeddings(), base.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        names = model.named_parameters(remove_duplicate=False)
        self.tied_names = {n for n, p in names if tied and p is head.weight}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "missing keys in the checkpoint" not in msg or "[" not in msg:
            return True
        try:
            missing = ast.literal_eval(msg[msg.index("[") : msg.rindex("]") + 1])
        except (ValueError, SyntaxError):
            return True
        return not (missing and set(missing) <= self.tied_names)


def _accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    lab = labels >= 0
    return {"accuracy": float((logits[lab].argmax(-1) == labels[lab]).mean()) if lab.any() else float("nan")}


def _steps_per_epoch(rows: Rows, cfg: TrainConfig) -> int:
    return math.ceil(len(rows) / cfg.batch_size)


def _trackers(cfg: TrainConfig, log_dir: Path | None) -> tuple[list[str], list[Any]]:
    """`report_to` for `TrainingArguments` and the callbacks to add: TensorBoard writes under `log_dir`
    (RUN/logs/<cell>/) rather than beside the checkpoints, which are removed after training."""
    from transformers.integrations import get_available_reporting_integrations

    missing = sorted(set(cfg.report_to) - set(get_available_reporting_integrations()))
    if missing:
        raise ProbekdError(
            f"train.report_to names {missing}, which are not installed (available: "
            f"{sorted(get_available_reporting_integrations()) or 'none'}); pip install them or drop them"
        )
    callbacks = []
    if "tensorboard" in cfg.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        where = log_dir if log_dir is not None else Path("runs") / "tensorboard"
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(where))))
    return [t for t in cfg.report_to if t != "tensorboard"], callbacks


def make_trainer(
    student: Student,
    train_rows: Rows,
    dev_rows: Rows | None,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    *,
    log_file: Path | None = None,
    description: str = "student",
    **overrides: Any,
) -> DistillTrainer:
    """The `Trainer` of one student: evaluation and checkpoint each epoch, the best dev accuracy kept at the end
    (when `dev_rows` is given); a progress bar named `description`, per-step logs to `log_file` (JSON lines) and
    the trackers of `cfg.report_to` (TensorBoard beside `log_file`). `overrides` go to `TrainingArguments`."""
    world = ranks().world  # under a launcher (DDP) each process takes its share of every optimizer step's rows
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of grad_accum x processes "
                         f"({cfg.grad_accum} x {world})")  # fmt: skip
    steps_per_epoch = _steps_per_epoch(train_rows, cfg)
    epochs = cfg.epochs_for(steps_per_epoch)
    with_dev = dev_rows is not None
    report_to, trackers = _trackers(cfg, log_file.with_suffix("") if log_file is not None else None)
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": cfg.batch_size // (cfg.grad_accum * world),
        "per_device_eval_batch_size": cfg.eval_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "num_train_epochs": epochs,
        # `min_steps` binding: exactly that many steps (epochs x steps per epoch can round up one step in float)
        "max_steps": cfg.total_steps(steps_per_epoch) if epochs > cfg.epochs else -1,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": int(cfg.warmup_ratio * steps_per_epoch * epochs),
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
        "report_to": report_to or "none",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "use_cpu": not torch.cuda.is_available(),
        "bf16": cfg.bf16,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    if world > 1 and student.cfg.kind == "causal":
        # its scorers run the decoder through the DDP-wrapped forward (`heads.decoder_output`) and apply the output
        # layer to the positions they need themselves, outside that forward: DDP must not look for unused parameters
        kwargs["ddp_find_unused_parameters"] = False
    if world > 1 and student.scorer is biencoder_logits:
        # DDP and the bi-encoder: the scale is used outside the model's forward and the encoder is called twice per
        # step, so DDP must not look for unused parameters (it would mark the scale ready before its gradient);
        # the pooler, which mean pooling never reads, is frozen so that every trained parameter gets a gradient
        for name, param in student.model.named_parameters():
            if "pooler" in name.split("."):
                param.requires_grad_(False)
        kwargs["ddp_find_unused_parameters"] = False
    kwargs.update(overrides)
    trainer = DistillTrainer(
        model=student.model,
        args=TrainingArguments(**kwargs),
        train_dataset=train_rows,
        # in decreasing length: batches pad little (accuracy does not depend on the order)
        eval_dataset=dev_rows.subset(dev_rows.longest_first()) if dev_rows is not None else None,
        data_collator=student.collate,
        compute_metrics=_accuracy,
        scorer=student.scorer,
        train_cfg=cfg,
    )
    # the terminal gets one bar per student; the log dictionaries go to `log_file` (and to DEBUG logging)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StudentProgress(description))
    if log_file is not None:
        trainer.add_callback(JsonlLog(log_file))
    for cb in trackers:
        trainer.add_callback(cb)
    return trainer


def train_student(
    student: Student,
    train_rows: Rows,
    dev_rows: Rows,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    *,
    log_file: Path | None = None,
    description: str = "student",
) -> list[dict[str, Any]]:
    """Train `student` in place; keep the epoch with the best dev accuracy. Checkpoints go to `out_dir` (a rerun
    resumes from the last one) and are removed at the end. Returns Trainer's log history, followed by one
    `{"weighting": stats}` entry per computation of the weights (`probekd.weighting.weight_stats`)."""
    from transformers.trainer_utils import get_last_checkpoint

    trainer = make_trainer(
        student, train_rows, dev_rows, cfg, out_dir, seed, log_file=log_file, description=description
    )
    weigher = None
    if cfg.weighting.scheme != "none":
        steps_per_epoch = _steps_per_epoch(train_rows, cfg)
        max_steps = cfg.total_steps(steps_per_epoch)
        weigher = PassRateWeights(
            train_rows.rows,
            lambda: predict(student, train_rows, cfg.eval_batch_size),
            cfg.weighting,
            steps_per_epoch,
            seed,
            influence=lambda step: influence_scores(student, train_rows, dev_rows, cfg, cfg.loss_at(step, max_steps)),
            domains=train_rows.domains,
        )
        trainer.add_callback(weigher)
    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if weigher is not None:
        if last and int(last.rsplit("-", 1)[1]) >= weigher.warmup and not (Path(last) / WEIGHTS_FILE).is_file():
            # weights computed before this checkpoint but not saved in it (made before they were): they cannot be
            # recomputed from the later model, so this student starts again
            log.warning("%s has no %s; training this weighted student from the start", last, WEIGHTS_FILE)
            ranks().barrier()  # under a launcher: every rank has looked before rank 0 removes them
            if ranks().main:
                shutil.rmtree(out_dir)
            ranks().barrier()
            last = None
        weigher.resume_from = last
    if last:
        log.info("resuming student training from %s", last)
    notice = TiedHeadNotice(student.model)
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addFilter(notice)
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:
        trainer_log.removeFilter(notice)
    student.model = trainer.model  # the best epoch's weights (loaded into the same model object)
    r = ranks()
    r.barrier()  # under a launcher: every rank has loaded the best epoch before rank 0 removes the checkpoints
    for module in (PROJECTION, LELP_HEAD):
        detach_training_head(student.model, module)  # the deployed student is the plain encoder
    history = list(trainer.state.log_history)
    if weigher is not None:
        history += [{"weighting": st} for st in weigher.stats]
    if r.main:
        shutil.rmtree(out_dir, ignore_errors=True)
    return history


def influence_scores(student: Student, train_rows: Rows, dev_rows: Rows, cfg: TrainConfig, loss: str) -> np.ndarray:
    """KD-AIF's first-order influence of each training row on the dev loss [N], in row order: <grad L_dev,
    grad l_i> on the student's last gradient-receiving linear layer (`probekd.student.influence`), with l_i the
    row's distillation loss (`loss`, the trainer's settings) and L_dev the mean gold cross-entropy on dev."""
    from probekd.student.influence import gradient_dots, influential_layer, layer_gradient

    if dev_rows is None or len(dev_rows) == 0:
        raise ProbekdError("the influence weighting measures each row's effect on the dev loss: it needs dev rows")
    if student.cfg.kind != "encoder":  # a causal scorer's last linear layer (the LM head) is tied, frozen under LoRA
        raise ProbekdError("the influence weighting is for encoder students (a causal student's scoring layer is "
                           "the tied, frozen LM head); use paced or hard_filter for it")  # fmt: skip
    model = student.model
    was_training = model.training
    model.eval()  # no dropout: the same gradients at every call
    kw = dict(loss=loss, alpha=cfg.alpha, temperature=cfg.temperature, **cfg.loss_options)

    def logits(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return student.scorer(m, **{k: v for k, v in batch.items() if k not in ROW_EXTRAS})

    def train_loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distill_loss(logits(m, batch), batch["targets"], batch["labels"], batch["option_mask"], **kw)

    def dev_loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logp = masked_log_softmax(logits(m, batch), batch["option_mask"], 1.0)
        return -logp.gather(-1, batch["labels"].clamp_min(0)[:, None])[:, 0]

    device = next(model.parameters()).device
    size = cfg.batch_size // cfg.grad_accum  # a training micro-batch: its backward fits where training does

    def batches(rows: Rows, order: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, len(order), size):
            batch = student.collate([rows[i] for i in order[s : s + size]])
            yield {k: v.to(device) for k, v in batch.items() if k not in PER_OPTION_EXTRAS}

    dev_order = [i for i in dev_rows.longest_first() if dev_rows[i]["labels"] >= 0]
    train_order = train_rows.longest_first()
    try:
        layer = influential_layer(model, train_loss, next(batches(train_rows, train_order)))
        direction = layer_gradient(model, layer, dev_loss, batches(dev_rows, dev_order))
        dots = torch.cat([gradient_dots(model, layer, train_loss, b, direction)
                          for b in batches(train_rows, train_order)])  # fmt: skip
    finally:
        model.train(was_training)
    out = np.empty(len(train_order))
    out[train_order] = dots.numpy()
    return out


@torch.inference_mode()
def predict(student: Student, rows: Rows, batch_size: int = 32, *, progress: bool = False) -> np.ndarray:
    """Probabilities [N, K] (0 on masked options) of the student on `rows`, in row order (computed in batches of
    similar length; `progress`: a bar over the questions)."""
    from tqdm.auto import tqdm

    model = student.model
    model.eval()
    device = next(model.parameters()).device
    order = rows.longest_first()
    out = []
    bar = tqdm(total=len(order), desc="predict", unit="question", disable=None if progress else True, leave=False)
    for s in range(0, len(order), batch_size):
        batch = student.collate([rows[i] for i in order[s : s + batch_size]])
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ROW_EXTRAS}
        out.append(torch.softmax(student.logits(inputs).float(), -1).cpu())
        bar.update(len(out[-1]))
    bar.close()
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    probs = torch.cat(out).numpy()
    result = np.empty_like(probs)
    result[order] = probs
    return result
