"""Learning-rate schedules: pure functions from the 0-based optimizer step to a rate.

Linear warm-up lr*(step+1)/warmup_steps, then the decay kind counting steps from the end of
warm-up (cosine reaches min_lr at total_steps; step multiplies by gamma every step_size steps,
like torch's StepLR). Bad settings raise ValueError naming the optim.* key.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from .errors import require

SCHEDULES = ("constant", "step", "cosine")
_require = partial(require, error=ValueError)


def make_schedule(kind: str, lr: float, *, total_steps: int, warmup_steps: int = 0,
                  step_size: int = 1000, gamma: float = 0.1,
                  min_lr: float = 0.0) -> Callable[[int], float]:
    """lr(step) for 0-based step: linear warm-up lr*(step+1)/warmup_steps, then the decay kind."""
    _require(kind in SCHEDULES, f"optim.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    _require(lr > 0, f"optim.lr={lr} must be > 0, e.g. 0.01")
    _require(warmup_steps >= 0, f"optim.warmup_steps={warmup_steps} must be >= 0")
    _require(step_size >= 1, f"optim.step_size={step_size} must be >= 1")
    _require(gamma > 0, f"optim.gamma={gamma} must be > 0, e.g. 0.1")
    _require(0 <= min_lr <= lr, f"optim.min_lr={min_lr} must be in [0, optim.lr={lr}]")
    decay_steps = total_steps - warmup_steps
    _require(kind != "cosine" or decay_steps >= 1,
             f"the cosine schedule needs more total steps ({total_steps}) than "
             f"optim.warmup_steps={warmup_steps}: lower warmup_steps or train longer")

    def decay(s: int) -> float:
        """The schedule kind at s steps after warm-up."""
        if kind == "step":
            return lr * gamma ** (s // step_size)
        if kind == "cosine":
            return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(s, decay_steps) / decay_steps)) / 2
        return lr

    def schedule(step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return float(decay(step - warmup_steps))

    return schedule
