"""Input and target normalization: statistics of the train split (exact, streamed, summed over the ranks
in float64), stored in the checkpoint and applied alike by train, eval and predict."""
from __future__ import annotations

import math

import numpy as np

from .sampler import shard

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

    NAMES = ("x_shift", "x_scale", "y_shift", "y_scale", "y_mean")

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


def _rows(split, comm):
    """(x, y (rows, k)) float64 chunks of this rank's contiguous slice of the split."""
    lo, hi = shard(split.n, comm.rank, comm.size)
    chunk = max(1, CHUNK_BYTES // (8 * math.prod(split.x_shape)))
    for a in range(lo, hi, chunk):
        x, y = split.read(np.arange(a, min(a + chunk, hi)), np.float64)
        yield x, y.reshape(len(y), -1)


class _Moments:
    """Per-feature global sums of one pass over the split, for x (per feature/channel) and y (per column)."""

    def __init__(self, split):
        self.x_axes = feature_axes(1 + len(split.x_shape))
        y = split.read(np.arange(0), np.float64)[1]
        self.x = np.zeros(_stat_shape(split.x_shape))
        self.y = np.zeros(y.shape[1] if y.ndim == 2 else 1)

    def add(self, x, y):
        """Add one chunk's sums."""
        self.x += x.sum(axis=self.x_axes).reshape(self.x.shape)
        self.y += y.sum(axis=0)

    def reduce(self, comm):
        """Sum over the ranks (float64)."""
        comm.allreduce_sum(self.x)
        comm.allreduce_sum(self.y)


def _first_pass(split, comm):
    """Global (sums, minima, maxima, rows) of x and y; minima and maxima are exact in any order."""
    sums, lows, highs = _Moments(split), _Moments(split), _Moments(split)
    lows.x[...] = lows.y[...] = highs.x[...] = highs.y[...] = -np.inf  # lows hold -min
    n = np.zeros(1)
    for x, y in _rows(split, comm):
        sums.add(x, y)
        np.maximum(lows.x, (-x).max(axis=sums.x_axes).reshape(lows.x.shape), out=lows.x)
        np.maximum(highs.x, x.max(axis=sums.x_axes).reshape(highs.x.shape), out=highs.x)
        np.maximum(lows.y, (-y).max(axis=0), out=lows.y)
        np.maximum(highs.y, y.max(axis=0), out=highs.y)
        n += len(x)
    sums.reduce(comm)
    comm.allreduce_sum(n)
    for m in (lows, highs):
        comm.allreduce_max(m.x)
        comm.allreduce_max(m.y)
    lows.x, lows.y = -lows.x, -lows.y
    return sums, lows, highs, n[0]


def _squared_deviations(split, comm, x_mean, y_mean) -> _Moments:
    """Global sums of (x - x_mean)^2 and (y - y_mean)^2: the second pass of the two-pass variance."""
    ss = _Moments(split)
    for x, y in _rows(split, comm):
        ss.add(np.square(x - x_mean), np.square(y - y_mean))
    ss.reduce(comm)
    return ss


def fit(split, comm, kind: str, targets: bool, regression: bool) -> Normalizer:
    """Normalization statistics of a split (every rank calls it); constant features get scale 1."""
    if kind not in KINDS:
        raise ValueError(f"normalize kind {kind!r} is not one of {KINDS}")
    if kind == "none" and not regression:
        return Normalizer()
    sums, lo, hi, n = _first_pass(split, comm)
    n_x = n * math.prod(split.x_shape[1:]) if len(split.x_shape) > 1 else n  # values per channel of images
    mean = _Moments(split)
    mean.x, mean.y = sums.x / n_x, sums.y / n
    arrays = {"y_mean": mean.y} if regression else {}
    ss = _squared_deviations(split, comm, mean.x, mean.y) if kind == "standard" or targets else None
    if kind == "standard":
        arrays.update(x_shift=mean.x, x_scale=np.where(hi.x > lo.x, np.sqrt(ss.x / n_x), 1.0))
    elif kind == "minmax":
        arrays.update(x_shift=lo.x, x_scale=np.where(hi.x > lo.x, hi.x - lo.x, 1.0))
    if regression and targets:
        arrays.update(y_shift=mean.y, y_scale=np.where(hi.y > lo.y, np.sqrt(ss.y / n), 1.0))
    return Normalizer(arrays)
