"""Causal option-student training step: probekd's shared-prefix forward + backward against whole sequences.

A training step of a causal-LM student in the `option` formulation (SmolLM2-135M-Instruct with LoRA by default,
ARC-Easy training questions, batch 16) needs each option's length-normalized log-likelihood after the question.

- baseline (what a user writes): every (question, option) sequence run whole through `AutoModelForCausalLM`,
  log-softmax of the full logits, the option tokens gathered;
- whole sequences, output layer only at the option positions (probekd before the shared prefix);
- ours (`probekd.student.heads.CausalOptionStudent`): the question prefix runs once, its key/value cache serves the
  K options, the output layer only at the option positions.

Each path's loss is gold cross-entropy over the option scores; forward + backward are timed, alternating the paths
batch by batch so that load on the machine hits them alike. Also printed: the bytes of tensors kept for backward
(activation memory, each storage counted once) and the largest score difference from the baseline.
The last line is `student-option ratio: <baseline time / ours>`.

    python bench/bench_student.py --quick        # 1 batch of 8 questions, about 2 minutes on 2 cores
    python bench/bench_student.py --batches 2    # 2 batches of 16: the numbers in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from probekd.data import load_task
from probekd.data.examples import answers_array, option_mask
from probekd.student.heads import Student, StudentConfig, build_student
from probekd.student.train import Rows


def whole_sequences(student: Student, batch: dict[str, torch.Tensor], full_logits: bool) -> torch.Tensor:
    """Option scores [B, Kb] from each (prefix + option) sequence run whole (right padding)."""
    model = student.model
    pre, pre_mask = batch["input_ids"], batch["attention_mask"]
    opt, opt_mask = batch["option_ids"], batch["option_attention"]
    b, kb, _ = opt.shape
    seqs, conts = [], []
    for i in range(b):
        p = pre[i, : int(pre_mask[i].sum())].tolist()
        for j in range(kb):
            cj = opt[i, j, : int(opt_mask[i, j].sum())].tolist()
            seqs.append(p + cj)
            conts.append((len(p), len(cj)))
    t = max(map(len, seqs))
    pad = student.tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    rows = torch.tensor([r for r, (p, n) in enumerate(conts) for _ in range(n)], dtype=torch.long)
    pos = torch.tensor([p + k - 1 for p, n in conts for k in range(n)], dtype=torch.long)
    if full_logits:  # the plain way: logits at every position
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        tok = logp[rows, pos].gather(1, ids[rows, pos + 1][:, None])[:, 0]
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[rows, pos]).float()
        tok = logits.gather(1, ids[rows, pos + 1][:, None])[:, 0] - logits.logsumexp(1)
    total = tok.new_zeros(len(seqs)).index_add(0, rows, tok)
    count = torch.tensor([max(n, 1) for _, n in conts])
    scores = (total / count).reshape(b, kb)
    return scores.masked_fill(~batch["option_mask"][:, :kb], float("-inf"))


def ours(student: Student, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("targets", "weights", "labels")}
    return student.logits(inputs)[:, : batch["option_ids"].shape[1]]


def step(fn: Callable[[], torch.Tensor], labels: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Forward + backward of gold CE on `fn()`'s scores: (seconds, bytes kept for backward, scores)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(x: torch.Tensor) -> Any:
        st = x.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return x

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        scores = fn()
    loss = torch.nn.functional.cross_entropy(scores, labels)
    loss.backward()
    return time.perf_counter() - t0, sum(seen.values()), scores.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 timed batch of 8 questions: about 2 minutes")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per path (default 1 quick, else 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="questions per batch (default 8 quick, else 16)")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = ap.parse_args()
    n_batches = args.batches or (1 if args.quick else 2)
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    torch.manual_seed(0)
    cfg = StudentConfig(
        model=args.model, kind="causal", formulation="option", lora=not args.full, max_length=args.max_length
    )
    exs = load_task("arc_easy").splits["train"][: (n_batches + 1) * args.batch_size]  # one extra batch: warm-up
    k = max(e.k for e in exs)
    student = build_student(cfg, k=k, seed=0)
    student.model.train()
    rows = Rows([student.encode(e) for e in exs], option_mask(exs, k), answers_array(exs))
    batches = [
        student.collate([rows[i] for i in range(s, min(s + args.batch_size, len(rows)))])
        for s in range(0, len(rows), args.batch_size)
    ]
    paths: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
        "baseline: whole sequences, full logits": lambda b: whole_sequences(student, b, full_logits=True),
        "whole sequences, option rows only": lambda b: whole_sequences(student, b, full_logits=False),
        "ours: shared prefix, option rows only": lambda b: ours(student, b),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    kept: dict[str, list[int]] = {name: [] for name in paths}
    diff = {name: 0.0 for name in paths}
    tokens = {"whole": 0, "ours": 0}
    for i, batch in enumerate(batches):
        scores = {}
        for name, fn in paths.items():
            student.model.zero_grad(set_to_none=True)
            sec, nbytes, scores[name] = step(lambda fn=fn, batch=batch: fn(batch), batch["labels"])
            if i:  # batch 0 warms up every path
                times[name].append(sec)
                kept[name].append(nbytes)
        ref = scores["baseline: whole sequences, full logits"]
        for name, s in scores.items():
            fin = torch.isfinite(ref)
            diff[name] = max(diff[name], float((s[fin] - ref[fin]).abs().max()))
        if i:
            real = batch["option_attention"].sum(-1)
            plen = batch["attention_mask"].sum(1)
            tokens["whole"] += int((plen[:, None] * (real > 0) + real).sum())
            tokens["ours"] += int(plen.sum() + real.sum())

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"student {args.model} ({'full' if args.full else 'LoRA'}), ARC-Easy train, {n_batches} timed batches of "
        f"{args.batch_size} questions (after one warm-up batch), max_length {args.max_length}"
    )
    print(f"real tokens run: whole sequences {tokens['whole']}, shared prefix {tokens['ours']}")
    base_name = next(iter(paths))
    base_t = float(np.median(times[base_name]))
    for name in paths:
        t = float(np.median(times[name]))
        print(
            f"{name:40s} {t:7.2f} s/batch (median)  kept for backward {np.median(kept[name]) / 2**20:8.0f} MiB  "
            f"x{base_t / t:5.2f}  max |score - baseline| {diff[name]:.1e}"
        )
    print(f"student-option ratio: {base_t / float(np.median(times[list(paths)[-1]])):.2f}")


if __name__ == "__main__":
    main()
