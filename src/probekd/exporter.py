"""`probekd export RUN --best`: copy the kept student a user should take away to a clean folder ready to share.

The choice reads dev accuracy only (the best epoch's, as the cell kept it), never test: a choice made on test would
make the exported student's test accuracy an optimistic estimate."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probekd.atomic import atomic_path
from probekd.errors import ProbekdError
from probekd.layout import metrics_path, model_dir
from probekd.student.kept import MANIFEST, read_manifest, write_manifest


@dataclass(frozen=True)
class Candidate:
    """A finished cell with a kept student."""

    cell: str
    signal: str
    fraction: float
    seed: int
    dev_accuracy: float | None
    folder: Path


def candidates(run: Path) -> list[Candidate]:
    """The finished cells of `run` whose student was kept, best first by dev accuracy (ties: the larger labelled
    fraction, then the lower seed)."""
    found = []
    for path in sorted((Path(run) / "students").glob("*/metrics.json")):
        name = path.parent.name
        folder = model_dir(run, name)
        if not (folder / MANIFEST).is_file():
            continue
        m = json.loads(path.read_text())
        found.append(Candidate(name, m["signal"], m["fraction"], m["seed"], m.get("best_dev_accuracy"), folder))
    return sorted(found, key=lambda c: (-(c.dev_accuracy if c.dev_accuracy is not None else -1), -c.fraction, c.seed))


def choose(run: Path, signal: str | None = None, fraction: float | None = None) -> tuple[Candidate, int]:
    """The kept student with the best dev accuracy (of `signal` and at `fraction` when given) and how many
    candidates it was chosen from; a clear error when there is none."""
    from probekd.targets import SIGNALS

    if signal is not None and signal not in SIGNALS:
        raise ProbekdError(f"unknown signal {signal!r}; known: {', '.join(SIGNALS)}")
    if not (Path(run) / "students").is_dir():
        raise ProbekdError(f"{run} has no students/ folder: not a probekd run directory, or no student finished yet")
    every = candidates(run)
    if not every:
        raise ProbekdError(
            f"no kept student under {Path(run) / 'students'} (cells made before probekd kept students, or "
            "grid.keep_students: none): rerun the grid's cells to keep them"
        )
    pool = [c for c in every if (signal is None or c.signal == signal) and (fraction is None or c.fraction == fraction)]
    if not pool:
        have = sorted({(c.signal, c.fraction) for c in every})
        raise ProbekdError(
            f"no kept student with signal {signal or 'any'} at fraction {fraction if fraction is not None else 'any'}; "
            f"kept: {', '.join(f'{s} at {f:g}' for s, f in have)}"
        )
    return pool[0], len(pool)


def export_student(
    run: Path,
    out: Path | None = None,
    *,
    signal: str | None = None,
    fraction: float | None = None,
    cell: str | None = None,
) -> Path:
    """Copy a kept student of `run` to `out` (default `<run>-<cell>` beside the run): the one named `cell`, or the
    best by dev accuracy (`choose`). Its `probekd.json` and model card record which cell it is and why."""
    run = Path(run)
    if cell is not None:
        if not metrics_path(run, cell).exists():
            raise ProbekdError(f"{run} has no finished cell {cell!r}")
        read_manifest(model_dir(run, cell))  # a clear error when that cell kept no student
        chosen = next(c for c in candidates(run) if c.cell == cell)
        reason: dict[str, Any] = {"chosen_by": "named", "reason": f"Exported by name: cell `{cell}` of `{run}`."}
    else:
        chosen, n = choose(run, signal, fraction)
        among = " and ".join(
            x
            for x in (f"signal `{signal}`" if signal else "", f"fraction {fraction:g}" if fraction is not None else "")
            if x
        )
        dev = "none recorded" if chosen.dev_accuracy is None else f"{chosen.dev_accuracy:.3f}"
        reason = {
            "chosen_by": "best dev accuracy",
            "candidates": n,
            "reason": f"Cell `{chosen.cell}` of `{run}`: the best dev accuracy "
            f"({dev}) among {n} kept students{' with ' + among if among else ''}. "
            "Chosen on dev only, never on test, so its test accuracy above is an unbiased estimate.",
        }
    target = Path(out) if out is not None else run.parent / f"{run.name}-{chosen.cell}"
    manifest = read_manifest(chosen.folder)
    manifest.exported = {"run": str(run), "cell": chosen.cell, "dev_accuracy": chosen.dev_accuracy, **reason}
    with atomic_path(target) as tmp:
        shutil.copytree(chosen.folder, tmp)
        write_manifest(tmp, manifest)
    return target
