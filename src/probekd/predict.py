"""Answering questions with a kept student (`probekd predict`, `probekd.load_student(...).predict`).

Predictions are made exactly as the run evaluated the student (same inputs, batches of similar length, the same
batch size by default, argmax ties to the first option), so its accuracy on the run's test questions equals the
cell's `metrics.json`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probekd.atomic import write_text
from probekd.data.examples import MCQExample, answers_array, option_mask
from probekd.errors import DataError, ProbekdError
from probekd.evaluate import bootstrap_ci
from probekd.student.heads import Student
from probekd.student.kept import KeptManifest, load_kept


def option_labels(ex: MCQExample) -> list[str]:
    """The labels of an example's options as its file wrote them (`A`..., `1`...), else letters."""
    labels = ex.meta.get("labels")
    if isinstance(labels, list | tuple) and len(labels) == ex.k and all(isinstance(x, str) and x for x in labels):
        return list(labels)
    return list(string.ascii_uppercase[: ex.k])


def as_example(q: MCQExample | dict[str, Any], n: int) -> MCQExample:
    """A question given as an `MCQExample` or a dict with `question`, `options` and optional `id`, `answer` (an
    option index)."""
    if isinstance(q, MCQExample):
        return q
    if not isinstance(q, dict) or "question" not in q or "options" not in q:
        raise DataError("a question is an MCQExample or a dict with 'question' and 'options'", f"question {n}")
    return MCQExample(
        str(q.get("id", n)), q["question"], tuple(q["options"]), q.get("answer"), {"source": f"question {n}"}
    )


@dataclass(frozen=True)
class Prediction:
    """One answered question: the chosen option's label and index, and the probabilities of its options in the
    question's order."""

    id: str
    prediction: str
    index: int
    probs: list[float]
    answer: int | None = None

    def record(self) -> dict[str, Any]:
        """The JSON line of `probekd predict --out`."""
        return {"id": self.id, "prediction": self.prediction, "probs": self.probs}


class KeptStudent:
    """A kept student loaded for answering questions: `predict` on examples or dicts, `probabilities` as an array."""

    def __init__(self, folder: Path | str, device: str = "cpu") -> None:
        self.folder = Path(folder)
        self.student, self.manifest = load_kept(self.folder, device)

    @property
    def info(self) -> KeptManifest:
        """Its `probekd.json`: kind, prompt, number of options, provenance and metrics."""
        return self.manifest

    def probabilities(
        self, questions: Sequence[MCQExample | dict[str, Any]], batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Option probabilities [N, K] (K = the student's option count; 0 past a question's options)."""
        examples = [as_example(q, n) for n, q in enumerate(questions)]
        return predict_probs(self.student, examples, batch_size or self.manifest.eval_batch_size, progress)

    def predict(
        self, questions: Sequence[MCQExample | dict[str, Any]], batch_size: int | None = None, progress: bool = False
    ) -> list[Prediction]:
        """One `Prediction` per question, in order."""
        examples = [as_example(q, n) for n, q in enumerate(questions)]
        probs = predict_probs(self.student, examples, batch_size or self.manifest.eval_batch_size, progress)
        return predictions(examples, probs)


def check_examples(student: Student, examples: Iterable[MCQExample]) -> None:
    """Refuse questions the student cannot answer: more options than it was trained for, an empty option text."""
    for ex in examples:
        where = ex.meta.get("source") or f"question {ex.id!r}"
        if ex.k > student.k:
            raise DataError(
                f"question {ex.id!r} has {ex.k} options; this student was trained for at most {student.k}", where
            )
        empty = [i for i, o in enumerate(ex.options) if not o.strip()]
        if empty:
            raise DataError(f"question {ex.id!r} has no text for option(s) {empty}", where)


def predict_probs(
    student: Student, examples: list[MCQExample], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """The student's option probabilities [N, K] on `examples` (checked first, `check_examples`)."""
    from probekd.student.train import Rows, predict

    check_examples(student, examples)
    if not examples:
        return np.zeros((0, student.k), dtype=np.float32)
    rows = Rows([student.encode(ex) for ex in examples], option_mask(examples, student.k), answers_array(examples))
    return predict(student, rows, batch_size, progress=progress)


def predictions(examples: list[MCQExample], probs: np.ndarray) -> list[Prediction]:
    """`Prediction`s from probabilities [N, K] (argmax, ties to the first option)."""
    out = []
    for ex, p in zip(examples, probs, strict=True):
        i = int(np.argmax(p))
        out.append(Prediction(ex.id, option_labels(ex)[i], i, [float(x) for x in p[: ex.k]], ex.answer))
    return out


def accuracy(examples: list[MCQExample], probs: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """Accuracy on the labelled questions with its 95% bootstrap interval (None when none is labelled): the same
    computation as a grid cell's `metrics.json`."""
    answers = answers_array(examples)
    lab = answers >= 0
    if not lab.any():
        return None
    acc, lo, hi = bootstrap_ci(probs[lab].argmax(1) == answers[lab], seed=seed)
    return {"accuracy": acc, "accuracy_ci": [lo, hi], "n": int(lab.sum())}


def write_predictions(path: Path, preds: list[Prediction]) -> None:
    """One JSON line per question (`Prediction.record`), written atomically."""
    write_text(path, "".join(json.dumps(p.record()) + "\n" for p in preds))


def load_questions(
    task: str | None, split: str, file: Path | None, fmt: str = "auto", columns: Any = None, limit: int | None = None
) -> tuple[list[MCQExample], str]:
    """The questions to answer, from a task's split or from one file, and a description of where they came from."""
    if (task is None) == (file is None):
        raise ProbekdError("give either --task (with --split) or --file")
    if file is not None:
        from probekd.data.formats import read_examples

        examples, source = read_examples(Path(file), fmt, columns), str(file)
    else:
        from probekd.data import load_task
        from probekd.data.tasks import TaskSpec

        loaded = load_task(TaskSpec(name=task, format=fmt, columns=columns))  # type: ignore[arg-type]
        if split not in loaded.splits:
            raise ProbekdError(f"task {task!r} has no split {split!r}; it has {', '.join(loaded.splits)}")
        examples, source = loaded.splits[split], f"{task} {split}"
    if limit is not None:
        examples = examples[:limit]
        source += f" (first {limit})"
    return examples, source
