"""The run folder's layout in one place: grid cells and their names, and where every artifact of a run lives.

    RUN/config.yaml                        the resolved configuration (`probekd.config.dump_config`)
    RUN/teacher/<split>/                   teacher caches (`probekd.teacher.cache`)
    RUN/probes/                            per-layer probes (`probekd.probes.pipeline`)
    RUN/targets/<signal>-f<frac>-s<seed>.npz   a grid cell's training-split soft targets (`probekd.targets`)
    RUN/targets/answers-<split>.npz        ids, option masks, gold answers, teacher scores (no hidden states)
    RUN/students/<cell>/metrics.json       one trained and evaluated student (its presence marks the cell done)
    RUN/students/<cell>/test_probs.npy     its probabilities on the test questions
    RUN/students/<cell>/model/             the kept student: a standard Hugging Face folder (`probekd.student.kept`)
    RUN/logs/<cell>.jsonl                  the trainer's per-step logs of that student
    RUN/zero_shot/s<seed>.npz              the untrained student's dev and test probabilities (per seed)
    RUN/locks/<cell>.lock                  a cell's claim while a process trains it (`probekd.workers`)
    RUN/report/                            `probekd report`

The experiment, the report, reuse and export all read paths from here, never from each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from probekd.atomic import write_npz
from probekd.errors import ProbekdError

if TYPE_CHECKING:
    from probekd.teacher.cache import TeacherCache

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True, order=True)
class Cell:
    """One grid cell: the student trained on `signal`'s targets from `fraction` of the labels with `seed`, under
    `loss` and `weighting`, the labelled questions chosen by `selection` (`probekd.selection`)."""

    signal: str
    fraction: float
    seed: int
    loss: str = "fkl"
    weighting: str = "none"
    selection: str = "random"

    @property
    def name(self) -> str:
        """`probe-f0.25-s1`; a labelled-question selection other than `random`, and a loss or weighting other than
        the default, add suffixes (`probe-f0.25-s1-pcoreset-fkl_then_rkl-paced`)."""
        name = self.targets_name
        if (self.loss, self.weighting) != ("fkl", "none"):
            name += f"-{self.loss.replace('>', '_then_')}-{self.weighting}"
        return name

    @property
    def targets_name(self) -> str:
        """The name of the cell's targets file: targets depend on the signal, fraction, seed and selection alone."""
        base = f"{self.signal}-f{self.fraction:g}-s{self.seed}"
        return base if self.selection == "random" else f"{base}-{self.selection}"


def cell_name(
    signal: str, fraction: float, seed: int, loss: str = "fkl", weighting: str = "none", selection: str = "random"
) -> str:
    """`Cell(...).name` without building the cell."""
    return Cell(signal, fraction, seed, loss, weighting, selection).name


def config_path(run: Path) -> Path:
    """RUN/config.yaml."""
    return Path(run) / "config.yaml"


def targets_path(run: Path, name: str) -> Path:
    """RUN/targets/<name>.npz: a grid cell's targets file (`Cell.targets_name`) or `answers-<split>`."""
    return Path(run) / "targets" / f"{name}.npz"


def student_dir(run: Path, name: str) -> Path:
    """RUN/students/<name>/: a grid cell's student (finished when its metrics.json is there)."""
    return Path(run) / "students" / name


def metrics_path(run: Path, name: str) -> Path:
    """RUN/students/<name>/metrics.json."""
    return student_dir(run, name) / "metrics.json"


def model_dir(run: Path, name: str) -> Path:
    """RUN/students/<name>/model/: the kept student (absent for cells made before students were kept, or when
    `grid.keep_students` left it out)."""
    return student_dir(run, name) / "model"


def log_path(run: Path, name: str) -> Path:
    """RUN/logs/<name>.jsonl: one JSON line per trainer log of that student."""
    return Path(run) / "logs" / f"{name}.jsonl"


def zero_shot_path(run: Path, seed: int) -> Path:
    """RUN/zero_shot/s<seed>.npz: the student of that seed before training, on every dev and test question."""
    return Path(run) / "zero_shot" / f"s{seed}.npz"


def report_dir(run: Path) -> Path:
    """RUN/report/."""
    return Path(run) / "report"


def answers_path(run: Path, split: str) -> Path:
    """The teacher's answers on `split`, as the student stage reads them."""
    return targets_path(run, f"answers-{split}")


def save_answers(run: Path, caches: dict[str, TeacherCache]) -> None:
    """What the student stage needs of the teacher caches (ids, option mask, gold answers, the teacher's own
    scores), without the hidden states, so that stage can run where the caches are not."""
    for split, c in caches.items():
        write_npz(
            answers_path(run, split),
            ids=np.array(c.ids),
            scores=c.scores,
            mask=c.mask,
            answers=c.answers,
            meta=np.array(json.dumps({"formulation": c.manifest["formulation"], "layers": c.layers})),
        )


def load_answers(run: Path, splits: tuple[str, ...] = SPLITS) -> dict[str, TeacherCache]:
    """The caches of `run` as `save_answers` wrote them (no hidden states)."""
    from probekd.teacher.cache import TeacherCache

    caches = {}
    for split in splits:
        path = answers_path(run, split)
        if not path.exists():
            raise ProbekdError(
                f"{path} is missing: run the targets stage first (`probekd run CONFIG --stage targets`, where the "
                "teacher caches are)"
            )
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            caches[split] = TeacherCache(
                {"formulation": meta["formulation"], "layers": meta["layers"]},
                [str(i) for i in z["ids"]],
                z["scores"],
                z["mask"].astype(bool),
                z["answers"],
            )
    return caches
