"""The global batch sampler: pure index math, no MPI and no file access (DESIGN.md invariant 2).

Three kinds of numbers about rows are kept apart by name: `indices` are rows of the
dataset split (what is read), `positions` are places 0..B-1 in the step's global batch
(what the dropout counter and the micro-shards are keyed on), and counts say how many.
"""
from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of range(n) for this epoch, drawn from (seed, epoch) alone."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative integers")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Optimizer steps in one epoch of n rows: full batches, plus a last partial one unless drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    return n // batch_size if drop_last else -(-n // batch_size)


def dropped_rows(n: int, batch_size: int, drop_last: bool) -> int:
    """Rows of n never read in an epoch: the last partial batch when drop_last, else none."""
    return n % batch_size if drop_last else 0


def shard(count: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of count items: near-equal, larger slices first (64/3 -> 22, 21, 21)."""
    base, extra = divmod(count, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_counts(count: int, size: int) -> list[int]:
    """The length of every rank's slice of count items (shard's split)."""
    return [b - a for a, b in (shard(count, q, size) for q in range(size))]


def num_shards(count: int, micro_batch: int) -> int:
    """Micro-shards of a batch of count rows: ceil(count / micro_batch)."""
    return -(-count // micro_batch)


def shard_rows(j: int, count: int, micro_batch: int) -> tuple[int, int]:
    """Positions [lo, hi) of micro-shard j within a batch of count rows (the last shard may be shorter)."""
    return j * micro_batch, min((j + 1) * micro_batch, count)


def micro_shard_slice(count: int, micro_batch: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's positions [lo, hi) in a batch of count rows: a contiguous run of whole micro-shards."""
    a, b = shard(num_shards(count, micro_batch), rank, size)
    return min(a * micro_batch, count), min(b * micro_batch, count)


class GlobalBatches:
    """The global batches of a split of n rows: batch_size rows of the (seed, epoch) permutation per step."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = steps_per_epoch(n, batch_size, drop_last)
        self._order, self._epoch = None, -1

    def indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Dataset indices of the global batch at this step of this epoch (the last one may be partial)."""
        if self._epoch != epoch:
            self._order, self._epoch = epoch_order(self.seed, epoch, self.n), epoch
        start = step_in_epoch * self.batch_size
        if not 0 <= start < self.n:
            raise ValueError(f"step {step_in_epoch} with batch size {self.batch_size} starts at row {start}, "
                             f"past the {self.n} rows")
        return self._order[start:start + self.batch_size]
