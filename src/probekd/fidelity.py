"""Fidelity: how closely a student follows a reference model (its teacher, the probe), beside how often it is right.

"On the Generalization vs Fidelity Paradox in Knowledge Distillation" (2025) finds that a distilled student can
gain accuracy while agreeing little with its teacher: accuracy alone does not say whether the student learned the
teacher's judgement or only regularization. Three numbers per reference r, on the labelled test questions:

- `agreement`: the share of questions on which the student's top option is r's top option;
- `wrong_fidelity`: among the questions that both get wrong, the share on which they choose the same wrong option
  (a student that copies its reference's mistakes is faithful to it; one that errs elsewhere learned something
  else; NaN when no question is wrong for both);
- `kl`: the mean over questions of KL(r || student) over the question's options, in nats (0: the same
  distribution).

The teacher's distribution is the softmax of its answer scores over the valid options at temperature 1 (its own
answer, before any fitted temperature or calibration); the probe's is its test probabilities.
"""

from __future__ import annotations

import numpy as np


def fidelity(student: np.ndarray, reference: np.ndarray, answers: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """`agreement`, `wrong_fidelity` and `kl` of `student` [N, K] to `reference` [N, K] on the rows with a gold
    answer (`answers` >= 0); `mask` [N, K] marks each row's valid options."""
    if not student.shape == reference.shape == mask.shape or len(answers) != len(mask):
        raise ValueError(f"shapes differ: student {student.shape}, reference {reference.shape}, mask {mask.shape}, "
                         f"answers {answers.shape}")  # fmt: skip
    lab = answers >= 0
    s, r, m, y = student[lab], reference[lab], mask[lab], answers[lab]
    s_top = np.where(m, s, -np.inf).argmax(1)
    r_top = np.where(m, r, -np.inf).argmax(1)
    both_wrong = (s_top != y) & (r_top != y)
    logs = np.log(np.clip(s, 1e-12, None))
    logr = np.log(np.clip(r, 1e-12, None))
    kl = np.where(m & (r > 0), r * (logr - logs), 0.0).sum(1)
    return {
        "agreement": float((s_top == r_top).mean()) if len(y) else float("nan"),
        "wrong_fidelity": float((s_top == r_top)[both_wrong].mean()) if both_wrong.any() else float("nan"),
        "kl": float(kl.mean()) if len(y) else float("nan"),
    }
