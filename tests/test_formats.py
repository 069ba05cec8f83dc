"""Readers on small hand-written files: the right examples, and errors that name the file, line and problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probekd.data.formats import Columns, detect_format, read_examples, read_hf
from probekd.errors import DataError


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def ai2(i: str, labels: str = "ABCD", key: str = "B") -> dict:
    choices = [{"text": f"choice {c}", "label": c} for c in labels]
    return {"id": i, "question": {"stem": f"stem {i}", "choices": choices}, "answerKey": key}


def test_ai2_letters_and_digits(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "train.jsonl", [ai2("q1"), ai2("q2", "1234", "3"), ai2("q3", "ABC", "C")])
    assert detect_format(f) == "ai2"
    exs = read_examples(f)
    assert [e.id for e in exs] == ["q1", "q2", "q3"]
    assert [e.answer for e in exs] == [1, 2, 2]
    assert [e.k for e in exs] == [4, 4, 3]
    assert exs[1].meta["labels"] == ["1", "2", "3", "4"]
    assert exs[0].options == ("choice A", "choice B", "choice C", "choice D")
    assert exs[0].meta["source"] == f"{f}:1"


def test_ai2_answer_key_not_among_labels(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "train.jsonl", [ai2("q1"), ai2("q2", key="E")])
    with pytest.raises(DataError) as info:
        read_examples(f)
    assert str(info.value) == f"answer key 'E' not among labels ['A', 'B', 'C', 'D'] at {f}:2"


def test_malformed_json_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "dev.jsonl", [ai2("q1"), "", '{"id": "q2", "question": ', ai2("q3")])
    with pytest.raises(DataError, match=rf"malformed JSON line: .* at {f}:3$"):
        read_examples(f, "ai2")


def test_missing_field_and_non_object(tmp_path: Path) -> None:
    bad = ai2("q1")
    del bad["question"]["stem"]
    f = write_lines(tmp_path / "a.jsonl", [bad])
    with pytest.raises(DataError, match=rf"missing field 'question.stem' at {f}:1"):
        read_examples(f, "ai2")
    g = write_lines(tmp_path / "b.jsonl", [{"question": "q", "options": ["a", "b"]}, [1, 2]])
    with pytest.raises(DataError, match=rf"expected a JSON object, got list at {g}:2"):
        read_examples(g, "jsonl")
    h = write_lines(tmp_path / "c.json", [[{"question": "q", "options": ["a", "b"]}, 3]])
    with pytest.raises(DataError, match=rf"expected a JSON object, got int at {h}\[1\]"):
        read_examples(h, "jsonl")


def test_fewer_than_two_options(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "a.jsonl", [ai2("q1", "A", "A")])
    with pytest.raises(DataError, match=rf"has 1 option\(s\); at least 2 are needed at {f}:1"):
        read_examples(f)


def test_aqua_options_are_parsed(tmp_path: Path) -> None:
    row = {"question": "2+2?", "options": ["A)3", "B) 4", "C)5", "D)6", "E)7"], "correct": "B"}
    f = write_lines(tmp_path / "dev.json", [row, row | {"correct": "F"}])
    assert detect_format(f) == "aqua"
    with pytest.raises(DataError, match=rf"answer key 'F' not among labels \['A', 'B', 'C', 'D', 'E'\] at {f}:2"):
        read_examples(f)
    write_lines(f, [row])
    (e,) = read_examples(f, id_prefix="aq:")
    assert (e.id, e.options, e.answer) == ("aq:1", ("3", "4", "5", "6", "7"), 1)
    write_lines(f, [row | {"options": ["A)3", "4"]}])
    with pytest.raises(DataError, match="option 1 '4' is not of the form 'A\\)text'"):
        read_examples(f)


def test_generic_jsonl_answer_kinds(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": "q", "options": ["x", "y", "z"], "answer": 2},
        {"id": "b", "question": "q", "options": ["x", "y", "z"], "answer": "B"},
        {"id": "c", "question": "q", "options": ["x", "y", "z"], "answer": "z"},
        {"id": "d", "question": "q", "options": ["x", "y", "z"]},
        {"id": "e", "question": "q", "options": ["x", "y", "z"], "answer": None},
    ]
    f = write_lines(tmp_path / "train.jsonl", rows)
    assert detect_format(f) == "jsonl"
    assert [e.answer for e in read_examples(f)] == [2, 1, 2, None, None]
    write_lines(f, [rows[0] | {"answer": 3}])
    with pytest.raises(DataError, match=rf"answer index 3 is outside 0..2 at {f}:1"):
        read_examples(f)


def test_domains_from_a_field_or_column_and_mmlu_subjects(tmp_path: Path) -> None:
    """A `domain` field (JSON) or column (CSV), or the one `Columns.domain` names, is each question's domain (DDK's
    mixture is over them); records without one have none; MMLU's questions have their subject."""
    rows = [
        {"id": "a", "question": "q", "options": ["x", "y"], "answer": 0, "domain": "law"},
        {"id": "b", "question": "q", "options": ["x", "y"], "answer": 1, "domain": 3},
        {"id": "c", "question": "q", "options": ["x", "y"], "answer": 1},
    ]
    f = write_lines(tmp_path / "train.jsonl", rows)
    assert [e.domain for e in read_examples(f)] == ["law", "3", None]
    renamed = [{k if k != "domain" else "topic": v for k, v in r.items()} for r in rows]
    write_lines(f, renamed)
    assert [e.domain for e in read_examples(f, columns=Columns(domain="topic"))] == ["law", "3", None]
    assert [e.domain for e in read_examples(f)] == [None, None, None]
    c = tmp_path / "train.csv"
    c.write_text("question,A,B,answer,domain\nq1,x,y,A,bio\nq2,x,y,B,\n", encoding="utf-8")
    assert [e.domain for e in read_examples(c)] == ["bio", None]
    m = tmp_path / "anatomy_test.csv"
    m.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,1\n", encoding="utf-8")
    assert read_examples(m, "mmlu", meta={"subject": "anatomy"})[0].domain == "anatomy"


