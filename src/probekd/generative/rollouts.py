"""Rollouts: K sampled solutions per problem from a causal LM, graded, cached, and the pass rates they give.

Sampling is `model.generate` on a batch of prompts (left padding, KV cache), with each prompt run once and its
key/value cache repeated for its K rollouts (transformers' prompt-cache reuse), and a stopping criterion that ends
each sequence once its answer line `#### <answer>` is complete, so that a batch runs only as long as its longest
unfinished solution. Each generate call draws from its own seed (the run's seed and
the batch's index), so a resumed run samples the same rollouts as an uninterrupted one.

A rollout cache, `OUT/` (e.g. `RUN/rollouts/<split>/`), follows the teacher cache's rules: `manifest.json` (the
fingerprint of the model, the problems and the sampling settings) is written first, then one JSON-lines shard per
batch of problems, each written atomically (a shard file that exists is complete); a rerun samples only the missing
shards and refuses a cache made with other inputs. `summary.json` (pass-rate histogram, PACED weight statistics,
tokens and time) is written last.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import StoppingCriteria, StoppingCriteriaList

from probekd.atomic import atomic_path, write_json
from probekd.errors import ProbekdError
from probekd.generative.grading import final_answer, grade
from probekd.generative.problems import Problem
from probekd.generative.prompt import SolvePrompt

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
# a finished answer line: `####`, then a number or an option letter, then the end of the line (a Markdown heading
# "#### Step 1" does not end a solution)
_ANSWER_LINE = re.compile(r"####[ \t]*(?:[-−]?\$?[\d.]|\(?[A-J](?![A-Za-z]))[^\n]*\n")


class RolloutConfig(BaseModel):
    """How rollouts are sampled (the `generate:` section of a generative run)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(8, ge=1, description="Rollouts per problem; the pass rate is the share graded correct.")
    temperature: float = Field(
        0.7, gt=0, description="Sampling temperature (at 1.0 with top_p 1.0, SmolLM2-135M's solutions were noise)."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    max_new_tokens: int = Field(256, ge=1, description="Longest solution; a longer one is cut and graded as it is.")
    batch_size: int = Field(8, ge=1, description="Problems per generate call (each with its K rollouts).")
    seed: int = Field(0, description="Sampling seed (each batch draws from seed and its index).")
    prompt: SolvePrompt = Field(default_factory=SolvePrompt, description="The solve prompt.")


def answer_line_end(text: str) -> int | None:
    """The index just after the newline that ends the first complete answer line `#### <answer>`, or None."""
    m = _ANSWER_LINE.search(text)
    return m.end() if m else None


class AnswerLineStop(StoppingCriteria):
    """Stop each sequence once the text it generated holds a complete answer line (`generate` then pads it while
    the others go on). Only the last `window` new tokens are decoded at each step."""

    def __init__(self, tokenizer: Any, prompt_len: int, window: int = 24) -> None:
        self.tokenizer, self.prompt_len, self.window = tokenizer, prompt_len, window

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[:, self.prompt_len :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [answer_line_end(t) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class Rollout:
    """One sampled solution: its text (cut after the answer line), generated tokens (up to its answer line's end
    or EOS, which is not counted), final answer and grade."""

    text: str
    tokens: int
    answer: str | None
    correct: bool


def encode_prompts(tokenizer: Any, problems: Sequence[Problem], prompt: SolvePrompt) -> list[list[int]]:
    """Token ids of each problem's solve prompt (a chat-template text brings its own special tokens)."""
    special = prompt.resolved_style(tokenizer) == "plain"
    return [tokenizer(prompt.text(p, tokenizer), add_special_tokens=special)["input_ids"] for p in problems]


def left_padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as [B, T] ids and attention mask, padded on the left (generation continues at the right)."""
    t = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (t - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def sample_solutions(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, seed: int, *, greedy: bool = False
) -> list[list[tuple[str, int]]]:
    """K sampled continuations of each prompt (token ids), in one `generate` call: per prompt, K (text, number of
    generated tokens) pairs, each text cut after its answer line; `greedy`: argmax decoding (K identical
    continuations; use k = 1). The model runs in its current mode (call `eval()` first: dropout would apply)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded(prompts, pad, device)
    # each prompt runs once (all but its last token), and its key/value cache is repeated for its K rollouts
    cache = DynamicCache()
    if ids.shape[1] > 1:
        positions = (mask[:, :-1].cumsum(1) - 1).clamp_min(0)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, past_key_values=cache,
              use_cache=True)  # fmt: skip
        cache.batch_repeat_interleave(cfg.k)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids.repeat_interleave(cfg.k, 0),
        attention_mask=mask.repeat_interleave(cfg.k, 0),
        past_key_values=cache if ids.shape[1] > 1 else None,
        **({"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}),
        top_k=0 if not greedy else None,
        max_new_tokens=cfg.max_new_tokens,
        stopping_criteria=StoppingCriteriaList([AnswerLineStop(tokenizer, ids.shape[1])]),
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1] :]
    stops = {pad, *eos_ids(model, tokenizer)}
    results: list[list[tuple[str, int]]] = []
    for row, seq in enumerate(new.tolist()):
        n = generated_length(seq, stops)
        text = tokenizer.decode(seq[:n], skip_special_tokens=True)
        end = answer_line_end(text)
        if row % cfg.k == 0:
            results.append([])
        results[-1].append((text[:end] if end is not None else text, n))
    return results


def generated_length(seq: Sequence[int], stops: set[int]) -> int:
    """Tokens a sequence generated before its first EOS or padding token (which are not counted)."""
    return next((i for i, t in enumerate(seq) if t in stops), len(seq))


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the model's generation config's EOS ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@dataclass
class RolloutSet:
    """A finished rollout cache, in problem order."""

    ids: list[str]
    rollouts: list[list[Rollout]]

    @property
    def pass_rates(self) -> np.ndarray:
        """The share of each problem's rollouts graded correct."""
        return np.array([np.mean([r.correct for r in rs]) for rs in self.rollouts], dtype=np.float64)


def _manifest(problems: Sequence[Problem], cfg: RolloutConfig, model_id: str) -> dict[str, Any]:
    from probekd.teacher.cache import fingerprint

    fields = {
        "format_version": FORMAT_VERSION,
        "model": model_id,
        "problems": fingerprint(
            {
                "ids": [p.id for p in problems],
                "questions": [p.question for p in problems],
                "answers": [p.answer for p in problems],
            }
        ),
        "sampling": cfg.model_dump(mode="json"),
    }
    n_shards = math.ceil(len(problems) / cfg.batch_size)
    return {"fingerprint": fingerprint(fields), "fields": fields, "n": len(problems), "n_shards": n_shards,
            "ids": [p.id for p in problems], "batch_size": cfg.batch_size}  # fmt: skip


def run_rollouts(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    cfg: RolloutConfig,
    out: Path,
    *,
    model_id: str,
    overwrite: bool = False,
    progress: bool = True,
) -> RolloutSet:
    """Sample, grade and cache K rollouts of every problem into `out` (resuming a cache made with the same inputs);
    returns them with their pass rates and writes `out/summary.json`. `model_id` names the model's weights in the
    fingerprint (a model name or folder, plus a training step where rollouts are refreshed)."""
    from tqdm.auto import tqdm

    from probekd.teacher.cache import open_cache, shard_path

    if not problems:
        raise ProbekdError("no problems to sample rollouts for")
    unlabelled = [p.id for p in problems if p.answer is None]
    if unlabelled:
        raise ProbekdError(f"rollouts are graded against the gold answer; {len(unlabelled)} problems have none, "
                           f"e.g. {unlabelled[0]!r}")  # fmt: skip
    out = Path(out)
    manifest = _manifest(problems, cfg, model_id)
    missing = open_cache(out, manifest, overwrite=overwrite, suffix=SUFFIX, what="rollout cache")
    prompts = encode_prompts(tokenizer, problems, cfg.prompt)
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(missing, desc=f"rollouts ({cfg.k} per problem)", unit="batch", disable=not progress)
    for i in bar:
        lo, hi = i * cfg.batch_size, min((i + 1) * cfg.batch_size, len(problems))
        samples = sample_solutions(model, tokenizer, prompts[lo:hi], cfg, seed=cfg.seed * 1_000_003 + i)
        lines = []
        for p, sols in zip(problems[lo:hi], samples, strict=True):
            rs = [Rollout(t, n, final_answer(t, p.kind), grade(t, p.answer or "", p.kind)) for t, n in sols]
            tokens += sum(r.tokens for r in rs)
            lines.append(json.dumps({"id": p.id, "rollouts": [r.__dict__ for r in rs]}, ensure_ascii=False))
        with atomic_path(shard_path(out, i, SUFFIX)) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - t0
    result = load_rollouts(out)
    summary = rollout_summary(result.pass_rates)
    if missing:
        summary["this_run"] = {"batches": len(missing), "tokens": tokens, "seconds": round(seconds, 1),
                               "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None}  # fmt: skip
    write_json(out / "summary.json", summary)
    return result


def load_rollouts(out: Path) -> RolloutSet:
    """A finished rollout cache (every shard present), in the manifest's problem order."""
    from probekd.teacher.cache import shard_path

    mpath = Path(out) / "manifest.json"
    if not mpath.is_file():
        raise ProbekdError(f"no rollout cache at {out} (manifest.json missing)")
    manifest = json.loads(mpath.read_text())
    by_id: dict[str, list[Rollout]] = {}
    for i in range(manifest["n_shards"]):
        path = shard_path(Path(out), i, SUFFIX)
        if not path.is_file():
            raise ProbekdError(f"the rollout cache at {out} is incomplete: {path.name} is missing; rerun to resume")
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            by_id[row["id"]] = [Rollout(**r) for r in row["rollouts"]]
    return RolloutSet(manifest["ids"], [by_id[i] for i in manifest["ids"]])


def rollout_summary(p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """What a log should say about pass rates: mean, the shares never and always solved, a histogram, and the
    PACED weights' statistics (alpha = beta = 1)."""
    from probekd.weighting import paced_weights, weight_stats

    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    w = paced_weights(p)
    return {
        "n": int(p.size),
        "mean_pass_rate": round(float(p.mean()), 4),
        "never_solved": round(float((p == 0).mean()), 4),
        "always_solved": round(float((p == 1).mean()), 4),
        "pass_rate_histogram": {"counts": counts.tolist(), "edges": [round(float(e), 2) for e in edges]},
        "paced_weights": weight_stats(w) if w.sum() > 0 else {"n": int(w.size), "zero_share": 1.0},
    }


def rollouts_stage(
    task: str,
    model: str,
    out: Path,
    *,
    split: str = "train",
    limit: int | None = None,
    cfg: RolloutConfig | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> RolloutSet:
    """`probekd rollouts`: sample K graded rollouts of a free-form task's split (its first `limit` problems) from
    `model` (a packaged name, local folder or HF id) into `OUT/rollouts/<split>/`, resuming what is there."""
    from probekd.generative.problems import load_problems
    from probekd.models import prepare
    from probekd.teacher.extract import load_teacher

    splits = load_problems(task).splits
    if split not in splits:
        raise ProbekdError(f"task {task!r} has no split {split!r}; it has {', '.join(splits)}")
    problems = splits[split][:limit] if limit is not None else splits[split]
    loaded = load_teacher(str(prepare(model)), device=device)
    return run_rollouts(loaded.model, loaded.tokenizer, problems, cfg or RolloutConfig(),
                        Path(out) / "rollouts" / split, model_id=model, overwrite=overwrite,
                        progress=progress)  # fmt: skip
