"""One training step's gradient: which rows this rank reads, forward+backward, the reduction.

A step object has the methods the loop calls in order: `pass_positions` (this rank's
places in the global batch, one array per forward/backward pass: train.accumulate_steps
passes of at most train.batch_size rows), `forward_backward` once per pass (the passes
add up the gradient of the global mean loss in model.grads), `reduce` (sum gradients and
the step's scalars over the ranks), `grad_norm` (for clipping and the metrics), then
`apply` takes the optimizer step. DataParallelStep splits each pass over the ranks;
DeterministicStep cuts the batch into fixed micro-shards summed in a fixed tree
(determinism.py), a rank running its shards in as many groups as there are passes. A
sharded optimizer (ZeRO-1) would reduce-scatter in `reduce`, compute `grad_norm` from its
slice (clip.global_norm with comm), and update its slice then allgather in `apply`.
"""
from __future__ import annotations

import math

import numpy as np

from .clip import global_norm
from .determinism import GradTargets, TreeExchange, TreeStack, rank_blocks
from .sampler import micro_shard_slice, num_shards, shard, shard_rows


def _field(i: int) -> property:
    """A named float of StepScalars.buf."""
    return property(lambda self: self.buf[i], lambda self, v: self.buf.__setitem__(i, v))


class StepScalars:
    """The step's scalars, named, over one float64 buffer so they ride one allreduce."""
    rows, loss_sum, correct, stop, checkpoint_due = (_field(i) for i in range(5))

    def __init__(self):
        self.buf = np.zeros(5)


def grad_of(model, loss, x, y, positions: np.ndarray, batch_rows: int, norm: float,
            after_forward=None) -> tuple[float, int]:
    """Forward, loss (a sum over the rows), backward of it / norm into the bound gradient; (loss sum, correct)."""
    model.ctx.rows, model.ctx.global_rows = positions, batch_rows
    out = model.forward(x)
    loss_sum, correct = loss.forward(out, y), loss.correct(out, y)
    if after_forward:
        after_forward()
    dout = loss.backward()
    dout /= norm  # the global mean (rows, or their summed class weights), folded in before the reduction
    model.backward(dout, need_dx=False)
    return loss_sum, correct


def pass_bounds(batch_rows: int, pass_rows: int) -> list[tuple[int, int]]:
    """Positions [lo, hi) of each forward/backward pass: consecutive slices of pass_rows rows."""
    return [(lo, min(lo + pass_rows, batch_rows)) for lo in range(0, batch_rows, pass_rows)]


class DataParallelStep:
    """Each rank one contiguous slice of the global batch, one backward, one allreduce of the flat gradient."""

    def __init__(self, model, loss, comm, lap=lambda phase: None):
        self.model, self.loss, self.comm, self.lap = model, loss, comm, lap

    def describe(self, batch_size: int) -> list[str]:
        """Log lines about how the step splits a batch of batch_size rows."""
        return []

    def positions(self, batch_rows: int) -> np.ndarray:
        """This rank's positions in a global batch of batch_rows rows."""
        return np.arange(*shard(batch_rows, self.comm.rank, self.comm.size), dtype=np.int64)

    def pass_positions(self, batch_rows: int, pass_rows: int) -> list[np.ndarray]:
        """This rank's part of each pass: every pass is a slice of pass_rows rows split over the ranks."""
        # the same passes on every rank, so BatchNorm's per-pass statistics see the same rows at any rank count
        return [lo + self.positions(hi - lo) for lo, hi in pass_bounds(batch_rows, pass_rows)]

    def forward_backward(self, x, y, positions: np.ndarray, batch_rows: int, norm: float | None = None,
                         first: bool = True) -> tuple[float, int]:
        """Add this pass's part of the gradient of the global mean (sum / norm) to model.grads, zeroed if first."""
        if first:
            self.model.zero_grad(skip_written=True)  # the backward writes what it skips
        return grad_of(self.model, self.loss, x, y, positions, batch_rows, batch_rows if norm is None else norm,
                       lambda: self.lap("forward"))

    def reduce(self, grads: np.ndarray, scalars: StepScalars):
        """Sum gradient and scalars over the ranks."""
        self.comm.allreduce_sum(grads)
        self.comm.allreduce_sum(scalars.buf)

    def grad_norm(self, grads: np.ndarray) -> float:
        """Global L2 norm of the reduced gradient: every rank holds all of it, so no communication."""
        return global_norm(grads)

    def apply(self, opt, params: np.ndarray, grads: np.ndarray, lr: float):
        """The optimizer step, the same on every rank."""
        opt.step(params, grads, lr)


