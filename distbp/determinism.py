"""Deterministic mode: the same gradient bits on any number of ranks, and the cross-rank check.

The global batch of G rows is cut into S = ceil(G / micro_batch) micro-shards of
micro_batch rows (the last one may be shorter); rank r owns a contiguous run of whole
shards. Each shard's gradient comes from its own forward and backward, with the same
shapes and inputs on whichever rank runs it. The shard gradients are summed in ONE
binary tree over shard indices that depends on S alone: the node covering
[s, s + 2n) is (node [s, s + n)) + (node [s + n, s + 2n)), and a node whose right
half starts at or past S equals its left half. A rank sums the maximal aligned
power-of-two blocks of its run (nodes of that tree); the blocks are exchanged and
every rank finishes the same tree on 1/size of the vector, then the pieces are
gathered. Every node's value is fixed by its children alone, so who adds what, and
when, cannot change a bit. docs/DETERMINISM.md has the details.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
from threadpoolctl import threadpool_limits

from .data import shard
from .errors import UserError

Node = tuple[int, int]  # (first shard, number of shards) of a tree node
_BLAS_CAP = None  # the threadpool_limits object of pin_blas_threads


# ---- index math (no communication) ----

def num_shards(rows: int, micro_batch: int) -> int:
    """Micro-shards of a batch of `rows` rows: ceil(rows / micro_batch)."""
    return -(-rows // micro_batch)


def shard_rows(j: int, rows: int, micro_batch: int) -> tuple[int, int]:
    """Rows [lo, hi) of micro-shard j within the batch (the last shard may be shorter)."""
    return j * micro_batch, min((j + 1) * micro_batch, rows)


def aligned_blocks(a: int, b: int) -> list[Node]:
    """The maximal aligned power-of-two blocks covering shards [a, b), left to right."""
    blocks = []
    while a < b:
        n = a & -a if a else 1 << (b - 1).bit_length()  # largest power of two dividing a
        while a + n > b:
            n //= 2
        blocks.append((a, n))
        a += n
    return blocks


def is_left_sibling(left: Node, right: Node) -> bool:
    """Whether nodes left and right are the two halves of one node of the tree."""
    (s, n), (t, m) = left, right
    return n == m and s % (2 * n) == 0 and t == s + n


def rank_blocks(shards: int, size: int) -> list[list[Node]]:
    """Every rank's blocks: the aligned blocks of its contiguous run of shards."""
    return [aligned_blocks(*shard(shards, r, size)) for r in range(size)]


def piece_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) of the piece of an n-vector each rank finishes: near-equal and contiguous."""
    return [shard(n, q, size) for q in range(size)]


# ---- the tree (arrays, no communication) ----

class TreeStack:
    """Node sums of consecutive blocks, each added into its left sibling as soon as both are there."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.values: list[np.ndarray] = []

    def push(self, node: Node, value: np.ndarray) -> list[np.ndarray]:
        """Add the node (the stack may add into value in place); return the arrays it no longer holds."""
        freed = []
        while self.nodes and is_left_sibling(self.nodes[-1], node):
            (s, n), left = self.nodes.pop(), self.values.pop()
            left += value  # parent = left half + right half
            freed.append(value)
            node, value = (s, 2 * n), left
        self.nodes.append(node)
        self.values.append(value)
        return freed

    def root(self) -> np.ndarray:
        """The tree's root once every block of [0, S) is pushed: fold the spine from the right."""
        # What is left has decreasing sizes; each node's right half holds all later ones,
        # or is empty, and an empty right half adds nothing.
        while len(self.values) > 1:
            right = self.values.pop()
            self.nodes.pop()
            self.values[-1] += right
        return self.values[0]


