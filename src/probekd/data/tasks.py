"""Named tasks and their train/dev/test splits; a user's folder or a Hugging Face dataset works wherever a name does.

Built-in tasks (shipped in `probekd/data/builtin`):
- `arc_easy`, `arc_challenge`: the official ARC splits (train / dev / test).
- `mmlu`: MMLU has no train split. Each subject's test questions are partitioned deterministically: questions are
  ranked by sha256 of `mmlu/<subject>/<row>`, the first 10% (rounded) go to dev, the next 40% to test, the rest to
  train; the 5 official dev questions of each subject are added to train (they are labelled, and are usually only
  used as few-shot exemplars). Stratified by subject, independent of library versions and of any seed.
- `aqua_rat`: only AQuA's dev and test files exist here. Dev is partitioned the same way (20% -> dev, 80% -> train);
  test is the official test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from probekd.data.examples import MCQExample, check_unique_ids
from probekd.data.formats import Columns, read_examples, read_hf
from probekd.errors import DataError

T = TypeVar("T")
SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"train": ("train",), "dev": ("dev", "validation", "val", "valid"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".csv")


class TaskSpec(BaseModel):
    """Where a task's examples come from: a built-in name, a folder of split files, or `hf:<dataset>`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="A built-in task (arc_easy, arc_challenge, mmlu, aqua_rat), a path to a folder with "
        "train/dev/test files (.jsonl, .json or .csv; `validation` or `val` for dev), or `hf:<dataset>`."
    )
    format: Literal["auto", "ai2", "mmlu", "aqua", "jsonl", "csv"] = Field(
        "auto", description="File format of a folder's files; `auto` detects it from each file."
    )
    columns: Columns | None = Field(None, description="Field mapping for generic JSON/CSV files and HF datasets.")
    hf_config: str | None = Field(None, description="Configuration name of a Hugging Face dataset.")
    hf_splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"},
        description="probekd split -> Hugging Face split name; a split missing in the dataset is skipped.",
    )
    data_files: dict[str, str] | None = Field(
        None, description="For an HF builder such as `hf:json`: HF split name -> local file."
    )


@dataclass
class Task:
    """A task's examples by split (`train`, `dev`, `test`; a split may be absent)."""

    name: str
    splits: dict[str, list[MCQExample]] = field(default_factory=dict)

    def all_examples(self) -> list[MCQExample]:
        return [ex for split in self.splits.values() for ex in split]


def builtin_root() -> Path:
    """The folder of the benchmark files shipped with the package."""
    return Path(str(resources.files("probekd.data") / "builtin"))


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hash_partition(examples: list[T], key: str, fractions: dict[str, float]) -> dict[str, list[T]]:
    """Split examples deterministically: rank by sha256(f"{key}/{position}"), cut by `fractions` in order.

    The last split gets the remainder; within each split the original file order is kept.
    """
    order = sorted(range(len(examples)), key=lambda i: _rank(f"{key}/{i}"))
    names = list(fractions)
    out: dict[str, list[int]] = {n: [] for n in names}
    start = 0
    for n in names[:-1]:
        take = round(fractions[n] * len(examples))
        out[n] = order[start : start + take]
        start += take
    out[names[-1]] = order[start:]
    return {n: [examples[i] for i in sorted(idx)] for n, idx in out.items()}


def _load_arc(folder: str) -> Task:
    root = builtin_root() / folder
    return Task(folder, {s: read_examples(root / f"{s}.jsonl", "ai2") for s in SPLITS})


def _load_mmlu() -> Task:
    root = builtin_root() / "mmlu"
    splits: dict[str, list[MCQExample]] = {s: [] for s in SPLITS}
    for f in sorted((root / "test").glob("*_test.csv")):
        subject = f.name.removesuffix("_test.csv")
        test = read_examples(f, "mmlu", id_prefix=f"mmlu/{subject}/test:", meta={"subject": subject})
        parts = hash_partition(test, f"mmlu/{subject}", {"dev": 0.1, "test": 0.4, "train": 0.5})
        dev_file = root / "dev" / f"{subject}_dev.csv"
        shots = read_examples(dev_file, "mmlu", id_prefix=f"mmlu/{subject}/dev:", meta={"subject": subject})
        splits["train"] += shots + parts["train"]
        splits["dev"] += parts["dev"]
        splits["test"] += parts["test"]
    return Task("mmlu", splits)


