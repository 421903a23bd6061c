"""Overlapped gradient reduction (train.overlap): the flat gradient reduced in buckets while backward runs.

The flat gradient is cut into buckets in reverse layer order (the order backward finishes them): whole
layers, each bucket closed once it holds train.bucket_mb or more, except that a layer whose gradient
becomes final front to back (Linear computes its weight gradient in row blocks) and is larger than
that is cut into bucket_mb pieces, so its first rows travel while backward computes the rest. As soon
as a bucket's values are final (a layer reports them before its dx product), a non-blocking allreduce
of that slice starts (with the sharded optimizer a non-blocking reduce-scatter onto the ranks' owned
slices). MPI moves a request on only inside MPI calls (no spare core is assumed), so the pending
requests are tested after every layer's backward and between the blocks of a long weight gradient;
the step's reduce waits for all of them. Every rank starts the same buckets in the same order, so
the collectives match. Each element is summed by one collective either way: only the order MPI adds
the ranks' values in may differ from the single allreduce (float rounding).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import faults
from .sampler import shard


class Bucket(NamedTuple):
    """A slice [lo, hi) of the flat gradient; ready once layer `first` has its first `need` values final."""
    lo: int
    hi: int
    first: int  # the lowest layer with values in the bucket: backward finishes its part last
    need: int | None = None  # None: all of layer first's values (whole layers); a piece of a cut layer: its end


# ---- index math (no communication) ----

def layer_spans(offsets: dict) -> dict[int, tuple[int, int]]:
    """[lo, hi) of each top-level layer's parameters in the flat vector, from names "{layer}.{kind}.{param}"."""
    spans = {}
    for name, (a, b) in offsets.items():
        i = int(name.split(".", 1)[0])
        lo, hi = spans.get(i, (a, b))
        spans[i] = (min(lo, a), max(hi, b))
    return spans


def bucket_bounds(spans: dict[int, tuple[int, int]], bucket_items: int, split=()) -> list[Bucket]:
    """Buckets from the last layer to the first, each closed at >= bucket_items values; a layer of `split`
    (one whose gradient becomes final front to back, Linear's weight rows) larger than that is cut into
    pieces of bucket_items in ascending order (its front is ready first), the last piece taking the rest."""
    buckets, hi, first = [], None, None  # first: the lowest layer in the open bucket [.., hi)
    for i in sorted(spans, reverse=True):
        lo, top = spans[i]
        if i in split and top - lo > bucket_items:
            if hi is not None:  # the layers above close their bucket: contiguous with this layer's last piece only
                buckets.append(Bucket(top, hi, first))
            cuts = list(range(lo, top - bucket_items, bucket_items))[1:] + [top]
            buckets += [Bucket(a, b, i, b - lo if b < top else None) for a, b in zip([lo] + cuts[:-1], cuts)]
            hi = None
            continue
        hi = top if hi is None else hi
        if hi - lo >= bucket_items:
            buckets.append(Bucket(lo, hi, i))
            hi = None
        first = i
    if hi is not None:
        buckets.append(Bucket(lo, hi, first))
    return buckets


def piece_counts(bucket: Bucket, bounds: list[tuple[int, int]]) -> list[int]:
    """How many values of the bucket fall in each rank's owned [start, stop)."""
    return [max(0, min(bucket.hi, b) - max(bucket.lo, a)) for a, b in bounds]


def model_buckets(model, bucket_mb: float) -> list[Bucket]:
    """The model's buckets for train.bucket_mb; layers that report their gradient front to back are cut."""
    items = max(1, int(bucket_mb * 2**20) // model.grads.itemsize)
    split = {i for i, layer in enumerate(model.layers) if getattr(layer, "grads_in_order", False)}
    return bucket_bounds(layer_spans(model.offsets), items, split)


# ---- the reduction (communicates) ----

class OverlappedReduction:
    """Starts each bucket's non-blocking reduction when backward finishes it; wait() completes them all."""

    def __init__(self, comm, buckets: list[Bucket], owned: slice | None = None):
        self.comm, self.buckets, self.owned = comm, buckets, owned
        n = max((b.hi for b in buckets), default=0)  # the buckets cover the flat vector
        self.bounds = [shard(n, q, comm.size) for q in range(comm.size)]  # the ranks' owned slices
        self.grads = self.out = None
        self.requests, self.started = [], 0

    def describe(self, itemsize: int) -> str:
        """One log line: the buckets' sizes (itemsize bytes a value) in reduction order."""
        mb = [(b.hi - b.lo) * itemsize / 2**20 for b in self.buckets]
        kind = "reduce-scatter" if self.owned is not None else "allreduce"
        return (f"overlap: {len(mb)} gradient bucket(s) of {', '.join(f'{m:.2f}' for m in mb)} MB, "
                f"each {kind} started as backward finishes it")

    def begin(self, grads: np.ndarray, out: np.ndarray):
        """A new reduction of grads (summed in place, or reduce-scattered into out, this rank's owned slice)."""
        self.grads, self.out = grads, out
        self.requests, self.started = [], 0

    def after_layer(self, i: int, done: int | None = None):
        """Layer i's first `done` gradient values are final (None: all): start the buckets that completes, then
        let MPI progress the pending ones."""
        while self.started < len(self.buckets) and self._ready(self.buckets[self.started], i, done):
            self._start()
        if self.requests:
            self.comm.test_all(self.requests)

    @staticmethod
    def _ready(b: Bucket, i: int, done: int | None) -> bool:
        """Whether bucket b is complete once layer i has its first `done` values final (None: all)."""
        return b.first == i and (done is None or (b.need is not None and done >= b.need))

    def _start(self):
        """Start the next bucket's non-blocking reduction."""
        b = self.buckets[self.started]
        self.started += 1
        part = self.grads[b.lo:b.hi]
        if self.owned is None:
            request = self.comm.iallreduce_sum(part)
        else:
            start = self.owned.start
            lo, hi = max(b.lo, start), min(b.hi, self.owned.stop)
            mine = self.out[lo - start:max(lo, hi) - start]  # this rank's share of the bucket, maybe empty
            request = self.comm.ireduce_scatter_sum(part, mine, piece_counts(b, self.bounds))
        if request is not None:
            self.requests.append(request)
        if self.started == 1:
            faults.inject_at(self.comm.rank, "bucket")  # inert unless DISTBP_FAULT is set (tests)

    def wait(self):
        """Start the buckets not started yet (backward did not reach them), then wait for every one."""
        while self.started < len(self.buckets):
            self._start()
        self.comm.wait_all(self.requests)
        self.requests = []