def test_generic_jsonl_with_nested_mapping_and_array(tmp_path: Path) -> None:
    rows = [{"uid": 7, "q": {"text": "which?"}, "choices": {"text": ["p", "q"], "label": ["1", "2"]}, "key": "2"}]
    f = tmp_path / "test.json"
    f.write_text(json.dumps(rows))
    cols = Columns(id="uid", question="q.text", options="choices.text", labels="choices.label", answer="key")
    (e,) = read_examples(f, "jsonl", cols)
    assert (e.id, e.question, e.options, e.answer) == ("7", "which?", ("p", "q"), 1)
    assert e.meta["source"] == f"{f}[0]"


def test_csv_auto_option_columns_and_trailing_empty(tmp_path: Path) -> None:
    f = tmp_path / "train.csv"
    f.write_text('question,A,B,C,D,answer\n"what, really?",x,y,z,,C\nq2,1,2,3,4,0\n', encoding="utf-8")
    assert detect_format(f) == "csv"
    a, b = read_examples(f)
    assert (a.id, a.question, a.options, a.answer) == ("train:2", "what, really?", ("x", "y", "z"), 2)
    assert (b.options, b.answer) == (("1", "2", "3", "4"), 0)


def test_csv_errors(tmp_path: Path) -> None:
    f = tmp_path / "train.csv"
    f.write_text("question,A,B,answer\nq,x,y,A,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"row has 5 fields, header has 4 at {f}:2"):
        read_examples(f)
    f.write_text("question,A,B,answer\nq,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"fewer fields than the header's 4 at {f}:2"):
        read_examples(f)
    f.write_text("prompt,x1,x2\nq,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot find option columns"):
        read_examples(f)
    cols = Columns(question="q", options=["o1", "o2"])
    f.write_text("prompt,o1,o2\nq,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"CSV header lacks column\(s\) \['q'\]"):
        read_examples(f, "csv", cols)


def test_mmlu_csv(tmp_path: Path) -> None:
    f = tmp_path / "anatomy_test.csv"
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nWhich bone?,a,b,c,d,3\nq2,a,b,c,d,7\n")
    assert detect_format(f) == "mmlu"
    with pytest.raises(DataError, match=rf"answer index 7 is outside 0..3 at {f}:3"):
        read_examples(f)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_examples(tmp_path / "x.txt")


def test_hf_datasets_source_with_local_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")  # the optional `hf` extra
    rows = [
        {
            "id": f"h{i}",
            "question": f"q{i}",
            "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3],
        }
        for i in range(5)
    ]
    f = write_lines(tmp_path / "data.jsonl", rows)
    cols = Columns(options="choices.text", labels="choices.label", answer="answerKey")
    exs = read_hf("json", split="train", columns=cols, data_files={"train": str(f)})
    assert [e.id for e in exs] == [f"h{i}" for i in range(5)]
    assert [e.answer for e in exs] == [0, 1, 2, 0, 1]
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'no-such/dataset-xyz'"):
        read_hf("no-such/dataset-xyz", split="train", columns=cols)
