"""The multiple-choice example type, validation, and masks for a variable number of options."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probekd.errors import DataError


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question.

    `options` has K >= 2 entries (K varies across examples: ARC has 3 to 5); `answer` is the 0-based index of the
    right option, or None for an unlabelled example. `meta` keeps source details (file, line, original labels, subject).
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        where = self.meta.get("source") or f"example {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise DataError("example id must be a non-empty string", where)
        if not isinstance(self.question, str) or not self.question.strip():
            raise DataError(f"example {self.id!r} has an empty question", where)
        if len(self.options) < 2:
            raise DataError(f"example {self.id!r} has {len(self.options)} option(s); at least 2 are needed", where)
        for i, opt in enumerate(self.options):
            if not isinstance(opt, str):
                raise DataError(f"example {self.id!r} option {i} is not text: {opt!r}", where)
        if self.answer is not None and not (0 <= self.answer < len(self.options)):
            raise DataError(
                f"example {self.id!r} answer index {self.answer} is outside 0..{len(self.options) - 1}", where
            )

    @property
    def k(self) -> int:
        """The number of options."""
        return len(self.options)

    @property
    def domain(self) -> str | None:
        """The question's domain (DDK's mixture is over domains): a `domain` field of the data, else MMLU's subject;
        None when the data has neither."""
        value = self.meta.get("domain", self.meta.get("subject"))
        return None if value is None else str(value)

    @property
    def labelled(self) -> bool:
        """Whether the gold answer is known."""
        return self.answer is not None


def check_unique_ids(examples: Iterable[MCQExample]) -> None:
    """Raise a DataError naming both places if two examples share an id (ids key every artifact downstream)."""
    seen: dict[str, MCQExample] = {}
    for ex in examples:
        if ex.id in seen:
            first = seen[ex.id].meta.get("source", "?")
            raise DataError(f"duplicate example id {ex.id!r} (first seen at {first})", ex.meta.get("source"))
        seen[ex.id] = ex


def option_mask(examples: Sequence[MCQExample], k: int | None = None) -> np.ndarray:
    """A boolean [N, K] mask, True where the option exists; K defaults to the largest option count."""
    k = k if k is not None else max((ex.k for ex in examples), default=0)
    mask = np.zeros((len(examples), k), dtype=bool)
    for i, ex in enumerate(examples):
        if ex.k > k:
            raise DataError(f"example {ex.id!r} has {ex.k} options, more than K={k}", ex.meta.get("source"))
        mask[i, : ex.k] = True
    return mask


def answers_array(examples: Sequence[MCQExample]) -> np.ndarray:
    """Gold answer indices as int64, with -1 for unlabelled examples."""
    return np.array([-1 if ex.answer is None else ex.answer for ex in examples], dtype=np.int64)


def split_stats(examples: Sequence[MCQExample]) -> dict[str, Any]:
    """`{"n": int, "labelled": int, "options": {"<K>": count}}` for one split, options sorted by K."""
    counts = Counter(ex.k for ex in examples)
    return {
        "n": len(examples),
        "labelled": sum(ex.labelled for ex in examples),
        "options": {str(k): counts[k] for k in sorted(counts)},
    }
