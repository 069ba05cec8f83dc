"""This process's place among the processes of a launch (`torchrun`, `accelerate launch`): rank, world size, and
a barrier.

The launchers set RANK, WORLD_SIZE and LOCAL_RANK; without them a process is rank 0 of 1 and nothing here does
anything. `probekd extract` uses it to split a cache's shards between ranks (each writes its own shard files, so
ranks need no communication but a barrier before the cache is read whole); `probekd run` then trains each student
on all ranks together (DDP through `Trainer`, rank 0 writing). The process group (gloo on CPU, NCCL with CUDA) is
started on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this process writes what is written once (manifests, summaries)."""
        return self.rank == 0

    def mine(self, items: list[int]) -> list[int]:
        """This rank's share of `items`: every world-th one, from its rank on (disjoint, together all of them)."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.world > 1:
            import torch.distributed as dist

            _init_group()
            dist.barrier()


def ranks() -> Ranks:
    """This process's rank, world size and local rank from the launcher's environment (0, 1, 0 without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world})")
    return Ranks(rank, world, local)


# How long a rank waits at a barrier: `probekd run` under a launcher has rank 0 fit the probes and make the targets
# alone while the others wait for the students (hours on a CPU for a large cache), not torch's 10-30 minutes.
BARRIER_TIMEOUT_HOURS = 24


def _init_group() -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=BARRIER_TIMEOUT_HOURS))
