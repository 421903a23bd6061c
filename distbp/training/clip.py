"""Gradient clipping as torch.nn.utils: scale by the global norm (clip_grad_norm_) or clamp (clip_grad_value_).

The norm is that of the whole summed gradient: the step's reduction sums each rank's
squares of what it holds (all of it, or its slice with a sharded optimizer) into
StepScalars.grad_sq, so clipping a slice by it clips the whole gradient exactly.
"""
from __future__ import annotations

import numpy as np


def clip_by_norm(g: np.ndarray, max_norm: float, norm: float) -> None:
    """Scale g in place by max_norm / (norm + 1e-6) when that is below 1, as torch.nn.utils.clip_grad_norm_."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        g *= g.dtype.type(coef)


def clip_by_value(g: np.ndarray, value: float) -> None:
    """Clamp every entry of g to [-value, value] in place, as torch.nn.utils.clip_grad_value_."""
    np.clip(g, -value, value, out=g)
