"""Built-in tasks: exact counts from the source README, a few exact examples, deterministic partitions; folders."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from probekd.data import load_task, split_stats
from probekd.data.tasks import TaskSpec, builtin_root, hash_partition
from probekd.errors import DataError


@pytest.mark.parametrize(
    ("task", "counts"),
    [
        ("arc_easy", {"train": 2251, "dev": 570, "test": 2376}),
        ("arc_challenge", {"train": 1119, "dev": 299, "test": 1170}),
    ],
)
def test_arc_counts(task: str, counts: dict) -> None:
    t = load_task(task)
    assert {s: len(v) for s, v in t.splits.items()} == counts
    assert all(e.labelled for e in t.all_examples())


def test_arc_easy_exact_examples() -> None:
    t = load_task("arc_easy")
    first = t.splits["train"][0]
    assert first.id == "Mercury_7220990"
    assert first.question == "Which factor will most likely cause a person to develop a fever?"
    assert first.options[1] == "a bacterial population in the bloodstream"
    assert first.answer == 1
    assert split_stats(t.splits["train"])["options"] == {"3": 6, "4": 2241, "5": 4}
    digit = next(e for e in t.splits["train"] if e.meta["labels"] == ["1", "2", "3", "4"])
    assert 0 <= digit.answer < 4


def test_mmlu_partition_is_stratified_and_complete() -> None:
    t = load_task("mmlu")
    n = {s: len(v) for s, v in t.splits.items()}
    assert sum(n.values()) == 14042 + 285
    assert n == {"train": 7313, "dev": 1400, "test": 5614}
    subjects = Counter(e.meta["subject"] for e in t.all_examples())
    assert len(subjects) == 57
    per_dev = Counter(e.meta["subject"] for e in t.splits["dev"])
    per_test_total = Counter(e.meta["subject"] for e in t.all_examples() if "/test:" in e.id)
    for subject, total in per_test_total.items():
        assert per_dev[subject] == round(0.1 * total)
    first = next(e for e in t.splits["train"] if e.id == "mmlu/anatomy/dev:2")
    assert first.meta["subject"] == "anatomy"
    assert len(first.options) == 4
    assert load_task("mmlu").splits["dev"][0].id == t.splits["dev"][0].id  # deterministic


def test_aqua_partition() -> None:
    t = load_task("aqua_rat")
    assert {s: len(v) for s, v in t.splits.items()} == {"train": 203, "dev": 51, "test": 254}
    assert all(e.k == 5 for e in t.all_examples())
    e = t.splits["test"][0]
    assert e.id == "aqua_rat/test:1"


def test_hash_partition_properties() -> None:
    exs = load_task("aqua_rat").splits["test"]
    parts = hash_partition(exs, "k", {"a": 0.25, "b": 0.25, "c": 0.5})
    ids = [e.id for p in parts.values() for e in p]
    assert sorted(ids) == sorted(e.id for e in exs)
    assert [len(p) for p in parts.values()] == [64, 64, 126]
    assert parts != hash_partition(exs, "other", {"a": 0.25, "b": 0.25, "c": 0.5})


def test_user_folder_in_ai2_format(tmp_path: Path) -> None:
    src = builtin_root() / "arc_easy"
    for split, alias in (("train", "train"), ("dev", "validation"), ("test", "test")):
        lines = (src / f"{split}.jsonl").read_text().splitlines()[:7]
        (tmp_path / f"{alias}.jsonl").write_text("\n".join(lines) + "\n")
    t = load_task(str(tmp_path))
    assert {s: len(v) for s, v in t.splits.items()} == {"train": 7, "dev": 7, "test": 7}


def test_user_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no split files in folder"):
        load_task(str(tmp_path))
    row = {"id": "same", "question": "q", "options": ["a", "b"], "answer": 0}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"duplicate example id 'same' \(first seen at .*train.jsonl:1\) at .*test"):
        load_task(str(tmp_path))
    (tmp_path / "dev.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "val.csv").write_text("question,A,B,answer\nq,a,b,A\n")
    with pytest.raises(DataError, match="several files for split 'dev'"):
        load_task(str(tmp_path))


def test_unknown_task_name() -> None:
    with pytest.raises(DataError, match="unknown task 'arc_eazy': not a built-in task"):
        load_task("arc_eazy")


def test_task_spec_forbids_unknown_fields() -> None:
    with pytest.raises(ValueError, match="colums"):
        TaskSpec(name="arc_easy", colums={})


def test_builtin_data_has_license_notes() -> None:
    root = builtin_root()
    text = (root / "README.md").read_text()
    for needle in ("CC BY-SA 4.0", "MIT", "Apache-2.0"):
        assert needle in text
    assert (root / "aqua_rat" / "LICENSE").is_file()
    assert shutil.disk_usage(root)  # the folder exists inside the installed package
