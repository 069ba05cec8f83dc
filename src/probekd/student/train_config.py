"""How a student is trained: the typed `train:` section of a run configuration (identical for every signal).

Kept apart from the trainer so that reading a configuration does not import `transformers`."""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from probekd import losses
from probekd.weighting import WeightingConfig

# the arguments every loss takes from the trainer, and the per-example data a loss may take from Python callers
# (nkd's `target_index`); `loss_options` may set only the others
_TRAINER_ARGS = {"student_logits", "target_probs", "mask", "temperature", "target_index"}


def check_loss(v: str) -> str:
    """A registered loss name or a two-stage `first>second`; anything else is a ValueError listing the losses."""
    parts = v.split(">")
    if len(parts) > 2 or any(x not in losses.names() for x in parts):
        raise ValueError(f"{v!r} is not a loss or `first>second`; losses: {', '.join(losses.names())}")
    return v


def loss_parameters(name: str) -> set[str]:
    """The keyword options a registered loss takes beyond the trainer's arguments."""
    return set(inspect.signature(losses.get(name)).parameters) - _TRAINER_ARGS


def check_loss_options(loss: str, options: dict[str, Any]) -> None:
    """A ValueError naming the options that a stage of `loss` (`name` or `first>second`) does not take."""
    for name in loss.split(">"):
        bad = sorted(set(options) - loss_parameters(name))
        if bad:
            known = ", ".join(sorted(loss_parameters(name))) or "none"
            raise ValueError(f"loss_options {bad} are not options of loss {name!r} (its options: {known})")


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
    min_steps: int = Field(
        0,
        ge=0,
        description="At least this many optimizer steps: a small labelled share trains more epochs, so every "
        "fraction of a grid gets the optimization budget of the one the recipe was tuned at; 0 = `epochs` alone.",
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear warm-up, then linear decay).")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step (micro-batch x accumulation).")
    grad_accum: int = Field(1, ge=1, description="Gradient-accumulation micro-batches per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with a linear warm-up.")
    eval_batch_size: int = Field(32, ge=1, description="Examples per forward pass when predicting.")
    group_by_length: bool = Field(
        True, description="Batch training rows of similar length (less padding; random within groups of ~4 batches)."
    )
    mixup: float = Field(
        0.0,
        ge=0,
        description="Mixup in the bi-encoder's embedding space (`probekd.student.mixup`): the Beta(a, a) parameter of "
        "the mixing weight, drawn once per batch; 0 = off. Only with `student.head: biencoder`.",
    )
    hidden_match: float = Field(
        0.0,
        ge=0,
        description="Weight of the hidden-state matching term (`probekd.student.hidden_match`): the bi-encoder's "
        "option embeddings, through a learned projection, matched to the teacher's cached states at the probe's "
        "chosen layer; 0 = off. Only with `student.head: biencoder`, and where RUN/teacher/train/ is.",
    )
    hidden_match_loss: Literal["mse", "cosine", "mi_alpha"] = Field(
        "mse", description="The matching term: `mse`, `cosine` (1 - cosine), or `mi_alpha` (minus Poole et al.'s "
        "interpolated MI bound, Distiller's MI-alpha)."
    )  # fmt: skip
    hidden_match_alpha: float = Field(
        0.5, ge=0, le=1, description="`mi_alpha`'s interpolation: 1 = leave-one-out InfoNCE, 0 = NWJ."
    )
    lelp: float = Field(
        0.0,
        ge=0,
        description="Weight of LELP's pseudo-subclass term (`probekd.student.lelp`): an extra head on the bi-encoder's "
        "option embeddings learns the distribution over subclasses split from the teacher's cached states along "
        "their principal directions outside the probe's; 0 = off. Only with `student.head: biencoder`, where "
        "RUN/teacher/train/ is and the grid makes the probe's targets of the cell's labels.",
    )
    lelp_directions: int = Field(
        2, ge=1, description="LELP: principal directions S; each option splits into 2S pseudo-subclasses."
    )
    lelp_temperature: float = Field(
        1.0, gt=0, description="LELP: temperature of the subclass softmax (projections in standard deviations)."
    )
    bf16: bool = Field(False, description="bfloat16 mixed precision (only on hardware with native bf16).")
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)  # type: ignore[arg-type]
    loss_options: dict[str, float] = Field(
        {},
        description="Keyword options of the loss beyond the temperature, e.g. {eps: 1.0e-3} for `rkl`, {beta: 0.3} "
        "for `js`, {head_mass: 0.7} for `akl` (see `probekd.losses`); each must be a parameter of the loss (of both "
        "stages of `first>second`).",
    )
    report_to: list[str] = Field(
        [],
        description="Trackers that receive the trainer's logs (tensorboard, mlflow, trackio, wandb: any installed "
        "`transformers` integration). TensorBoard writes under RUN/logs/<cell>/; the others follow their own "
        "settings (environment variables). Empty: none (the logs still go to RUN/logs/<cell>.jsonl).",
    )

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return check_loss(v)

    @model_validator(mode="after")
    def _options_fit_the_loss(self) -> TrainConfig:
        check_loss_options(self.loss, self.loss_options)
        return self

    def epochs_for(self, steps_per_epoch: int) -> float:
        """The epochs a student with `steps_per_epoch` optimizer steps per epoch trains: `epochs`, or more when
        that is fewer than `min_steps` steps."""
        return max(self.epochs, self.min_steps / steps_per_epoch) if self.min_steps else self.epochs

    def total_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps of a student with `steps_per_epoch` steps per epoch: `min_steps` when it binds (the
        trainer gets it as `max_steps`), else ceil(epochs x steps per epoch), as `Trainer` counts them."""
        if self.min_steps and self.min_steps > self.epochs * steps_per_epoch:
            return self.min_steps
        return math.ceil(self.epochs * steps_per_epoch)

    def first_changed_step(self, weighting: str, steps_per_epoch: int) -> int | None:
        """Optimizer steps a student with this loss and `weighting` trains exactly like the forward-KL, unweighted
        one of the same cell (same data order): 0 for a different loss from the start, the switch of `fkl>...`, the
        weighting's warm-up; None when it is that default. A model kept (best dev epoch) at or before this step is
        the default's model, so it says nothing about the variant."""
        max_steps = self.total_steps(steps_per_epoch)
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
