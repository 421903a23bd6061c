"""Deterministic mode's fixed-tree reduction: the same gradient bits on any number of ranks.

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

import numpy as np

from .sampler import shard

Node = tuple[int, int]  # (first shard, number of shards) of a tree node


# ---- tree index math (no communication) ----

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


# ---- the exchange (communicates) ----

class TreeExchange:
    """Finishes the tree over every rank's blocks into grads on all ranks, reusing one receive buffer."""

    def __init__(self, comm):
        self.comm = comm
        self._recv = np.empty(0)

    def __call__(self, local: TreeStack, grads: np.ndarray, blocks: list[list[Node]]):
        """grads = the tree's root; local holds this rank's blocks (blocks[rank])."""
        if self.comm.size == 1:
            root = local.root()
            if root is not grads:
                np.copyto(grads, root)
        else:
            self._exchange(local.values, grads, blocks)

    def _exchange(self, mine: list[np.ndarray], grads: np.ndarray, blocks: list[list[Node]]):
        """Every rank finishes the tree on its piece of every block, then sends that piece to all."""
        comm, r = self.comm, self.comm.rank
        pieces = piece_bounds(grads.size, comm.size)
        lo, hi = pieces[r]
        others = [q for q in range(comm.size) if q != r]
        n_recv = sum(len(blocks[q]) for q in others)
        slots = iter(self._recv_buffer(n_recv * (hi - lo), grads.dtype).reshape(n_recv, hi - lo))
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

    def _recv_buffer(self, n: int, dtype) -> np.ndarray:
        """The reused receive buffer, at least n items (first n returned)."""
        if self._recv.size < n or self._recv.dtype != dtype:
            self._recv = np.empty(max(n, 1), dtype)
        return self._recv[:n]
