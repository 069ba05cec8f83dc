"""Readers that turn benchmark files into `MCQExample`s, with errors that name the file and line.

Supported formats:
- `ai2`: ARC / AI2 JSON lines, `{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`;
  labels A-E or 1-4; the answer is the position of `answerKey` among the labels.
- `mmlu`: CSV with header `question,choice0,...,choice3,answer`, `answer` a 0-based index.
- `aqua`: AQuA-RAT JSON lines, `{"question", "options": ["A)12", ...], "correct": "A"}`.
- `jsonl` / `csv`: generic records whose fields are named by a `Columns` mapping (JSON lines or a JSON array).
- `hf`: a Hugging Face `datasets` source (a hub name, or a builder such as `json` with local `data_files`),
  mapped with the same `Columns`.
"""

from __future__ import annotations

import csv
import json
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from probekd.data.examples import MCQExample
from probekd.errors import DataError
from probekd.extras import require

FORMATS = ("ai2", "mmlu", "aqua", "jsonl", "csv")
LETTERS = string.ascii_uppercase


class Columns(BaseModel):
    """Where each part of an example lives in a generic record (JSON object, CSV row, or HF dataset row).

    Field names may be dotted paths into nested objects (`choices.text`).
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field("id", description="Field with a unique example id; when absent, ids are FILE:LINE.")
    question: str = Field("question", description="Field with the question text.")
    options: str | list[str] | None = Field(
        None,
        description="A field holding the list of option texts, or a list of fields/columns one per option. "
        "None: `options` or `choices` for JSON; columns A,B,C,... or choice0,... or option0,... for CSV.",
    )
    labels: str | list[str] | None = Field(
        None,
        description="A field holding the option labels (e.g. `choices.label`), or the labels themselves; "
        "default A, B, C, ...",
    )
    answer: str = Field("answer", description="Field with the gold answer; missing or empty means unlabelled.")
    domain: str | None = Field(
        "domain",
        description="Field with the question's domain (a subject, a source: text or an integer), kept for DDK's "
        "domain mixture (`grid.weightings: [ddk]`); optional in every record, other values ignored.",
    )
    answer_type: Literal["auto", "index", "label", "text"] = Field(
        "auto",
        description="How to read the answer: `index` (0-based), `label` (one of the labels), `text` (equal to one "
        "option's text), or `auto` (a JSON integer is an index, a string a label, else an index if numeric).",
    )


MMLU_COLUMNS = Columns(
    id=None, question="question", options=[f"choice{i}" for i in range(4)], answer="answer", answer_type="index"
)


def read_examples(
    path: Path,
    fmt: str = "auto",
    columns: Columns | None = None,
    *,
    id_prefix: str | None = None,
    meta: dict[str, Any] | None = None,
) -> list[MCQExample]:
    """Read one file in format `fmt` (`auto` detects it); ids without a field become `<id_prefix><line>`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    prefix = f"{path.stem}:" if id_prefix is None else id_prefix
    if fmt == "ai2":
        examples = [_ai2_example(obj, where) for where, _, obj in iter_json_records(path)]
    elif fmt == "aqua":
        examples = [_aqua_example(obj, where, f"{prefix}{n}") for where, n, obj in iter_json_records(path)]
    elif fmt == "jsonl":
        examples = records_to_examples(iter_json_records(path), columns or Columns(), prefix)
    elif fmt in ("csv", "mmlu"):
        cols = columns or (MMLU_COLUMNS if fmt == "mmlu" else Columns())
        if cols.options is None:
            cols = cols.model_copy(update={"options": _auto_option_columns(_csv_header(path), path)})
        examples = records_to_examples(_iter_csv_records(path, cols), cols, prefix)
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(('auto', *FORMATS))}", str(path))
    if meta:
        for ex in examples:
            ex.meta.update(meta)
    return examples


