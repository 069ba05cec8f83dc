"""Grading free-form solutions by their final answer: a number (GSM8K, the synthetic arithmetic task) or an option
letter (AQuA-RAT).

The final answer is read, in order of preference, from the last answer line `#### <answer>` (the line every prompt
asks for and every worked solution of ours ends in; a `####` line that does not start with a number or an option
letter, such as a Markdown heading "#### Step 1", is not one), from the last "answer is X" / "Answer: X", and, for
numbers only, from the last number in the text (how GSM8K is commonly graded when a model forgets the answer line).
Numbers are compared exactly as fractions after dropping thousands separators, a currency sign, a trailing unit or
percent sign and trailing zeros: "1,000", "$1000.00" and "1000 dollars" are the same answer; "3/4" equals "0.75".
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

AnswerKind = Literal["number", "letter"]

ANSWER_MARK = "####"
# a signed number with optional thousands separators, decimals, or a fraction a/b
# a signed number (the sign attached: "20 - 5" holds no negative number) with optional thousands separators,
# decimals, or a fraction a/b
_NUMBER = re.compile(r"(?<![\w.])([-−]?)\$?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+))?")
_ANSWER_IS = re.compile(r"\banswer\b\s*(?:is|:|=|-)\s*(?:\(|:)?\s*([^\n]*)", re.IGNORECASE)
_ANSWER_LINE_START = {"number": re.compile(r"\s*[-−]?\$?[\d.]"), "letter": re.compile(r"\s*\(?[A-J](?![A-Za-z])")}
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact fraction (None if there is none): "$1,234.50" -> 2469/2,
    "-3/4" -> -3/4, "12%" -> 12."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    sign, body, denominator = m.groups()
    value = Fraction(body.replace(",", ""))
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign else value


def _last_number(text: str) -> Fraction | None:
    found = list(_NUMBER.finditer(text))
    return parse_number(found[-1].group(0)) if found else None


def _letter(text: str, letters: str) -> str | None:
    for m in _LETTER.finditer(text):
        if m.group(1) in letters:
            return m.group(1)
    return None


def answer_lines(text: str, kind: AnswerKind) -> list[str]:
    """The rest of every `####` line that starts with an answer of `kind` (a number, or an option letter), in order."""
    lines = [seg.split("\n", 1)[0] for seg in text.split(ANSWER_MARK)[1:]]
    return [line for line in lines if _ANSWER_LINE_START[kind].match(line)]


def final_answer(text: str, kind: AnswerKind, letters: str = "ABCDE") -> str | None:
    """The canonical final answer of a solution text (None if none is found): a number as its exact fraction
    ("72", "-5/2"), a letter as itself."""
    said = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    for c in [*answer_lines(text, kind)[-1:], *said[-1:]]:
        found = parse_number(c) if kind == "number" else _letter(c, letters)
        if found is not None:
            return str(found)
    if kind == "number":
        last = _last_number(text)
        return None if last is None else str(last)
    return None


def canonical(gold: str, kind: AnswerKind) -> str:
    """A gold answer in the canonical form of `final_answer` (a number's exact fraction; a letter upper-cased)."""
    if kind == "letter":
        return gold.strip().upper()
    value = parse_number(gold)
    if value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return str(value)


def grade(text: str, gold: str, kind: AnswerKind, letters: str = "ABCDE") -> bool:
    """Whether a solution's final answer equals the gold answer."""
    found = final_answer(text, kind, letters)
    return found is not None and found == canonical(gold, kind)
