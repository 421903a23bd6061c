"""Gradient clipping as torch.nn.utils: the global L2 norm, then scale (clip_grad_norm_) or clamp (clip_grad_value_).

The norm is built from each rank's sum of squares of the part of the gradient it holds,
summed over the ranks, so it is the norm of the whole gradient whether a rank holds all
of it (after an allreduce: no communication needed) or a slice (a sharded optimizer).
"""
from __future__ import annotations

import math

import numpy as np


BLOCK = 4096  # entries summed in g's dtype before the float64 sum of the blocks


def sum_of_squares(g: np.ndarray) -> float:
    """sum(g**2) by numpy's own loops (no BLAS threads: the bits depend on g alone), blocks added in float64."""
    head = len(g) - len(g) % BLOCK
    blocks = g[:head].reshape(-1, BLOCK)
    tail = g[head:]
    return float(np.einsum("ij,ij->i", blocks, blocks).sum(dtype=np.float64)
                 + np.einsum("i,i->", tail, tail, dtype=np.float64))


def global_norm(g: np.ndarray, comm=None) -> float:
    """L2 norm of the whole gradient from this rank's part g; comm sums the parts (None: g is the whole)."""
    total = np.array([sum_of_squares(g)])
    if comm is not None:
        comm.allreduce_sum(total)
    return math.sqrt(total[0])


def clip_by_norm(g: np.ndarray, max_norm: float, norm: float) -> None:
    """Scale g in place by max_norm / (norm + 1e-6) when that is below 1, as torch.nn.utils.clip_grad_norm_."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        g *= g.dtype.type(coef)


def clip_by_value(g: np.ndarray, value: float) -> None:
    """Clamp every entry of g to [-value, value] in place, as torch.nn.utils.clip_grad_value_."""
    np.clip(g, -value, value, out=g)