def detect_format(path: Path) -> str:
    """Guess a file's format from its extension and its first record."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "mmlu" if {"question", "choice0", "answer"} <= set(_csv_header(path)) else "csv"
    if suffix in (".jsonl", ".json"):
        first = next(iter_json_records(path), None)
        if first is None:
            raise DataError("file has no records", str(path))
        obj = first[2]
        if isinstance(obj.get("question"), dict) and "stem" in obj["question"]:
            return "ai2"
        if "correct" in obj and isinstance(obj.get("options"), list):
            return "aqua"
        return "jsonl"
    raise DataError(f"cannot tell the format of {path.name!r} from its extension; use .jsonl, .json or .csv", str(path))


# ---------------------------------------------------------------------------------------------------------------
# record iteration


def iter_json_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (where, line-or-index, object) from JSON lines, or from a file holding one JSON array."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg}", f"{path}:{e.lineno}") from None
        for i, obj in enumerate(items):
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", f"{path}[{i}]")
            yield f"{path}[{i}]", i, obj
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON line: {e.msg} (column {e.colno})", f"{path}:{lineno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", f"{path}:{lineno}")
        yield f"{path}:{lineno}", lineno, obj


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if not header:
        raise DataError("CSV file has no header", f"{path}:1")
    return header


def _iter_csv_records(path: Path, columns: Columns) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (where, line, row) from a CSV file with a header; rows with a wrong field count are errors."""
    header = _csv_header(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        opts = columns.options if isinstance(columns.options, list) else [columns.options or "options"]
        missing = [c for c in (columns.question, *opts) if c not in header]
        if missing:
            raise DataError(f"CSV header lacks column(s) {missing}; header is {header}", f"{path}:1")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"row has {len(header) + len(row[None])} fields, header has {len(header)}", where)
            if any(v is None for v in row.values()):
                raise DataError(f"row has fewer fields than the header's {len(header)}", where)
            yield where, reader.line_num, dict(row)


def _auto_option_columns(header: list[str], path: Path) -> list[str]:
    """Option columns of a CSV: A,B,C,... or choice0,... / option0,... (or 1-based), consecutive from the first."""
    candidates = [
        list(LETTERS),
        *[[f"{stem}{i}" for i in range(start, start + 26)] for stem in ("choice", "option") for start in (0, 1)],
    ]
    for names in candidates:
        found = []
        for name in names:
            if name not in header:
                break
            found.append(name)
        if len(found) >= 2:
            return found
    raise DataError(
        "cannot find option columns (tried A,B,C..., choice0..., option0..., choice1..., option1...); "
        "name them with columns.options",
        f"{path}:1",
    )


# ---------------------------------------------------------------------------------------------------------------
# record -> example


def _get(record: dict[str, Any], dotted: str, where: str, *, required: bool = True) -> Any:
    """Look up a dotted field path in a nested record."""
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if required:
                raise DataError(f"missing field {dotted!r}", where)
            return None
        node = node[part]
    return node