def _load_aqua() -> Task:
    root = builtin_root() / "aqua_rat"
    dev = read_examples(root / "dev.jsonl", "aqua", id_prefix="aqua_rat/dev:")
    parts = hash_partition(dev, "aqua_rat/dev", {"dev": 0.2, "train": 0.8})
    test = read_examples(root / "test.jsonl", "aqua", id_prefix="aqua_rat/test:")
    return Task("aqua_rat", {"train": parts["train"], "dev": parts["dev"], "test": test})


BUILTIN_TASKS = {
    "arc_easy": ("ARC-Easy grade-school science, 3-5 options (CC BY-SA 4.0)", lambda: _load_arc("arc_easy")),
    "arc_challenge": ("ARC-Challenge, harder science questions (CC BY-SA 4.0)", lambda: _load_arc("arc_challenge")),
    "mmlu": ("MMLU, 57 subjects, 4 options; train/dev/test partition of the test set (MIT)", _load_mmlu),
    "aqua_rat": ("AQuA-RAT algebra word problems, 5 options; train/dev from the dev file (Apache-2.0)", _load_aqua),
}


def list_tasks() -> dict[str, str]:
    """Built-in task names and one-line descriptions."""
    return {name: desc for name, (desc, _) in BUILTIN_TASKS.items()}


def _load_folder(folder: Path, spec: TaskSpec) -> Task:
    splits: dict[str, list[MCQExample]] = {}
    for split, aliases in SPLIT_ALIASES.items():
        found = [folder / f"{a}{s}" for a in aliases for s in FILE_SUFFIXES if (folder / f"{a}{s}").is_file()]
        if len(found) > 1:
            raise DataError(f"several files for split {split!r}: {[p.name for p in found]}", str(folder))
        if found:
            splits[split] = read_examples(found[0], spec.format, spec.columns)
    if not splits:
        names = ", ".join(f"{a}{s}" for a in ("train", "dev", "test") for s in FILE_SUFFIXES)
        raise DataError(f"no split files in folder (looked for {names})", str(folder))
    return Task(folder.name, splits)


def _load_hf(spec: TaskSpec) -> Task:
    path = spec.name.removeprefix("hf:")
    columns = spec.columns or Columns()
    splits = {}
    for split, hf_split in spec.hf_splits.items():
        if spec.data_files is not None and hf_split not in spec.data_files:
            continue
        splits[split] = read_hf(
            path,
            name=spec.hf_config,
            split=hf_split,
            columns=columns,
            data_files=spec.data_files,
            id_prefix=f"{path}/{hf_split}:",
        )
    return Task(path, splits)


def load_task(spec: TaskSpec | str) -> Task:
    """Load every split of a task and check that example ids are unique across splits."""
    spec = TaskSpec(name=spec) if isinstance(spec, str) else spec
    if spec.name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec.name][1]()
    elif spec.name.startswith("hf:"):
        task = _load_hf(spec)
    elif Path(spec.name).is_dir():
        task = _load_folder(Path(spec.name), spec)
    else:
        from probekd.generative.problems import is_freeform

        if is_freeform(spec.name):
            raise DataError(
                f"{spec.name!r} is a free-form task (graded by its final answer), not a multiple-choice one: "
                "it has no options to extract, probe or score; use it with `probekd rollouts` "
                "(`probekd data stats` lists its splits)"
            )
        raise DataError(
            f"unknown task {spec.name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}), "
            "not an existing folder, and not hf:<dataset>"
        )
    check_unique_ids(task.all_examples())
    return task
