"""The fixed grid of caption batches: batch k holds source rows [k * batch_size, (k + 1) * batch_size), and
its sampling randomness is seeded by (seed, k)."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from cvfm.data.sources import ImageSource


def todo_batches(source: ImageSource, batch_size: int, done: set[str]) -> list[int]:
    """The batches of the grid over `source` that still hold an image not done."""
    return [
        k
        for k in range(-(-len(source) // batch_size))
        if any(it.id not in done for it in source.items[k * batch_size : (k + 1) * batch_size])
    ]


def batch_seed(seed: int, k: int) -> int:
    """The torch seed of batch k (sampling): a function of the run's seed and the batch's position."""
    return (seed * 1_000_003 + k) % (2**63)


class GridBatches(Sampler[list[int]]):
    """The source rows of the listed batches of a fixed grid of `batch_size` rows."""

    def __init__(self, batches: list[int], batch_size: int, n: int):
        self.batches, self.batch_size, self.n = batches, batch_size, n

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.batches:
            yield list(range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.batches)
