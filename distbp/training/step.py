"""One training step's gradient: which rows this rank reads, forward+backward, the reduction.

A step object has the methods the loop calls in order: `pass_positions` (this rank's
places in the global batch, one array per forward/backward pass: train.accumulate_steps
passes of at most train.batch_size rows), `forward_backward` once per pass (the passes
add up the gradient of the global mean loss in model.grads), `reduce` (sum gradients and
the step's scalars over the ranks, grad_sq among them: the squared norm of the whole
summed gradient, for the finite check, clipping and metrics), then `apply` takes the
optimizer step from `grad`. DataParallelStep splits each pass over the ranks;
DeterministicStep cuts the batch into fixed micro-shards summed in a fixed tree
(parallel/determinism.py), a rank running its shards in as many groups as there are passes. With
a sharded optimizer (ZeRO-1, `owned`) `reduce` reduce-scatters, each rank's part of
grad_sq rides the scalars' allreduce, and `apply` updates the owned slice then allgathers.
"""
from __future__ import annotations

import math

import numpy as np

from ..parallel.determinism import GradTargets, TreeExchange, TreeStack, rank_blocks
from ..parallel.sampler import micro_shard_slice, num_shards, shard, shard_counts, shard_rows


def _field(i: int) -> property:
    """A named float of StepScalars.buf."""
    return property(lambda self: self.buf[i], lambda self, v: self.buf.__setitem__(i, v))


class StepScalars:
    """The step's scalars, named, over one float64 buffer so they ride one allreduce.

    grad_sq is the squared L2 norm of the summed gradient, set by the step's reduction
    (the finite check and gradient clipping read it; a sharded step sums its slices' parts)."""
    rows, loss_sum, correct, stop, checkpoint_due, grad_sq = (_field(i) for i in range(6))

    def __init__(self):
        self.buf = np.zeros(6)


def sum_sq(g: np.ndarray) -> float:
    """g.g: one BLAS pass, cheaper than np.sum(g) (docs/PERFORMANCE.md, "Choices in the code"); not finite
    iff an entry is NaN/Inf or the squares overflow."""
    return float(np.dot(g, g))


def grad_of(model, loss, x, y, positions: np.ndarray, batch_rows: int, divisor: float,
            after_forward=None) -> tuple[float, int]:
    """Forward, loss (a sum over the rows), backward of it / divisor into the bound gradient; (loss sum, correct)."""
    model.ctx.rows, model.ctx.global_rows = positions, batch_rows
    out = model.forward(x)
    loss_sum, correct = loss.forward(out, y), loss.correct(out, y)
    if after_forward:
        after_forward()
    dout = loss.backward()
    dout /= divisor  # the global mean (rows, or their summed class weights), folded in before the reduction
    model.backward(dout, need_dx=False)
    return loss_sum, correct


def pass_bounds(batch_rows: int, pass_rows: int) -> list[tuple[int, int]]:
    """Positions [lo, hi) of each forward/backward pass: consecutive slices of pass_rows rows."""
    return [(lo, min(lo + pass_rows, batch_rows)) for lo in range(0, batch_rows, pass_rows)]


class DataParallelStep:
    """Each rank one contiguous slice of the global batch, one backward, one allreduce of the flat gradient."""

    def __init__(self, model, loss, comm, lap=lambda phase: None, owned: slice | None = None):
        self.model, self.loss, self.comm, self.lap = model, loss, comm, lap
        self.owned = owned  # this rank's slice of the vectors when the optimizer is sharded, else None
        # what the optimizer steps from after reduce: the whole sum, or the sum of the owned slice
        self.grad = model.grads if owned is None else np.empty(owned.stop - owned.start, model.grads.dtype)

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

    def forward_backward(self, x, y, positions: np.ndarray, batch_rows: int, divisor: float | None = None,
                         first: bool = True) -> tuple[float, int]:
        """Add this pass's part of the gradient of the global mean (sum / divisor) to model.grads, zeroed if first."""
        if first:
            self.model.zero_grad(skip_written=True)  # the backward writes what it skips
        return grad_of(self.model, self.loss, x, y, positions, batch_rows, batch_rows if divisor is None else divisor,
                       lambda: self.lap("forward"))

    def reduce(self, grads: np.ndarray, scalars: StepScalars):
        """Sum gradient (or only this rank's owned slice of it) and scalars over the ranks."""
        if self.owned is None:
            self.comm.allreduce_sum(grads)
            self.comm.allreduce_sum(scalars.buf)
            scalars.grad_sq = sum_sq(grads)
            return
        self.comm.reduce_scatter_sum(grads, self.grad, shard_counts(grads.size, self.comm.size))
        scalars.grad_sq = sum_sq(self.grad)  # this slice's part, summed with the other scalars
        self.comm.allreduce_sum(scalars.buf)

    def whole_grad(self) -> np.ndarray:
        """The summed gradient over the whole vector on every rank (gathered if sharded; the rare non-finite path)."""
        grads = self.model.grads
        if not np.shares_memory(self.grad, grads):
            grads[self.owned] = self.grad
            self.comm.allgatherv(grads, shard_counts(grads.size, self.comm.size))
        return grads

    def apply(self, opt, params: np.ndarray, lr: float):
        """The optimizer step from the reduced gradient, the same on every rank; then the slices meet if sharded."""
        opt.step(params, self.grad, lr)
        if self.owned is not None:
            self.comm.allgatherv(params, shard_counts(params.size, self.comm.size))


class DeterministicStep(DataParallelStep):
    """The same gradient bits on any number of ranks: fixed micro-shards summed in a fixed tree."""

    def __init__(self, model, loss, comm, micro_batch: int, lap=lambda phase: None, owned: slice | None = None):
        super().__init__(model, loss, comm, lap, owned)
        if owned is not None:  # the tree sum is whole on every rank: the optimizer takes its slice
            self.grad = model.grads[owned]
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

    def forward_backward(self, x, y, positions: np.ndarray, batch_rows: int, divisor: float | None = None,
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
                                                batch_rows if divisor is None else divisor)
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
        scalars.grad_sq = sum_sq(grads)  # the same bits on every rank and any rank count
