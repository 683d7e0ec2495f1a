"""One process or many: under `accelerate launch` / `torchrun` each process embeds its own parts.

The split itself needs no communication (see `plan`); the process group is only used to let every
process look at the output folder before any of them writes to it, and to gather one summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from cvfm.errors import UsageError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the device the launcher gave this process, if any
    distributed: bool = False  # a torch.distributed process group is up (barrier / gather work)

    @classmethod
    def detect(cls, rank: int | None = None, world_size: int | None = None) -> Processes:
        """Explicit `rank`/`world_size` (no process group: each call is one independent process), else
        the launcher's environment (WORLD_SIZE > 1: join its process group through Accelerate)."""
        if rank is not None or world_size is not None:
            if rank is None or world_size is None or world_size < 1 or not 0 <= rank < world_size:
                raise UsageError(f"rank {rank} and world size {world_size} do not name one process")
            return cls(rank, world_size)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines
        return cls(state.process_index, state.num_processes, state.device, state.use_distributed)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order (just `[obj]` without a process group)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group once every process is done (exiting with it alive can abort gloo)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