class GradTargets:
    """Gradient vectors the shards' backward passes write into, model.grads first, reused across steps."""

    def __init__(self, model):
        self.model = model
        self.made: list[np.ndarray] = []
        self.free: list[np.ndarray] = []
        self._views: dict[int, list[dict]] = {}  # id of a vector -> model.layer_views of it

    def reset(self):
        """Every vector is free again; model.grads is taken first, so the leftmost block sums into it."""
        self.free = [self.model.grads, *self.made]

    def release(self, vectors: list[np.ndarray]):
        """Vectors whose values are no longer needed."""
        self.free += vectors

    def take(self) -> np.ndarray:
        """A free vector, bound as every layer's gradient and ready for one backward pass."""
        if not self.free:
            self.made.append(np.empty_like(self.model.grads))
            self.free.append(self.made[-1])
        g = self.free.pop(0)
        self.bind(g)
        self.model.zero_grad(skip_written=True)  # the backward writes what this leaves
        return g

    def bind(self, g: np.ndarray):
        """Point every layer's gradient views into g."""
        if id(g) not in self._views:
            self._views[id(g)] = self.model.layer_views(g)
        self.model.bind_grads(self._views[id(g)])


# ---- the step (communicates) ----

def pin_blas_threads() -> str:
    """Cap BLAS at one thread per rank; return a log line saying so."""
    # OpenBLAS 0.3.31 sgemm gave other bits with 2 threads than with 1 for batches of 8+
    # rows, and the default budget gives 1 rank 2 threads but 2 ranks 1 thread each.
    global _BLAS_CAP
    _BLAS_CAP = threadpool_limits(limits=1, user_api="blas")
    return "deterministic: 1 BLAS thread per rank (BLAS results depend on the thread count)"


