"""Free-form problems (graded by their final answer) and the built-in free-form tasks.

- `gsm8k`: GSM8K's train and test files (shipped in `probekd/data/builtin/gsm8k`); dev is carved from train by the
  same fixed hash as MMLU's and AQuA's partitions (10% of train), so train + dev = 7473 and test = 1319. The worked
  solutions lose their calculator annotations (`<<48/2=24>>`), which no model writes on its own.
- `aqua_rat`: AQuA-RAT with its rationales; the options are part of the question, the answer is the letter. The
  same partition as the multiple-choice task `aqua_rat` (dev 20% of the dev file, train the rest, the official
  test), so a problem has the same id and split in both tracks.
- `arith:steps=S,digits=D` (also `n_train`, `n_dev`, `n_test`, `seed`): synthetic multi-step arithmetic, "Start with
  47. Add 23. Multiply by 3. ...", with a worked solution, one line per step. Steps and digits place the task at a
  chosen difficulty, so that a small student's pass rates spread (it solves almost nothing of GSM8K). Generated
  deterministically from the parameters; each split from its own random stream.

Every worked solution ends in the answer line `#### <answer>`, the line the solve prompt asks for.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from probekd.data.formats import iter_json_records
from probekd.data.tasks import SPLITS, builtin_root, hash_partition
from probekd.errors import DataError
from probekd.generative.grading import ANSWER_MARK, AnswerKind, canonical


@dataclass(frozen=True)
class Problem:
    """One free-form problem. `answer` is the gold final answer as text (a number, or a letter for `kind ==
    "letter"`), None when unlabelled; `rationale` a worked solution ending in `#### <answer>`, when known."""

    id: str
    question: str
    answer: str | None
    kind: AnswerKind = "number"
    rationale: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        where = self.meta.get("source") or f"problem {self.id!r}"
        if not self.id:
            raise DataError("problem id must be a non-empty string", where)
        if not self.question.strip():
            raise DataError(f"problem {self.id!r} has an empty question", where)
        if self.answer is not None:
            try:
                canonical(self.answer, self.kind)
            except ValueError as e:
                raise DataError(f"problem {self.id!r}: {e}", where) from None

    @property
    def labelled(self) -> bool:
        return self.answer is not None


@dataclass
class ProblemSet:
    """A free-form task's problems by split."""

    name: str
    splits: dict[str, list[Problem]]


_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_problem(obj: dict[str, Any], where: str, pid: str) -> Problem:
    """A GSM8K record `{"question", "answer"}` (a worked solution ending in `#### <number>`) as a Problem."""
    solution = obj.get("answer")
    if not isinstance(solution, str) or ANSWER_MARK not in solution:
        raise DataError(f"field 'answer' must be a worked solution ending in '{ANSWER_MARK} <number>'", where)
    body, gold = solution.rsplit(ANSWER_MARK, 1)
    rationale = _CALCULATOR.sub("", body).rstrip() + f"\n{ANSWER_MARK} {gold.strip()}"
    return Problem(pid, str(obj.get("question", "")), gold.strip(), "number", rationale, {"source": where})


def _shipped(task: str, split: str, make: Callable[[dict[str, Any], str, str], Problem]) -> list[Problem]:
    """The problems of a shipped split file, ids `<task>/<split>:<line>` (as the multiple-choice loader makes
    them, so that AQuA's problems have the same ids in both tracks)."""
    path = builtin_root() / task / f"{split}.jsonl"
    return [make(obj, where, f"{task}/{split}:{n}") for where, n, obj in iter_json_records(path)]


def _load_gsm8k() -> ProblemSet:
    train, test = _shipped("gsm8k", "train", gsm8k_problem), _shipped("gsm8k", "test", gsm8k_problem)
    parts = hash_partition(train, "gsm8k/train", {"dev": 0.1, "train": 0.9})
    return ProblemSet("gsm8k", {"train": parts["train"], "dev": parts["dev"], "test": test})


def aqua_problem(obj: dict[str, Any], where: str, pid: str) -> Problem:
    """An AQuA-RAT record as a Problem: the question followed by its lettered options; the answer is the letter;
    the rationale gets the answer line."""
    options = obj.get("options")
    if not isinstance(options, list) or not options:
        raise DataError("field 'options' must be a non-empty list", where)
    question = str(obj.get("question", "")).strip() + "\nOptions: " + " ".join(str(o).strip() for o in options)
    gold = str(obj.get("correct", "")).strip()
    rationale = obj.get("rationale")
    if isinstance(rationale, str):
        rationale = rationale.rstrip() + f"\n{ANSWER_MARK} {gold}"
    return Problem(pid, question, gold or None, "letter", rationale, {"source": where})


