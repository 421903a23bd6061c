"""ZeRO stage 1: the optimizer's state and update divided over the ranks.

Each rank owns one contiguous, near-equal slice of the flat parameter vector. The step
object hands the optimizer the summed gradient of that slice only (a reduce-scatter in
the plain step, a view of the tree sum in deterministic mode); ShardedOptimizer updates
the slice with the replicated optimizer's per-element formula, then allgathers the
parameters. The bytes on the wire are those of one allreduce; the update work and the
optimizer's state per rank are divided by the number of ranks. Checkpoints hold the
whole state (gathered to rank 0), so a run resumes on any number of ranks, sharded or not.
"""
from __future__ import annotations

import numpy as np

from .sampler import shard, shard_counts


AUTO_PARAMS = 1_000_000  # train.shard_optimizer="auto" shards models this large (docs/PERFORMANCE.md)


def sharded(setting: bool | str, ranks: int, params: int, overlap: bool = False) -> bool:
    """Whether the optimizer is sharded: train.shard_optimizer at this rank count and model size (every rank
    needs a slice, so never with more ranks than parameters); "auto" keeps it replicated with train.overlap."""
    # overlapped, the sharded step hides only its reduce-scatter: the parameters' allgather after the
    # update stays exposed (W1 on 2 nodes at 1 Gbit/s: 1.10x the blocking step, replicated 0.75x)
    wanted = params >= AUTO_PARAMS and not overlap if setting == "auto" else setting
    return bool(wanted) and 1 < ranks <= params


class ShardedOptimizer:
    """An optimizer over this rank's slice of the flat vectors, with Optimizer's state interface."""

    def __init__(self, make, n: int, dtype, rank: int, size: int):
        self.n, self.dtype, self.counts = n, np.dtype(dtype), shard_counts(n, size)
        self.owned = slice(*shard(n, rank, size))
        self.inner = make(self.counts[rank])  # state for the slice only
        self.name = self.inner.name

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float):
        """Update this rank's slice of params from grad, the slice's summed gradient (clobbered).

        The step object then allgathers the parameters."""
        self.inner.step(params[self.owned], grad, lr)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The live state arrays of this rank's slice, by name."""
        return self.inner.state_arrays()

    def state_scalars(self) -> dict[str, int]:
        """The scalar state (steps taken), the same on every rank."""
        return self.inner.state_scalars()

    def full_state(self, comm) -> dict[str, np.ndarray]:
        """Every state array whole on rank 0, gathered from the slices (collective; {} on other ranks)."""
        full = {}
        for k, a in self.inner.state_arrays().items():
            out = np.empty(self.n, self.dtype) if comm.is_root else None
            comm.gatherv(a, out, self.counts)
            if comm.is_root:
                full[k] = out
        return full

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, int]):
        """Take this rank's slice of whole saved state arrays."""
        self.inner.load_state({k: np.asarray(a)[self.owned] for k, a in arrays.items()}, scalars)


def state_bytes(opt) -> int:
    """Bytes of optimizer state this rank holds."""
    return sum(a.nbytes for a in opt.state_arrays().values())
