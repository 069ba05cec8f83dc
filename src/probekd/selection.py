"""Which training questions get labelled at a given budget: at random, or by coverage of the teacher's judgement.

`random` (the default): the first ceil(fraction x N) labelled rows in an order drawn from the seed
(`probekd.targets.labelled_subset`).

`pcoreset` ("Effective Active Learning through Knowledge Distillation from Vision-Language Models", PCoreSet, 2025):
choose the questions that cover the teacher's *probability space* rather than its input space, so that the
labelled set spans the kinds of judgement the teacher makes (confident right, confident on another option, torn
between two, flat) instead of repeating the most common kind. Greedy k-center (farthest-first traversal) on p_i,
the teacher's answer distribution over question i's options (softmax of its cached answer scores, padded with
zeros to K options): start from the question the seed's random order puts first, then repeatedly add the question
farthest (in Euclidean distance) from every question chosen so far. The traversal order is computed once per seed;
a fraction takes its first ceil(fraction x N) questions, so the subsets are nested as the fraction grows, as for
`random`.
No label is read: the choice uses the teacher's unlabelled answers only (ties go to the lower row index).

What this module does not do: the paper also trains the student in rounds and selects with the student's
probabilities; here the teacher's cached answers stand in for them, which is what a one-shot labelling budget allows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from probekd.errors import ProbekdError
from probekd.targets import seeded_order

Selection = Literal["random", "pcoreset"]


def farthest_first_order(points: np.ndarray, start: int) -> np.ndarray:
    """Row indices of `points` [N, D] in farthest-first traversal order from row `start`: each next row is the one
    whose distance to its nearest chosen row is largest (ties: the lowest index)."""
    n = len(points)
    order = np.empty(n, dtype=np.int64)
    nearest = np.full(n, np.inf)
    chosen = np.zeros(n, dtype=bool)
    current = start
    for step in range(n):
        order[step] = current
        chosen[current] = True
        nearest = np.minimum(nearest, np.linalg.norm(points - points[current], axis=1))
        if step + 1 < n:
            current = int(np.argmax(np.where(chosen, -1.0, nearest)))
    return order


def pcoreset_subset(ids: list[str], probs: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which of the rows `ids` (with teacher probabilities `probs` [N, K]) are labelled at `fraction` (bool [N]):
    the first ceil(fraction N) rows of the farthest-first order that starts at the row drawn from `seed`."""
    if not 0 < fraction <= 1:
        raise ProbekdError(f"a labelled fraction must be in (0, 1], got {fraction}")
    if len(ids) != len(probs):
        raise ProbekdError(f"{len(ids)} ids but {len(probs)} probability rows")
    keep = np.zeros(len(ids), dtype=bool)
    if not ids:
        return keep
    start = seeded_order(ids, seed)[0]  # the question `random` would label first
    n = int(np.ceil(fraction * len(ids) - 1e-9))
    keep[farthest_first_order(np.asarray(probs, dtype=np.float64), start)[:n]] = True
    return keep
