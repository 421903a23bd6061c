"""Overlapped gradient reduction (train.overlap): the flat gradient reduced in buckets while backward runs.

The flat gradient is cut into buckets of whole layers, in reverse layer order (the order backward
finishes them), each closed once it holds train.bucket_mb or more. As soon as backward has finished
a bucket's lowest layer, a non-blocking allreduce of that slice starts (with the sharded optimizer a
non-blocking reduce-scatter onto the ranks' owned slices). MPI moves a request on only inside MPI
calls (no spare core is assumed), so the pending requests are tested after every layer's backward;
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
    """A slice [lo, hi) of the flat gradient holding whole layers; complete once layer `first` is."""
    lo: int
    hi: int
    first: int  # the lowest layer index in the bucket: backward finishes it last


# ---- index math (no communication) ----

def layer_spans(offsets: dict) -> dict[int, tuple[int, int]]:
    """[lo, hi) of each top-level layer's parameters in the flat vector, from names "{layer}.{kind}.{param}"."""
    spans = {}
    for name, (a, b) in offsets.items():
        i = int(name.split(".", 1)[0])
        lo, hi = spans.get(i, (a, b))
        spans[i] = (min(lo, a), max(hi, b))
    return spans


def bucket_bounds(spans: dict[int, tuple[int, int]], bucket_items: int) -> list[Bucket]:
    """Buckets of whole layers from the last layer to the first, each closed at >= bucket_items values."""
    buckets, hi = [], None
    for i in sorted(spans, reverse=True):
        lo, top = spans[i]
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
    """The model's buckets for train.bucket_mb."""
    items = max(1, int(bucket_mb * 2**20) // model.grads.itemsize)
    return bucket_bounds(layer_spans(model.offsets), items)


# ---- the reduction (communicates) ----

class OverlappedReduction:
    """Starts each bucket's non-blocking reduction when backward finishes it; wait() completes them all."""

    def __init__(self, comm, buckets: list[Bucket], owned: slice | None = None):
        self.comm, self.buckets, self.owned = comm, buckets, owned
        self.at_layer = {b.first: k for k, b in enumerate(buckets)}
        n = buckets[0].hi if buckets else 0  # the first bucket ends the flat vector
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

    def after_layer(self, i: int, final: bool = True):
        """Layer i's gradients are final: start the bucket it completes; either way let MPI progress the pending ones."""
        if final and self.at_layer.get(i) == self.started:
            self._start()
        if self.requests:
            self.comm.test_all(self.requests)

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
