"""Student prediction throughput: probekd's `predict` (batches cut from rows sorted by length) against the same
batches in file order (what `Trainer.predict` and a plain loop do), on the same student and questions.

Evaluation dominates the CPU time of a student at small labelled fractions (dev every epoch, the test split at the
end, the training rows at each pass-rate refresh), and an encoder student pads every (question, option) pair of a
batch to the batch's longest, so the order of the rows decides how much of the work is padding.
The last line is `predict ratio: <file order time / ours>`.

    python bench/bench_predict.py --quick      # 200 ARC-Easy dev questions, < 1 minute
    python bench/bench_predict.py              # all 570 dev questions
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from probekd.allocator import reuse_freed_memory
from probekd.data import load_task
from probekd.data.examples import answers_array, option_mask
from probekd.student.heads import StudentConfig, build_student
from probekd.student.train import Rows, predict


def main() -> None:
    reuse_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 questions: under a minute")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    exs = load_task("arc_easy").splits["dev"][: 200 if args.quick else None]
    k = max(e.k for e in exs)
    student = build_student(StudentConfig(model=args.model, kind="encoder", max_length=args.max_length), k)
    rows = Rows([student.encode(e) for e in exs], option_mask(exs, k), answers_array(exs))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.model} encoder student, {len(exs)} ARC-Easy dev questions, "
        f"batch {args.batch_size}"
    )

    @torch.inference_mode()
    def file_order() -> np.ndarray:
        student.model.eval()
        out = []
        for s in range(0, len(rows), args.batch_size):
            batch = student.collate([rows[i] for i in range(s, min(s + args.batch_size, len(rows)))])
            inputs = {key: v for key, v in batch.items() if key not in ("targets", "weights", "labels")}
            out.append(torch.softmax(student.logits(inputs).float(), -1))
        return torch.cat(out).numpy()

    def slots(order: list[int]) -> int:
        """Token positions run, padding included (pairs x longest pair, per batch)."""
        total = 0
        for s in range(0, len(order), args.batch_size):
            b = order[s : s + args.batch_size]
            total += len(b) * int(max(rows.rows[i]["option_mask"].sum() for i in b)) * max(rows.lengths[i] for i in b)
        return total

    file_order()  # warm-up: kernel selection, first touch
    t_naive, t_ours = [], []
    for _ in range(2):  # alternate, so a noisy neighbour hits both
        t0 = time.perf_counter()
        naive = file_order()
        t_naive.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = predict(student, rows, args.batch_size)
        t_ours.append(time.perf_counter() - t0)
    real = sum(len(x) for r in rows.rows for x in r["input_ids"][: int(r["option_mask"].sum())])
    print(f"token slots: file order {slots(list(range(len(rows))))}, ours {slots(rows.longest_first())}, real {real}")
    print(f"file order: {len(exs) / min(t_naive):.1f} questions/s; ours: {len(exs) / min(t_ours):.1f} questions/s")
    print(f"max |difference| of probabilities: {np.abs(naive - ours).max():.1e}")
    print(f"predict ratio: {min(t_naive) / min(t_ours):.2f}")


if __name__ == "__main__":
    main()
