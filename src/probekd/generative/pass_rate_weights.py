"""PACED weights of solution sequences from the student's rollouts, refreshed during training.

The multiple-choice callback (`probekd.student.callbacks.PassRateWeights`) already does the bookkeeping: weights
written into the rows that the data loader reads, a refresh every `refresh_epochs` after `warmup_epochs`, the
weights in force saved in every checkpoint and restored on resume. Here only where the pass rates come from
differs: K sampled rollouts of the student as it is at that step, graded (a rollout cache per refresh, so a resumed
run reads the same rollouts instead of sampling new ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from probekd.student.callbacks import PassRateWeights
from probekd.weighting import WeightingConfig, normalize, scheme_weights

log = logging.getLogger(__name__)


class RolloutPassRateWeights(PassRateWeights):
    """`PassRateWeights` for sequence rows: `pass_rates(model, step)` gives the rows' pass rates from rollouts of
    the student at optimizer step `step`. Weights that would all be 0 (the student now solves every problem always
    or never) leave the previous ones in force, with a warning.

    `pass_rates` may also change the rows' solutions (an on-policy source trains on the rollouts it samples); with
    `replay_on_resume`, a resumed run calls it again for every refresh before the checkpoint, in order (their
    rollouts are cached, so nothing is sampled), so that the rows hold the solutions an uninterrupted run would."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        pass_rates: Callable[[Any, int], np.ndarray],
        cfg: WeightingConfig,
        steps_per_epoch: int,
        seed: int,
        *,
        replay_on_resume: bool = False,
    ) -> None:
        super().__init__(rows, lambda: np.zeros((len(rows), 0)), cfg, steps_per_epoch, seed)
        self.pass_rates = pass_rates
        self.replay_on_resume = replay_on_resume

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        super().on_train_begin(args, state, control, model=model, **kw)
        if self.replay_on_resume and state.global_step > 0:
            for st in self.stats:  # each refresh's cached rollouts put back into the rows, as they came
                if st["step"] > 0:
                    self.weights_at(model, st["step"])

    def weights_at(self, model: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
        was_training = model.training
        model.eval()
        try:
            p = self.pass_rates(model, step)
        finally:
            model.train(was_training)
        raw = scheme_weights(self.cfg, p)
        if raw.sum() <= 0:
            log.warning("step %d: every problem has weight 0 (pass rates all 0 or 1); the previous weights stay", step)
            return np.array([row["weights"] for row in self.rows], dtype=np.float64), p
        return normalize(raw), p

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step < state.max_steps:  # weights after the last step would train nothing: no rollouts
            super().on_step_end(args, state, control, model=model, **kw)
