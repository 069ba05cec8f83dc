from __future__ import annotations

import numpy as np
import pytest

from probekd.data.examples import MCQExample, answers_array, check_unique_ids, option_mask, split_stats
from probekd.errors import DataError


def ex(i: str, k: int = 4, answer: int | None = 0) -> MCQExample:
    return MCQExample(i, f"question {i}?", tuple(f"opt{j}" for j in range(k)), answer, {"source": f"f.jsonl:{i}"})


def test_mask_and_answers_for_variable_k() -> None:
    exs = [ex("a", 3, 2), ex("b", 5, None), ex("c", 4, 1)]
    mask = option_mask(exs)
    assert mask.shape == (3, 5)
    assert mask.sum(axis=1).tolist() == [3, 5, 4]
    assert mask[0].tolist() == [True, True, True, False, False]
    assert answers_array(exs).tolist() == [2, -1, 1]
    with pytest.raises(DataError, match="has 5 options, more than K=4"):
        option_mask(exs, k=4)


def test_split_stats_counts() -> None:
    exs = [ex("a", 3), ex("b", 4, None), ex("c", 4), ex("d", 5)]
    assert split_stats(exs) == {"n": 4, "labelled": 3, "options": {"3": 1, "4": 2, "5": 1}}
    assert split_stats([]) == {"n": 0, "labelled": 0, "options": {}}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"options": ("only",)}, "has 1 option"),
        ({"answer": 4}, "answer index 4 is outside 0..3"),
        ({"answer": -1}, "answer index -1"),
        ({"question": "  "}, "empty question"),
        ({"id": ""}, "id must be a non-empty string"),
    ],
)
def test_invalid_examples_are_rejected(kwargs: dict, message: str) -> None:
    base = {"id": "x", "question": "q?", "options": ("a", "b", "c", "d"), "answer": 0, "meta": {"source": "t:3"}}
    with pytest.raises(DataError, match=message) as info:
        MCQExample(**(base | kwargs))
    assert "t:3" in str(info.value)


def test_duplicate_ids_name_both_places() -> None:
    with pytest.raises(DataError, match=r"duplicate example id 'a' \(first seen at f.jsonl:a\)"):
        check_unique_ids([ex("a"), ex("b"), MCQExample("a", "q", ("x", "y"), None, {"source": "g.jsonl:9"})])


def test_examples_are_hashable_values() -> None:
    assert ex("a") == ex("a")
    assert len({ex("a"), ex("a"), ex("b")}) == 2
    assert np.array_equal(option_mask([ex("a", 2)]), np.array([[True, True]]))