class DeterministicStep:
    """One step's gradient from fixed micro-shards summed in the fixed tree (train.deterministic)."""

    def __init__(self, model, loss, comm, micro_batch: int):
        self.model, self.loss, self.comm, self.m = model, loss, comm, micro_batch
        self.targets = GradTargets(model)
        self.local = TreeStack()
        self._buffers: dict[str, np.ndarray] = {}
        self.shards = 0
        self.shard_loss = np.zeros(0)

    def describe(self, batch_size: int) -> str:
        """One log line: shards per batch and how they are split over the ranks."""
        s = num_shards(batch_size, self.m)
        runs = [b - a for a, b in (shard(s, r, self.comm.size) for r in range(self.comm.size))]
        idle = f"; {runs.count(0)} rank(s) idle: use train.micro_batch <= {batch_size // self.comm.size}" \
            if 0 in runs else ""
        return (f"deterministic: {s} micro-shards of {self.m} rows per batch of {batch_size}, "
                f"{min(runs)}-{max(runs)} per rank, summed in a fixed tree{idle}")

    def batch_rows(self, order, step: int, batch_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset rows, positions in the global batch) of this rank's whole micro-shards at this step."""
        start = step * batch_size
        rows = min(batch_size, n - start)
        a, b = shard(num_shards(rows, self.m), self.comm.rank, self.comm.size)
        lo, hi = a * self.m, min(b * self.m, rows)
        return np.asarray(order[start + lo:start + hi], dtype=np.int64), np.arange(lo, hi, dtype=np.int64)

    def forward_backward(self, x, y, positions, global_rows: int) -> int:
        """Sum this rank's shard gradients into its tree blocks; keep shard losses; return correct rows."""
        model, loss, m, targets = self.model, self.loss, self.m, self.targets
        self.shards = num_shards(global_rows, m)
        self.shard_loss = self._buffer("loss", self.shards, np.float64)
        self.local = TreeStack()
        targets.reset()
        a = int(positions[0]) // m if len(positions) else 0
        correct = 0
        try:
            for j in range(a, a + num_shards(len(positions), m)):
                lo, hi = shard_rows(j, global_rows, m)
                rows = slice(lo - a * m, hi - a * m)
                g = targets.take()  # the backward writes straight into a vector of the tree
                model.ctx.rows = positions[rows]
                out = model.forward(x[rows])
                self.shard_loss[j] = loss.forward(out, y[rows])
                correct += loss.correct(out, y[rows])
                dout = loss.backward()
                dout /= global_rows
                model.backward(dout, need_dx=False)
                targets.release(self.local.push((j, 1), g))
        finally:
            targets.bind(model.grads)
        return correct

    def allreduce(self, grads: np.ndarray, scalars: np.ndarray):
        """grads = the tree sum over all shards; scalars summed, with scalars[1] the exact loss sum."""
        comm = self.comm
        blocks = rank_blocks(self.shards, comm.size)
        if comm.size == 1:
            root = self.local.root()
            if root is not grads:
                np.copyto(grads, root)
        else:
            self._exchange(grads, blocks)
        counts = [sum(n for _, n in bl) for bl in blocks]
        comm.allgatherv(self.shard_loss, counts)
        comm.allreduce_sum(scalars)  # rows, correct rows and flags: integers, exact in any order
        scalars[1] = math.fsum(self.shard_loss)  # correctly rounded, so order-free

    def _exchange(self, grads: np.ndarray, blocks: list[list[Node]]):
        """Every rank finishes the tree on its piece of every block, then sends that piece to all."""
        comm, r, mine = self.comm, self.comm.rank, self.local.values
        pieces = piece_bounds(grads.size, comm.size)
        lo, hi = pieces[r]
        others = [q for q in range(comm.size) if q != r]
        n_recv = sum(len(blocks[q]) for q in others)
        slots = iter(self._buffer("recv", n_recv * (hi - lo), grads.dtype).reshape(n_recv, hi - lo))
        values, recvs = [], []  # piece r of every block in shard order; where the others' arrive
        for q in range(comm.size):
            if q == r:
                values += [v[lo:hi] for v in mine]
            else:
                arriving = [(q, next(slots)) for _ in blocks[q]]
                recvs += arriving
                values += [slot for _, slot in arriving]
        comm.exchange([(q, v[pieces[q][0]:pieces[q][1]]) for q in others for v in mine], recvs)
        tree = TreeStack()
        for node, value in zip([node for bl in blocks for node in bl], values):
            tree.push(node, value)
        root = tree.root()
        if not np.may_share_memory(root, grads):  # else it is grads[lo:hi] already
            grads[lo:hi] = root
        comm.exchange([(q, grads[lo:hi]) for q in others],
                      [(q, grads[pieces[q][0]:pieces[q][1]]) for q in others])

    def _buffer(self, name: str, n: int, dtype) -> np.ndarray:
        """A reused flat buffer of at least n items (first n returned)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(max(n, 1), dtype)
        return buf[:n]


# ---- the cross-rank check (train.check_every, both modes) ----

class DivergenceError(UserError):
    """The parameters differ between ranks."""

    agreed = True  # every rank raises it from the same gathered hashes


def param_hash(params: np.ndarray) -> int:
    """CRC-32 of the parameter bytes: equal only if (almost surely) bitwise equal."""
    return zlib.crc32(memoryview(params).cast("B"))


def rank_groups(hashes) -> list[list[int]]:
    """Ranks grouped by equal hash, groups ordered by their first rank."""
    groups: dict[int, list[int]] = {}
    for r, h in enumerate(hashes):
        groups.setdefault(int(h), []).append(r)
    return sorted(groups.values())


def check_consistent(comm, params: np.ndarray, step: int):
    """Compare the parameter hash across ranks (one int each); raise DivergenceError naming the ranks."""
    hashes = np.zeros(comm.size, np.int64)
    hashes[comm.rank] = param_hash(params)
    comm.allgatherv(hashes, [1] * comm.size)
    groups = rank_groups(hashes)
    if len(groups) > 1:
        which = "; ".join(f"rank(s) {', '.join(map(str, g))} have crc32 {int(hashes[g[0]]):08x}" for g in groups)
        raise DivergenceError(f"parameters differ across ranks after step {step}: {which}. HINT: every rank "
                              "must run the same distbp, numpy and BLAS build; a rank's memory or an "
                              "interconnect may be faulty. Resume from the last checkpoint")