class DeterministicStep(DataParallelStep):
    """The same gradient bits on any number of ranks: fixed micro-shards summed in a fixed tree."""

    def __init__(self, model, loss, comm, micro_batch: int, lap=lambda phase: None):
        super().__init__(model, loss, comm, lap)
        self.m = micro_batch
        self.targets, self.exchange = GradTargets(model), TreeExchange(comm)
        self.local = TreeStack()
        self.shards = 0
        self.shard_loss = np.zeros(0)

    def describe(self, batch_size: int) -> list[str]:
        """One log line: shards per batch and how they are split over the ranks."""
        s, size = num_shards(batch_size, self.m), self.comm.size
        runs = [b - a for a, b in (shard(s, r, size) for r in range(size))]
        idle = f"; {runs.count(0)} rank(s) idle: use train.micro_batch <= {batch_size // size}" if 0 in runs else ""
        return [f"deterministic: {s} micro-shards of {self.m} rows per batch of {batch_size}, "
                f"{min(runs)}-{max(runs)} per rank, summed in a fixed tree{idle}"]

    def positions(self, batch_rows: int) -> np.ndarray:
        """This rank's whole micro-shards, so each shard's math is the same on any rank."""
        return np.arange(*micro_shard_slice(batch_rows, self.m, self.comm.rank, self.comm.size), dtype=np.int64)

    def pass_positions(self, batch_rows: int, pass_rows: int) -> list[np.ndarray]:
        """This rank's micro-shards of the whole batch in as many consecutive groups as there are passes."""
        # the tree is that of the whole batch whatever the grouping, so the bits equal one large pass
        m, (a, b) = self.m, micro_shard_slice(batch_rows, self.m, self.comm.rank, self.comm.size)
        mine, passes = num_shards(b - a, m), len(pass_bounds(batch_rows, pass_rows))
        groups = (shard(mine, k, passes) for k in range(passes))
        return [np.arange(a + lo * m, min(a + hi * m, b), dtype=np.int64) for lo, hi in groups]

    def forward_backward(self, x, y, positions: np.ndarray, batch_rows: int, norm: float | None = None,
                         first: bool = True) -> tuple[float, int]:
        """Sum this pass's shard gradients into the tree blocks (a new tree if first); keep shard losses."""
        m, targets = self.m, self.targets
        if first:
            self.shards = num_shards(batch_rows, m)
            if self.shard_loss.size != self.shards:
                self.shard_loss = np.zeros(self.shards)
            self.shard_loss[:] = 0
            self.local = TreeStack()
            targets.reset()
        a = int(positions[0]) // m if len(positions) else 0
        correct = 0
        try:
            for j in range(a, a + num_shards(len(positions), m)):
                lo, hi = shard_rows(j, batch_rows, m)
                rows = slice(lo - a * m, hi - a * m)
                g = targets.take()  # the backward writes straight into a vector of the tree
                self.shard_loss[j], c = grad_of(self.model, self.loss, x[rows], y[rows], positions[rows], batch_rows,
                                                batch_rows if norm is None else norm)
                correct += c
                targets.release(self.local.push((j, 1), g))
        finally:
            targets.bind(self.model.grads)
        return math.fsum(self.shard_loss[a:a + num_shards(len(positions), m)]), correct

    def reduce(self, grads: np.ndarray, scalars: StepScalars):
        """grads = the tree sum over all shards; scalars summed, with loss_sum the correctly rounded sum."""
        comm = self.comm
        blocks = rank_blocks(self.shards, comm.size)
        self.exchange(self.local, grads, blocks)
        comm.allgatherv(self.shard_loss, [sum(n for _, n in bl) for bl in blocks])
        comm.allreduce_sum(scalars.buf)  # rows, correct rows and flags: integers, exact in any order
        scalars.loss_sum = math.fsum(self.shard_loss)  # correctly rounded, so order-free
