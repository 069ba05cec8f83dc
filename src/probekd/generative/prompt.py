"""The solve prompt: how a free-form problem becomes the text a model continues with its worked solution.

Two styles, as for multiple-choice prompts: `chat` (the tokenizer's chat template, the problem as the user turn and
the solution as the assistant's reply) and `plain` (for base models: "Question: ...\\nSolution:"). Both ask for the
answer line `#### <answer>`, which grading reads first and sampling stops after.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from probekd.data.prompts import chat_prompt
from probekd.generative.problems import Problem


class SolvePrompt(BaseModel):
    """A configurable solve prompt. Placeholders: {question}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["auto", "chat", "plain"] = Field(
        "auto", description="`chat` (tokenizer's chat template), `plain`, or `auto` (chat when the tokenizer has one)."
    )
    system: str | None = Field(None, description="System message for `chat` (None: the template's default).")
    instruction: str = Field(
        "Solve the problem step by step. End with the final answer on its own line as '#### <answer>'.",
        description="Shown after the question.",
    )
    letter_instruction: str = Field(
        "Solve the problem step by step. End with the letter of the correct option on its own line as '#### <letter>'.",
        description="Shown after a question with lettered options (AQuA-RAT).",
    )
    question: str = Field("Question: {question}", description="How the question is shown.")
    plain_answer: str = Field("Solution:", description="`plain`: the last line, after which the solution starts.")

    def resolved_style(self, tokenizer: Any) -> Literal["chat", "plain"]:
        if self.style != "auto":
            return self.style
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"

    def text(self, problem: Problem, tokenizer: Any = None) -> str:
        """The prompt whose continuation is the solution."""
        instruction = self.letter_instruction if problem.kind == "letter" else self.instruction
        body = self.question.format(question=problem.question.strip()) + "\n" + instruction
        if self.resolved_style(tokenizer) == "chat":
            return chat_prompt(tokenizer, self.system, body)
        return f"{body}\n{self.plain_answer}\n"
