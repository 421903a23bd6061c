"""Counter-based random bits: splitmix64 of (seed, step, layer, row, column), no generator state.

The same (seed, step, layer index, global row, column) gives the same bits on any rank and in
any order, so dropout masks do not depend on how the batch is split.
"""

import hashlib

import numpy as np

_GAMMA = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """splitmix64 finalizer on a Python int (mod 2^64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer applied in place to a uint64 array (wraps mod 2^64)."""
    tmp = np.right_shift(z, 30)
    z ^= tmp
    z *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(z, 27, out=tmp)
    z ^= tmp
    z *= np.uint64(0x94D049BB133111EB)
    np.right_shift(z, 31, out=tmp)
    z ^= tmp
    return z


def _as_int(index) -> int:
    """A layer index as an int: itself, or for a sub-layer's path ("3.residual.body.1") a hash of it."""
    if isinstance(index, str):
        return int.from_bytes(hashlib.blake2b(index.encode(), digest_size=8).digest(), "little")
    return int(index)


def dropout_bits(seed: int, step: int, index: int | str, rows: np.ndarray, width: int) -> np.ndarray:
    """Counter-based uint64 bits (len(rows), width) from (seed, step, index, row, column)."""
    key = 0
    for v in (seed, step, _as_int(index)):
        key = _mix_int(((key ^ (int(v) & MASK64)) + _GAMMA) & MASK64)
    row_key = np.asarray(rows, dtype=np.int64).astype(np.uint64)  # (n,)
    row_key ^= np.uint64(key)
    row_key += np.uint64(_GAMMA)
    _mix_array(row_key)
    cols = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(_GAMMA)  # (width,)
    return _mix_array(row_key[:, None] + cols)     # (n, width): splitmix64 stream per row