def _resolve_answer(raw: Any, labels: list[str], options: list[str], answer_type: str, where: str) -> int | None:
    """Turn a raw answer value into a 0-based option index (None when unlabelled)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if answer_type == "auto":
        if isinstance(raw, bool):
            raise DataError(f"answer {raw!r} is not an index, label or option text", where)
        if isinstance(raw, int):
            answer_type = "index"
        elif str(raw).strip() in labels:
            answer_type = "label"
        elif str(raw).strip().lstrip("-").isdigit():
            answer_type = "index"
        else:
            answer_type = "text"
    if answer_type == "index":
        try:
            idx = int(str(raw).strip())
        except ValueError:
            raise DataError(f"answer {raw!r} is not an integer index", where) from None
        if not 0 <= idx < len(options):
            raise DataError(f"answer index {idx} is outside 0..{len(options) - 1}", where)
        return idx
    if answer_type == "label":
        key = str(raw).strip()
        if key not in labels:
            raise DataError(f"answer key {key!r} not among labels {labels}", where)
        return labels.index(key)
    matches = [i for i, o in enumerate(options) if o.strip() == str(raw).strip()]
    if len(matches) != 1:
        raise DataError(f"answer {raw!r} matches {len(matches)} option texts (need exactly 1)", where)
    return matches[0]


def records_to_examples(
    records: Iterable[tuple[str, int, dict[str, Any]]], columns: Columns, id_prefix: str
) -> list[MCQExample]:
    """Map generic records to examples with `columns`; `records` yields (where, line, record)."""
    out = []
    for where, n, rec in records:
        q = _get(rec, columns.question, where)
        if isinstance(columns.options, list):
            options = [_get(rec, c, where) for c in columns.options]
            while options and (options[-1] is None or str(options[-1]).strip() == ""):
                options.pop()  # CSVs with a fixed set of option columns leave the unused ones empty
        else:
            field = columns.options or ("options" if "options" in rec else "choices")
            options = _get(rec, field, where)
            if not isinstance(options, list):
                raise DataError(f"field {field!r} must be a list of option texts, got {type(options).__name__}", where)
        options = [_as_text(o, where) for o in options]
        if isinstance(columns.labels, list):
            labels = [str(x) for x in columns.labels][: len(options)]
        elif columns.labels:
            labels = [str(x) for x in _get(rec, columns.labels, where)]
        else:
            labels = list(LETTERS[: len(options)])
        if len(labels) != len(options):
            raise DataError(f"{len(labels)} labels for {len(options)} options", where)
        answer = _resolve_answer(
            _get(rec, columns.answer, where, required=False), labels, options, columns.answer_type, where
        )
        raw_id = _get(rec, columns.id, where, required=False) if columns.id else None
        ex_id = str(raw_id) if raw_id not in (None, "") else f"{id_prefix}{n}"
        meta: dict[str, Any] = {"source": where, "labels": labels}
        domain = _get(rec, columns.domain, where, required=False) if columns.domain else None
        if isinstance(domain, (str, int)) and not isinstance(domain, bool) and str(domain).strip():
            meta["domain"] = str(domain)  # a list, object or flag in a field of that name is not a domain: left out
        out.append(MCQExample(ex_id, _as_text(q, where), tuple(options), answer, meta))
    return out


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"expected text, got {type(value).__name__} {value!r}", where)


def _ai2_example(obj: dict[str, Any], where: str) -> MCQExample:
    ex_id = _get(obj, "id", where)
    stem = _get(obj, "question.stem", where)
    choices = _get(obj, "question.choices", where)
    if not isinstance(choices, list):
        raise DataError("field 'question.choices' must be a list", where)
    labels = [str(_get(c, "label", where)) for c in choices]
    options = [_as_text(_get(c, "text", where), where) for c in choices]
    answer = _resolve_answer(obj.get("answerKey"), labels, options, "label", where)
    return MCQExample(str(ex_id), _as_text(stem, where), tuple(options), answer, {"source": where, "labels": labels})


_AQUA_OPTION = re.compile(r"^\s*([A-Z])\s*\)\s*(.*)$", re.DOTALL)


def _aqua_example(obj: dict[str, Any], where: str, ex_id: str) -> MCQExample:
    raw = _get(obj, "options", where)
    if not isinstance(raw, list):
        raise DataError("field 'options' must be a list", where)
    labels, options = [], []
    for i, opt in enumerate(raw):
        m = _AQUA_OPTION.match(str(opt))
        if not m:
            raise DataError(f"option {i} {opt!r} is not of the form 'A)text'", where)
        labels.append(m.group(1))
        options.append(m.group(2).strip())
    answer = _resolve_answer(obj.get("correct"), labels, options, "label", where)
    q = _as_text(_get(obj, "question", where), where)
    return MCQExample(ex_id, q, tuple(options), answer, {"source": where, "labels": labels})


def read_hf(
    path: str,
    *,
    name: str | None = None,
    split: str,
    columns: Columns,
    data_files: Any = None,
    id_prefix: str | None = None,
) -> list[MCQExample]:
    """Read one split of a Hugging Face `datasets` source (hub name, or a builder like `json` with `data_files`).
    Needs the optional `datasets` package (the `hf` extra)."""
    datasets = require("datasets", "hf", f"reading the Hugging Face dataset {path!r}")
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types for missing data/offline; all mean "cannot load"
        raise DataError(f"cannot load Hugging Face dataset {path!r} split {split!r}: {e}") from e
    prefix = f"{path}/{split}:" if id_prefix is None else id_prefix
    records = ((f"{path}[{split}] row {i}", i, dict(row)) for i, row in enumerate(ds))
    return records_to_examples(records, columns, prefix)