def _load_aqua() -> ProblemSet:
    dev, test = _shipped("aqua_rat", "dev", aqua_problem), _shipped("aqua_rat", "test", aqua_problem)
    parts = hash_partition(dev, "aqua_rat/dev", {"dev": 0.2, "train": 0.8})
    return ProblemSet("aqua_rat", {"train": parts["train"], "dev": parts["dev"], "test": test})


ARITH_DEFAULTS: dict[str, int] = {"steps": 3, "digits": 2, "n_train": 2000, "n_dev": 200, "n_test": 500, "seed": 0}
_OPS = ("add", "subtract", "multiply")


def arith_problem(rng: random.Random, steps: int, digits: int, pid: str) -> Problem:
    """One synthetic problem: a start number of `digits` digits, then `steps` operations (add or subtract a number of
    `digits` digits, or multiply by 2-9), with the worked solution one step a line."""
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    value = rng.randint(lo, hi)
    words, lines = [f"Start with {value}."], []
    for _ in range(steps):
        op = rng.choice(_OPS)
        n = rng.randint(2, 9) if op == "multiply" else rng.randint(lo, hi)
        new = value + n if op == "add" else value - n if op == "subtract" else value * n
        words.append(f"{'Add' if op == 'add' else 'Subtract' if op == 'subtract' else 'Multiply by'} {n}.")
        lines.append(f"{value} {'+' if op == 'add' else '-' if op == 'subtract' else '*'} {n} = {new}")
        value = new
    words.append("What number do you get?")
    rationale = "\n".join([*lines, f"{ANSWER_MARK} {value}"])
    return Problem(pid, " ".join(words), str(value), "number", rationale, {"steps": steps, "digits": digits})


def parse_arith(name: str) -> dict[str, int]:
    """The parameters of `arith[:key=value,...]` (steps, digits, n_train, n_dev, n_test, seed), defaults filled in."""
    params = dict(ARITH_DEFAULTS)
    spec = name.partition(":")[2]
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in params or not value.strip().isdigit():
            raise DataError(
                f"bad arith parameter {item!r} in {name!r}: expected key=integer with key in {', '.join(params)}"
            )
        params[key] = int(value)
    if params["steps"] < 1 or not 1 <= params["digits"] <= 9:
        raise DataError(f"arith needs steps >= 1 and 1 <= digits <= 9, got {name!r}")
    return params


def _load_arith(name: str) -> ProblemSet:
    p = parse_arith(name)
    tag = f"arith/s{p['steps']}d{p['digits']}seed{p['seed']}"
    splits = {}
    for split in SPLITS:
        rng = random.Random(f"{tag}/{split}")
        splits[split] = [
            arith_problem(rng, p["steps"], p["digits"], f"{tag}/{split}:{i}") for i in range(p[f"n_{split}"])
        ]
    return ProblemSet(name, splits)


FREEFORM_TASKS: dict[str, tuple[str, Callable[[str], ProblemSet]]] = {
    "gsm8k": ("GSM8K grade-school math, free-form numbers; dev 10% of train by hash (MIT)", lambda _: _load_gsm8k()),
    "aqua_rat": ("AQuA-RAT with rationales, graded by the option letter (Apache-2.0)", lambda _: _load_aqua()),
    "arith": (
        "synthetic multi-step arithmetic, `arith:steps=S,digits=D` (defaults 3 and 2), graded difficulty",
        _load_arith,
    ),
}


def is_freeform(name: str) -> bool:
    """Whether `name` names a built-in free-form task (`aqua_rat` is both: multiple-choice and free-form)."""
    return name.partition(":")[0] in FREEFORM_TASKS


def load_problems(name: str) -> ProblemSet:
    """A built-in free-form task's problems by split; ids are unique across splits."""
    base = name.partition(":")[0]
    if base not in FREEFORM_TASKS:
        raise DataError(f"unknown free-form task {name!r}; expected one of {', '.join(FREEFORM_TASKS)}")
    if base != "arith" and ":" in name:
        raise DataError(f"task {base!r} takes no parameters, got {name!r}")
    problems = FREEFORM_TASKS[base][1](name)
    seen = Counter(p.id for split in problems.splits.values() for p in split)
    dup = [i for i, c in seen.items() if c > 1]
    if dup:
        raise DataError(f"duplicate problem ids in {name!r}: {dup[:3]}")
    return problems


def problem_stats(problems: Sequence[Problem]) -> dict[str, Any]:
    """`{"n", "labelled", "with_rationale"}` for one split."""
    return {
        "n": len(problems),
        "labelled": sum(p.labelled for p in problems),
        "with_rationale": sum(p.rationale is not None for p in problems),
    }
