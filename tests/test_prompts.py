from __future__ import annotations

import pytest

from probekd.data.examples import MCQExample
from probekd.data.prompts import PRESETS, PromptTemplate, get_template
from probekd.errors import ConfigError

EX = MCQExample("e1", " Which is a mammal? ", ("dog", " fish", "frog"), 0)


def test_base_letter_prompt_exact() -> None:
    assert PRESETS["base"].letter_prompt(EX) == (
        "The following is a multiple choice question. Answer with the letter of the correct option.\n"
        "Question: Which is a mammal?\nA. dog\nB. fish\nC. frog\nAnswer:"
    )
    assert PRESETS["base"].answer_strings(3) == [" A", " B", " C"]


def test_instruct_uses_chat_template(tiny_tokenizer) -> None:
    text = PRESETS["instruct"].letter_prompt(EX, tiny_tokenizer)
    assert text.startswith("<|im_start|>user\nThe following is a multiple choice question.")
    assert text.endswith("C. frog<|im_end|>\n<|im_start|>assistant\n")
    assert "Answer:" not in text
    assert PRESETS["instruct"].answer_strings(2) == ["A", "B"]


def test_option_formulation() -> None:
    prefix, conts = PRESETS["base"].option_texts(EX)
    assert prefix == "Question: Which is a mammal?\nAnswer:"
    assert conts == [" dog", " fish", " frog"]


def test_custom_template_and_errors(tiny_tokenizer) -> None:
    t = PromptTemplate(instruction="", question="Q: {question}", option="({letter}) {text}", letters="abc")
    assert t.letter_prompt(EX) == "Q: Which is a mammal?\n(a) dog\n(b) fish\n(c) frog\nAnswer:"
    with pytest.raises(ConfigError, match="has 3 options but the template has 2 letters"):
        PromptTemplate(letters="AB").letter_prompt(EX)
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        PRESETS["instruct"].letter_prompt(EX, None)
    assert get_template("auto", tiny_tokenizer) is PRESETS["instruct"]
    assert get_template("auto", None) is PRESETS["base"]
    with pytest.raises(ConfigError, match="unknown prompt preset 'chatty'"):
        get_template("chatty")
