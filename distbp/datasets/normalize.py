"""Input and target normalization: statistics of the train split (exact, streamed, summed over the ranks
in float64), stored in the checkpoint and applied alike by train, eval and predict."""
from __future__ import annotations

import math

import numpy as np

from ..files.checkpoint import NORMALIZATION_NAMES
from ..parallel.sampler import shard

KINDS = ("none", "standard", "minmax")
CHUNK_BYTES = 16 << 20  # rows read per pass are at most this many float64 bytes


def feature_axes(x_ndim: int) -> tuple[int, ...]:
    """Axes reduced for the statistics: rows for (N, D) features; rows and pixels for (N, C, ...) images."""
    return (0,) if x_ndim == 2 else (0, *range(2, x_ndim))


def _stat_shape(x_shape: tuple) -> tuple:
    """Shape of a per-feature (D,) or per-channel (C, 1, 1) statistic for rows of x_shape."""
    return x_shape if len(x_shape) == 1 else (x_shape[0], *[1] * (len(x_shape) - 1))


class Normalizer:
    """x -> (x - x_shift) / x_scale per feature or channel; y -> (y - y_shift) / y_scale; y_mean for baselines."""

    NAMES = NORMALIZATION_NAMES  # the arrays a checkpoint's normalization group may hold

    def __init__(self, arrays: dict | None = None):
        arrays = arrays or {}
        unknown = set(arrays) - set(self.NAMES)
        if unknown:
            raise ValueError(f"unknown normalization arrays {sorted(unknown)}")
        self.arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
        for k in self.NAMES:
            setattr(self, k, self.arrays.get(k))

    def x(self, x: np.ndarray) -> np.ndarray:
        """Inputs as the model sees them (same dtype as x)."""
        if self.x_shift is None:
            return x
        return (x - self.x_shift.astype(x.dtype)) / self.x_scale.astype(x.dtype)

    def y(self, y: np.ndarray) -> np.ndarray:
        """Regression targets as the model learns them (same dtype as y)."""
        if self.y_shift is None:
            return y
        return (y - self.y_shift.astype(y.dtype)) / self.y_scale.astype(y.dtype)

    def y_original(self, out: np.ndarray) -> np.ndarray:
        """Model outputs (N, k) back in the original target units."""
        if self.y_shift is None:
            return out
        return out * self.y_scale.astype(out.dtype) + self.y_shift.astype(out.dtype)

    def describe(self) -> str:
        """One log line saying what is applied."""
        if self.x_shift is None and self.y_shift is None:
            return "normalization: none"
        parts = []
        if self.x_shift is not None:
            parts.append(f"inputs shifted and scaled per feature/channel ({self.x_shift.size})")
        if self.y_shift is not None:
            parts.append(f"targets shift {np.array2string(self.y_shift, precision=4)} scale "
                         f"{np.array2string(self.y_scale, precision=4)}")
        return "normalization (train split statistics): " + "; ".join(parts)


def _blocks(split) -> tuple[int, int]:
    """(rows per block, blocks): the split cut into fixed blocks of at most CHUNK_BYTES as float64."""
    rows = max(1, CHUNK_BYTES // (8 * math.prod(split.x_shape)))
    return rows, -(-split.n // rows)


def _rows(split, comm):
    """(block index, x, y (rows, k)) in float64 for this rank's share of the split's fixed blocks."""
    rows, blocks = _blocks(split)
    for b in range(*shard(blocks, comm.rank, comm.size)):
        x, y = split.read(np.arange(b * rows, min((b + 1) * rows, split.n)), np.float64)
        yield b, x, y.reshape(len(y), -1)


class _Sums:
    """Per-feature sums of one pass, for x (per feature/channel) and y (per column), block by block."""
    # Each fixed block's sum has its own row, filled by the one rank that reads the block, so the
    # allreduce adds only zeros to it; the rows are then summed in block order. The totals are thus
    # the same bits at any rank count, which deterministic mode relies on.

    def __init__(self, split):
        self.x_axes = feature_axes(1 + len(split.x_shape))
        y = split.read(np.arange(0), np.float64)[1]
        blocks = _blocks(split)[1]
        self.x = np.zeros((blocks, *_stat_shape(split.x_shape)))
        self.y = np.zeros((blocks, y.shape[1] if y.ndim == 2 else 1))

    def add(self, b: int, x, y):
        """Block b's sums."""
        self.x[b] = x.sum(axis=self.x_axes).reshape(self.x.shape[1:])
        self.y[b] = y.sum(axis=0)

    def totals(self, comm) -> tuple[np.ndarray, np.ndarray]:
        """(x sums, y sums) over every block of every rank."""
        comm.allreduce_sum(self.x)
        comm.allreduce_sum(self.y)
        return self.x.sum(axis=0), self.y.sum(axis=0)


def _first_pass(split, comm):
    """Global (x sums, y sums, minima (x, y), maxima (x, y)); minima and maxima are exact in any order."""
    sums = _Sums(split)
    neg_lo = [np.full(sums.x.shape[1:], -np.inf), np.full(sums.y.shape[1:], -np.inf)]  # -min
    hi = [a.copy() for a in neg_lo]
    for b, x, y in _rows(split, comm):
        sums.add(b, x, y)
        for m, v, axes in ((0, x, sums.x_axes), (1, y, (0,))):
            np.maximum(neg_lo[m], (-v).max(axis=axes).reshape(neg_lo[m].shape), out=neg_lo[m])
            np.maximum(hi[m], v.max(axis=axes).reshape(hi[m].shape), out=hi[m])
    for a in (*neg_lo, *hi):
        comm.allreduce_max(a)
    return (*sums.totals(comm), [-a for a in neg_lo], hi)


def _squared_deviations(split, comm, x_mean, y_mean) -> tuple[np.ndarray, np.ndarray]:
    """Global sums of (x - x_mean)^2 and (y - y_mean)^2: the second pass of the two-pass variance."""
    ss = _Sums(split)
    for b, x, y in _rows(split, comm):
        ss.add(b, np.square(x - x_mean), np.square(y - y_mean))
    return ss.totals(comm)


def fit(split, comm, kind: str, targets: bool, regression: bool) -> Normalizer:
    """Normalization statistics of a split (every rank calls it); constant features get scale 1."""
    if kind not in KINDS:
        raise ValueError(f"normalize kind {kind!r} is not one of {KINDS}")
    if kind == "none" and not regression:
        return Normalizer()
    x_sum, y_sum, lo, hi = _first_pass(split, comm)
    n = split.n
    n_x = n * math.prod(split.x_shape[1:]) if len(split.x_shape) > 1 else n  # values per channel of images
    x_mean, y_mean = x_sum / n_x, y_sum / n
    arrays = {"y_mean": y_mean} if regression else {}
    if kind == "standard" or targets:
        x_ss, y_ss = _squared_deviations(split, comm, x_mean, y_mean)
    if kind == "standard":
        arrays.update(x_shift=x_mean, x_scale=np.where(hi[0] > lo[0], np.sqrt(x_ss / n_x), 1.0))
    elif kind == "minmax":
        arrays.update(x_shift=lo[0], x_scale=np.where(hi[0] > lo[0], hi[0] - lo[0], 1.0))
    if regression and targets:
        arrays.update(y_shift=y_mean, y_scale=np.where(hi[1] > lo[1], np.sqrt(y_ss / n), 1.0))
    return Normalizer(arrays)
