"""Which rows go where: fixed parts of the source, owned by one shard and one process each.

Part p covers source rows [p * part_size, (p + 1) * part_size). With `num_shards` independent jobs
(`--shard-id/--num-shards`) of `world` processes each (`accelerate launch` / `torchrun`), process r of
shard k owns the parts with p % (num_shards * world) == k * world + r: every part has exactly one owner,
so the union of all processes' parts is the whole source, with no row twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import Sampler

from cvfm.errors import UsageError


@dataclass(frozen=True)
class Plan:
    num_rows: int
    part_size: int

    def __post_init__(self):
        if self.part_size < 1:
            raise UsageError(f"--part-size must be at least 1, not {self.part_size}")

    @property
    def num_parts(self) -> int:
        return -(-self.num_rows // self.part_size)

    def rows(self, part: int) -> range:
        return range(part * self.part_size, min((part + 1) * self.part_size, self.num_rows))

    def owned(self, shard_id: int = 0, num_shards: int = 1, rank: int = 0, world: int = 1) -> list[int]:
        """The parts that process `rank` of `world` in shard `shard_id` of `num_shards` computes."""
        check_shard(shard_id, num_shards)
        if not 0 <= rank < world:
            raise UsageError(f"process rank {rank} is outside a world of {world} processes")
        owner, owners = shard_id * world + rank, num_shards * world
        return [p for p in range(self.num_parts) if p % owners == owner]


def check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1:
        raise UsageError(f"--num-shards must be at least 1, not {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise UsageError(f"--shard-id must be in 0..{num_shards - 1}, not {shard_id}")


class PartBatchSampler(Sampler[list[int]]):
    """Batches of source rows, part after part: no batch crosses a part boundary, so a part is complete
    as soon as its last batch arrives. `steps()` yields (part, is_last_batch_of_part) in the same order,
    to walk beside the DataLoader."""

    def __init__(self, plan: Plan, parts: list[int], batch_size: int):
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
        self.plan, self.parts, self.batch_size = plan, list(parts), batch_size

    def batches(self) -> Iterator[tuple[int, list[int], bool]]:
        """(part, rows of the batch, is_last_batch_of_part), in order."""
        for part, rows, last in self._batches():
            yield part, list(rows), last

    def _batches(self) -> Iterator[tuple[int, range, bool]]:
        for part in self.parts:
            rows = self.plan.rows(part)
            starts = range(rows.start, rows.stop, self.batch_size)
            for i, start in enumerate(starts):
                yield part, range(start, min(start + self.batch_size, rows.stop)), i == len(starts) - 1

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch, _ in self._batches():
            yield list(batch)

    def steps(self) -> Iterator[tuple[int, bool]]:
        for part, _, last in self._batches():
            yield part, last

    def __len__(self) -> int:
        return sum(-(-len(self.plan.rows(p)) // self.batch_size) for p in self.parts)
