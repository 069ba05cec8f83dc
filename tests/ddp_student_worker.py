"""Run by `tests/test_student.py::test_causal_students_under_ddp_step_as_one_process` under torchrun (2 gloo ranks)
and once alone: one optimizer step (plain SGD, constant rate, 16 rows in the step) of a tiny causal student, the
letter scorer trained in full and the option scorer with LoRA; then two steps of 2 accumulated micro-batches each
of the option scorer with LoRA (DDP's no-sync micro-batch, and a second forward after the first step); each trained
parameter vector saved per rank.

    python tests/ddp_student_worker.py MODEL_DIR OUT"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from probekd.ranks import ranks
from probekd.student.heads import StudentConfig, build_student
from probekd.student.train import make_trainer
from probekd.student.train_config import TrainConfig
from test_student import mammal_task, rows_for


def main(model_dir: str, out: Path) -> None:
    variants = (("letter", "letter", False, 16, 1), ("option-lora", "option", True, 16, 1),
                ("option-lora-ga2", "option", True, 32, 2))  # fmt: skip
    for name, formulation, lora, n, accumulate in variants:
        cfg = StudentConfig(model=model_dir, kind="causal", formulation=formulation, prompt="base", lora=lora)
        student = build_student(cfg, k=4, seed=0)
        rows = rows_for(student, mammal_task(n), 4)
        train = TrainConfig(epochs=1, batch_size=16, grad_accum=accumulate, learning_rate=0.5, warmup_ratio=0.0,
                            weight_decay=0.0)  # fmt: skip
        trainer = make_trainer(student, rows, None, train, out / f"ck-{name}", 0, save_strategy="no", optim="sgd",
                               lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
        trainer.train()
        trained = torch.cat([p.detach().flatten() for p in student.model.parameters() if p.requires_grad])
        torch.save(trained, out / f"{name}-world{ranks().world}-rank{ranks().rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
