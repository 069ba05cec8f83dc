"""Prompt templates: how a multiple-choice example becomes teacher/student text, with option letters.

Two formulations read the same template:
- `letter`: one prompt listing every option with a letter; the model's answer is the next token, a letter.
- `option`: one sequence per option, `prefix + continuation(option)`; the answer is the option's likelihood.

Two presets: `base` (plain text ending in "Answer:", scored letter " A") for base models, and `instruct`
(the tokenizer's chat template around the same body; the assistant's reply starts with the letter "A").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from probekd.data.examples import MCQExample
from probekd.errors import ConfigError


class PromptTemplate(BaseModel):
    """A configurable multiple-choice prompt. Placeholders: {question}, {letter}, {text}, {options}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["plain", "chat"] = Field(
        "plain",
        description="`plain`: the text as is; `chat`: wrapped in the tokenizer's chat template as a user "
        "turn, followed by the assistant's generation prompt.",
    )
    system: str | None = Field(None, description="System message for `chat` (None: the template's default).")
    instruction: str = Field(
        "The following is a multiple choice question. Answer with the letter of the correct option.",
        description="First line of the letter prompt (empty string: none).",
    )
    question: str = Field("Question: {question}", description="How the question is shown.")
    option: str = Field("{letter}. {text}", description="How each option is shown in the letter prompt.")
    answer: str = Field("Answer:", description="Last line of the letter prompt (`plain`); empty for none.")
    letters: str = Field("ABCDEFGHIJ", description="Option letters, in order.")
    letter_prefix: str = Field(
        " ",
        description="Text between the prompt and the answer letter: the scored token is letter_prefix+letter "
        "(' A' after 'Answer:'; 'A' at the start of a chat reply).",
    )
    option_prefix: str = Field(
        "Question: {question}\nAnswer:", description="`option` formulation: the shared text before each option."
    )
    option_continuation: str = Field(" {text}", description="`option` formulation: the scored option text.")

    def _check_k(self, example: MCQExample) -> None:
        if example.k > len(self.letters):
            raise ConfigError(
                f"example {example.id!r} has {example.k} options but the template has {len(self.letters)} letters"
            )

    def body(self, example: MCQExample) -> str:
        """The letter prompt's text before any chat wrapping."""
        self._check_k(example)
        lines = [self.instruction] if self.instruction else []
        lines.append(self.question.format(question=example.question.strip()))
        lines += [self.option.format(letter=self.letters[i], text=t.strip()) for i, t in enumerate(example.options)]
        if self.style == "plain" and self.answer:
            lines.append(self.answer)
        return "\n".join(lines)

    def letter_prompt(self, example: MCQExample, tokenizer: Any = None) -> str:
        """The full text whose next token is the answer letter (needs the tokenizer for `chat`)."""
        body = self.body(example)
        if self.style == "plain":
            return body
        return chat_prompt(tokenizer, self.system, body)

    def answer_strings(self, k: int) -> list[str]:
        """The K strings whose first token is scored as each option's letter (' A', ' B', ...)."""
        return [self.letter_prefix + self.letters[i] for i in range(k)]

    def option_texts(self, example: MCQExample, tokenizer: Any = None) -> tuple[str, list[str]]:
        """`option` formulation: (shared prefix, one continuation per option)."""
        prefix = self.option_prefix.format(question=example.question.strip())
        if self.style == "chat":
            prefix = chat_prompt(tokenizer, self.system, prefix)
        return prefix, [self.option_continuation.format(text=t.strip()) for t in example.options]


def chat_prompt(tokenizer: Any, system: str | None, user: str) -> str:
    """`user` as a user turn in the tokenizer's chat template (after `system`, if given), ending in the assistant's
    generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt style 'chat' needs a tokenizer with a chat template; use the 'base' preset")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PRESETS: dict[str, PromptTemplate] = {
    "base": PromptTemplate(),
    "instruct": PromptTemplate(style="chat", letter_prefix=""),
}


def get_template(name: str | PromptTemplate, tokenizer: Any = None) -> PromptTemplate:
    """A preset by name (`auto`: `instruct` when the tokenizer has a chat template, else `base`), or the template."""
    if isinstance(name, PromptTemplate):
        return name
    if name == "auto":
        return PRESETS["instruct" if getattr(tokenizer, "chat_template", None) else "base"]
    if name not in PRESETS:
        raise ConfigError(f"unknown prompt preset {name!r}; expected auto, {', '.join(PRESETS)}")
    return PRESETS[name]
