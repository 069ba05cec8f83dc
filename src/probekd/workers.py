"""One student grid on several processes and machines: cells claimed through file locks.

Every grid cell is trained under a claim: an exclusive lock on RUN/locks/<cell>.lock (`filelock`, an OS-level
`flock` on POSIX), held while the cell trains. The operating system drops the lock when its process ends, however it
ends, so a killed worker's cell is free again at once and the next worker that comes to it resumes it from its last
checkpoint; no stale-lock timeouts are needed. A cell whose metrics.json is there is finished and never claimed.

- `--workers N` (`probekd.experiment.run_experiment(..., workers=N)`): N processes on this machine share the grid.
  Each takes the next cell nobody holds, and when only held cells are left it waits for them (polling) and takes
  over any whose holder died.
  On a machine with several GPUs, worker k sees GPU k mod (number of GPUs); on CPU each worker gets an equal share
  of the cores as torch threads.
- `--shard i/n` (`shard_cells`): this process's share of the grid (cells i, i + n, i + 2n, ... in grid order), for
  a scheduler's job array (Slurm, Kubernetes) on machines that share the run folder; the shards are disjoint, and
  the locks still keep two processes given the same shard, or a shard and `--workers`, apart.

Even a single `probekd run` claims its cells, so two runs started by hand on one folder never train the same cell.
On a shared filesystem the locks need working POSIX locks (NFSv4 has them; Lustre needs the `flock` mount option).
Pruning kept students (`grid.keep_students: best`) and the per-seed zero-shot file are guarded by locks of their own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from probekd.errors import ProbekdError
from probekd.layout import Cell, metrics_path

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # how often a worker with only held cells left looks again


def lock_path(run: Path, name: str) -> Path:
    """RUN/locks/<name>.lock: the lock of a grid cell (or of a shared step, e.g. `prune`)."""
    return Path(run) / "locks" / f"{name}.lock"


def _file_lock(run: Path, name: str) -> FileLock:
    path = lock_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextlib.contextmanager
def claimed(run: Path, name: str) -> Iterator[bool]:
    """Try to claim `name` without waiting: yields True (and holds the lock until the block ends) or False when
    another process holds it."""
    lock = _file_lock(run, name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def held(run: Path, name: str) -> Iterator[None]:
    """Hold the lock `name`, waiting for it: for short shared steps (pruning kept students, a seed's zero-shot
    file) that two workers must not do at once."""
    with _file_lock(run, name):
        yield


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n) -> (i, n); anything else is an error that names the option."""
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ProbekdError(f"--shard wants i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return index, count


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cells i, i + n, i + 2n, ... of the grid for shard (i, n); all of them without a shard."""
    if shard is None:
        return cells
    index, count = shard
    return cells[index::count]


def work_through(
    run: Path, cells: list[Cell], train: Callable[[Cell], dict[str, Any]], *, poll: float | None = None
) -> list[dict[str, Any]]:
    """Every cell's metrics, training (`train(cell)`) each unfinished one under its claim; `train` of a finished
    cell returns its metrics at once (after its own checks) and needs no claim. Cells held by another process are
    passed over and looked at again every `poll` seconds until they are finished (by their holder) or free (their
    holder died: this process resumes them)."""
    done: dict[str, dict[str, Any]] = {}
    pending = list(cells)
    while pending:
        waiting = []
        for cell in pending:
            if metrics_path(run, cell.name).exists():
                done[cell.name] = train(cell)
                continue
            with claimed(run, cell.name) as mine:
                if not mine:
                    waiting.append(cell)
                    continue
                done[cell.name] = train(cell)  # reads the metrics when another process finished it meanwhile
        if waiting and len(waiting) == len(pending):
            log.info("%d cells are being trained by other workers: waiting for them (%s ...)", len(waiting),
                     waiting[0].name)  # fmt: skip
            time.sleep(POLL_SECONDS if poll is None else poll)
        pending = waiting
    return [done[c.name] for c in cells]


def _worker_environment(rank: int, workers: int) -> dict[str, str]:
    """Environment of worker `rank`: its GPU where there are several, else its share of the CPU cores."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return {"CUDA_VISIBLE_DEVICES": str(rank % torch.cuda.device_count())}
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _worker_main(rank: int, target: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str]) -> None:
    os.environ.update(env)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker {rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    import torch

    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    target(*args)


def spawn_workers(workers: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run `target(*args)` in `workers` fresh processes (spawned, so no state is shared) and wait for all; a
    worker that fails is reported after the others finish (its cells are then free for a rerun)."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(workers):
        env = _worker_environment(rank, workers)
        procs.append(ctx.Process(target=_worker_main, args=(rank, target, args, env), name=f"probekd-worker-{rank}"))
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    failed = [f"worker {rank} (exit status {p.exitcode})" for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise ProbekdError(f"{', '.join(failed)} failed (their error is printed above); the cells they had not "
                           "finished are free again: rerun the same command to finish them")  # fmt: skip
