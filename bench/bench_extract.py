"""Teacher extraction throughput: probekd's extraction against the loop a user would write, on the same prompts.

Baselines (what a user writes without probekd):
- `letter`: batch 1, `output_hidden_states=True`, full vocabulary logits
  (`probekd.teacher.extract.naive_letter_extract`);
- `option`: every (question, option) sequence run whole, batch 1, `output_hidden_states=True`, full logits.
Ours: `letter` batches prompts sorted by length, runs the prompts' shared prefix (chat header, instructions) once
and reuses its key/value cache, and keeps only the gathered rows and the letter logits; `option` is the pipeline's
own loop over a shard: questions batched by length, the shared chat header from its cache, each batch's question
prefixes run together once, then all its (question, option) continuations on the prefixes' key/value caches.

Also reported: achieved model GFLOP/s (2 x non-embedding parameters x prompt tokens / time, attention excluded)
against fp32 and bf16 matmul peaks measured in the same run, and the agreement of the two paths' answers.
The last line is `extract-<formulation> ratio: <ours / naive throughput>`.

    python bench/bench_extract.py --quick                 # < 1 minute, letter
    python bench/bench_extract.py --formulation option --n 100
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from tqdm import tqdm

from probekd.allocator import reuse_freed_memory
from probekd.data import load_task
from probekd.data.prompts import get_template
from probekd.models import prepare
from probekd.teacher.extract import (
    letter_token_ids,
    load_teacher,
    naive_letter_extract,
    resolve_layers,
)
from probekd.teacher.pipeline import _letter_shard, _option_shard


def matmul_peak(dtype: torch.dtype, budget_s: float = 2.0) -> float:
    """GFLOP/s of the largest square matmul in `dtype` (up to 2048) that runs in about `budget_s` on this CPU.

    The size grows from 128, so a CPU without native bf16 matmul (hundreds of times slower) costs seconds, not
    minutes."""
    n, a, b, first = 128, None, None, 0.0
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        t = time.perf_counter()
        torch.mm(a, b)
        first = time.perf_counter() - t
        if n >= 2048 or first * 8 * 10 > budget_s:
            break
        n *= 2
    reps = max(1, min(10, int(budget_s / max(first, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    reuse_freed_memory()  # as the CLI does; it speeds up both sides
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few questions: under a minute")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--formulation", choices=["letter", "option"], default="letter")
    ap.add_argument(
        "--n", type=int, default=None, help="questions (default: 40 letter / 16 option with --quick, else 160)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype of ours")
    ap.add_argument("--profile", action="store_true", help="letter: print where our path spends its time (untimed)")
    args = ap.parse_args()
    n = args.n or ((40 if args.formulation == "letter" else 16) if args.quick else 160)
    torch.manual_seed(0)
    folder = prepare(args.model)
    naive_t = load_teacher(str(folder), "cpu", "float32")
    ours_t = naive_t if args.dtype == "float32" else load_teacher(str(folder), "cpu", args.dtype)
    tok = naive_t.tokenizer
    template = get_template("auto", tok)
    exs = load_task("arc_easy").splits["dev"][:n]
    layers = resolve_layers("all", naive_t.num_layers)
    emb = naive_t.model.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in naive_t.decoder.parameters()) - emb
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model {args.model} ({n_params / 1e6:.0f}M non-embedding params), {n} ARC-Easy dev questions, "
        f"{args.formulation} formulation, ours in {args.dtype}"
    )
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s (no native bf16 matmul when tiny)")

    if args.formulation == "letter":
        ids = letter_token_ids(tok, template, 5)
        prompts = [template.letter_prompt(e, tok) for e in exs]
        n_tok = sum(len(t) for t in tok(prompts)["input_ids"])
        # one untimed call per path first: kernel selection and first-touch costs are not throughput
        naive_letter_extract(naive_t, prompts[0], ids[: exs[0].k])
        _letter_shard(ours_t, exs[:1], template, layers, 5, args.batch_size, tqdm(disable=True))
        t0 = time.perf_counter()
        naive = [naive_letter_extract(naive_t, p, ids[: e.k]) for p, e in zip(prompts, exs, strict=True)]
        t_naive = time.perf_counter() - t0

        def run_ours() -> torch.Tensor:
            """The pipeline's own loop over a shard: prompts, tokenization, shared prefix, length batches."""
            return _letter_shard(ours_t, exs, template, layers, 5, args.batch_size, tqdm(disable=True))["scores"]

        t0 = time.perf_counter()
        ours = run_ours()
        t_ours = time.perf_counter() - t0
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_ours()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        same = sum(int(naive[i][1].argmax() == ours[i, : exs[i].k].argmax()) for i in range(n))
    else:
        n_tok = 0
        warm_prefix, warm_conts = template.option_texts(exs[0], tok)  # untimed warm-up of both paths
        with torch.inference_mode():
            naive_t.model(**tok([warm_prefix + warm_conts[0]], return_tensors="pt"), output_hidden_states=True)
        _option_shard(ours_t, exs[:1], template, layers, 5, args.batch_size, tqdm(disable=True))
        t0 = time.perf_counter()
        naive_ans = []
        for e in exs:
            prefix, conts = template.option_texts(e, tok)
            lls = []
            for c in conts:
                pre = tok(prefix)["input_ids"]
                full = pre + tok(c, add_special_tokens=False)["input_ids"]
                n_tok += len(full)
                with torch.inference_mode():
                    out = naive_t.model(input_ids=torch.tensor([full]), output_hidden_states=True)
                logp = torch.log_softmax(out.logits[0, len(pre) - 1 : -1].float(), -1)
                lls.append(float(logp.gather(-1, torch.tensor(full[len(pre) :])[:, None]).mean()))
            naive_ans.append(max(range(len(lls)), key=lls.__getitem__))
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()  # the pipeline's own loop over a shard: tokenization, shared prefix, batches
        ours_scores = _option_shard(ours_t, exs, template, layers, 5, args.batch_size, tqdm(disable=True))["scores"]
        t_ours = time.perf_counter() - t0
        ours_ans = ours_scores.argmax(1).tolist()
        same = sum(int(a == b) for a, b in zip(naive_ans, ours_ans, strict=True))
    gf = 2 * n_params * n_tok / 1e9
    print(
        f"naive: {n / t_naive:.2f} questions/s ({gf / t_naive:.0f} model GFLOP/s, "
        f"{100 * gf / t_naive / peak32:.0f}% of fp32 peak)"
    )
    peak = peak32 if args.dtype == "float32" else peak16
    print(
        f"ours:  {n / t_ours:.2f} questions/s ({gf / t_ours:.0f} model GFLOP/s for the same work, "
        f"{100 * gf / t_ours / peak:.0f}% of {args.dtype} peak)"
    )
    print(f"same answer as naive: {same}/{n}")
    print(f"extract-{args.formulation} ratio: {t_naive / t_ours:.2f}")


if __name__ == "__main__":
    main()
