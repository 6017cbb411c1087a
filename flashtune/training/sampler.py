"""A seeded, resumable order over an indexable dataset: epoch-wise permutations, optional length bucketing.

The order of epoch e depends only on (seed, e), so a position (epoch, batch index) is all a checkpoint
needs to continue exactly where a run stopped. Under torchrun, `take_shard` deals consecutive batches out
to the ranks in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# With length bucketing, examples are sorted by length inside windows of this many batches, so batches hold
# similar lengths (little padding) while the order stays random at the window scale.
BUCKET_WINDOW = 64


class EpochBatches:
    """Batches of dataset indices: epoch e is a permutation seeded by (seed, e), cut into `batch_size` pieces."""

    def __init__(self, n: int, batch_size: int, seed: int, length_fn: Callable[[int], int] | None = None,
                 drop_last: bool = False):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.length_fn, self.drop_last = length_fn, drop_last
        self._cache: tuple[int, list[list[int]]] | None = None
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch(self, e: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.length_fn is not None:
            if self._lengths is None:
                self._lengths = [int(self.length_fn(i)) for i in range(self.n)]
            window = self.batch_size * BUCKET_WINDOW
            order = [i for w in range(0, self.n, window)
                     for i in sorted(order[w:w + window], key=self._lengths.__getitem__)]
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.length_fn is not None:   # sorted windows would give short-to-long runs: shuffle batch order
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        self._cache = (e, batches)
        return batches

    def take(self, position: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
        """The batch at `position` (epoch, index) and the position after it."""
        e, i = position
        batches = self.epoch(e)
        if i >= len(batches):
            e, i = e + 1, 0
            batches = self.epoch(e)
        return batches[i], (e, i + 1)

    # [distributed] -------------------------------------------------------------------------------------------
    def take_shard(self, position: tuple[int, int], rank: int, world: int) -> tuple[list[int], tuple[int, int]]:
        """Rank `rank`'s batch of the next `world` batches, and the position after all of them.

        Every rank walks the same sequence; together the ranks consume exactly the batches one process would,
        so the order of examples, and the meaning of a position, do not depend on the world size.
        """
        mine = None
        for r in range(world):
            idx, position = self.take(position)
            if r == rank:
                mine = idx
        return mine, position


def make_batches(dataset: Sequence, batch_size: int, seed: int, length_fn=None, drop_last=False) -> EpochBatches:
    fn = None if length_fn is None else (lambda i: length_fn(dataset[i]))
    return EpochBatches(len(dataset), batch_size, seed, fn, drop_last)
