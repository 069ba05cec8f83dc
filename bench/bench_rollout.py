"""Rollout sampling throughput: probekd's batched sampler against `model.generate` one sequence at a time.

Both sample K solutions of the same problems with the same settings (temperature, top-p, max new tokens) and stop a
sequence at the same point (its answer line `#### <answer>`, or EOS):
- baseline (what a user writes): for each problem and each of its K rollouts, `model.generate` on that one prompt;
- ours (`probekd.generative.rollouts.sample_solutions`): `batch` problems per generate call, left padding, each
  prompt run once and its key/value cache repeated for its K rollouts, every sequence stopped at its answer line
  while the others go on.

Throughput is generated tokens per second (each path counts its own tokens up to the stop, EOS and padding not
counted, by the same function). The two paths draw
different samples, so their token counts differ somewhat; tokens/s is the comparable number. Also printed: each
path's pass rate (same model and settings: the two should agree up to sampling noise).
The last line is `rollout ratio: <ours tokens/s / baseline tokens/s>`.

    python bench/bench_rollout.py --quick                  # 2 problems x 4 rollouts, under a minute on 2 cores
    python bench/bench_rollout.py --problems 8 --k 8       # the numbers in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from transformers import StoppingCriteriaList

from probekd.generative.grading import grade
from probekd.generative.problems import load_problems
from probekd.generative.rollouts import (
    AnswerLineStop,
    RolloutConfig,
    answer_line_end,
    encode_prompts,
    eos_ids,
    generated_length,
    sample_solutions,
)
from probekd.models import prepare
from probekd.teacher.extract import load_teacher


@torch.no_grad()
def one_at_a_time(model, tok, prompt: list[int], cfg: RolloutConfig, seed: int) -> list[tuple[str, int]]:
    """K rollouts of one prompt, one `generate` call each (batch 1), stopped at the answer line."""
    out = []
    for j in range(cfg.k):
        torch.manual_seed(seed * 1000 + j)
        ids = torch.tensor([prompt])
        seq = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=0, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([AnswerLineStop(tok, len(prompt))]),
        )[0, len(prompt) :]  # fmt: skip
        n = generated_length(seq.tolist(), {tok.pad_token_id, *eos_ids(model, tok)})
        text = tok.decode(seq[:n], skip_special_tokens=True)
        end = answer_line_end(text)
        out.append((text[:end] if end is not None else text, n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 problems x 4 rollouts, 32 new tokens: under a minute")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arith:steps=2,digits=2")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="problems per generate call (ours)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.quick:
        args.problems, args.k, args.max_new_tokens, args.batch = 2, 4, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")  # fmt: skip
    teacher = load_teacher(str(prepare(args.model)), device="cpu", compute_dtype="float32")
    model, tok = teacher.model, teacher.tokenizer
    problems = load_problems(args.task).splits["train"][: args.problems]
    cfg = RolloutConfig(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    prompts = encode_prompts(tok, problems, cfg.prompt)
    print(f"{args.model}, {args.task}: {len(problems)} problems x {cfg.k} rollouts, T = {cfg.temperature}, "
          f"top-p {cfg.top_p}, at most {cfg.max_new_tokens} new tokens, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens")  # fmt: skip
    sample_solutions(model, tok, prompts[:1], cfg.model_copy(update={"k": 1, "max_new_tokens": 2}), 0)  # warm-up

    results = {}
    for name in ("baseline", "ours"):
        t0 = time.perf_counter()
        if name == "ours":
            sols = []
            for b in range(0, len(prompts), args.batch):
                sols += sample_solutions(model, tok, prompts[b : b + args.batch], cfg, seed=b)
        else:
            sols = [one_at_a_time(model, tok, p, cfg, seed=i) for i, p in enumerate(prompts)]
        seconds = time.perf_counter() - t0
        tokens = sum(n for per in sols for _, n in per)
        right = [grade(t, p.answer or "", p.kind) for p, per in zip(problems, sols, strict=True) for t, _ in per]
        results[name] = tokens / seconds
        print(f"{name:8s}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s; "
              f"pass rate {sum(right) / len(right):.3f}")  # fmt: skip
    print(f"rollout ratio: {results['ours'] / results['baseline']:.2f}")


if __name__ == "__main__":
    main()
