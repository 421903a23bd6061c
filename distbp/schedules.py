"""Learning-rate schedules: pure functions from the 0-based optimizer step to a rate.

Linear warm-up lr*(step+1)/warmup_steps, then the decay kind counting steps from the end of
warm-up, each as its torch.optim.lr_scheduler namesake stepped once per optimizer step: cosine
(CosineAnnealingLR, reaching min_lr at total_steps), step (StepLR: times gamma every step_size
steps), multistep (MultiStepLR: times gamma at each of milestones), exponential (ExponentialLR:
times gamma every step), onecycle (OneCycleLR with cosine annealing, the learning rate only).
plateau (ReduceLROnPlateau) follows evaluations, not steps: Plateau keeps its state. Bad settings
raise ValueError naming the optim.* key.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from .errors import require

SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "onecycle", "plateau")
_require = partial(require, error=ValueError)


def one_cycle(lr: float, s: int, steps: int, pct_start: float, div_factor: float, final_div_factor: float) -> float:
    """torch's OneCycleLR at step s of steps: cosine from lr/div_factor up to lr over pct_start of the steps,
    then down to lr/div_factor/final_div_factor."""
    initial = lr / div_factor
    phases = ((float(pct_start * steps) - 1, initial, lr), (steps - 1, lr, initial / final_div_factor))
    start = 0.0
    for i, (end, a, b) in enumerate(phases):
        if s <= end or i == len(phases) - 1:
            pct = min((s - start) / (end - start), 1.0)
            return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)
        start = end
    raise AssertionError("unreachable")


def make_schedule(kind: str, lr: float, *, total_steps: int, warmup_steps: int = 0,
                  step_size: int = 1000, gamma: float = 0.1, min_lr: float = 0.0, milestones=(),
                  pct_start: float = 0.3, div_factor: float = 25.0,
                  final_div_factor: float = 1e4) -> Callable[[int], float]:
    """lr(step) for 0-based step: linear warm-up lr*(step+1)/warmup_steps, then the decay kind."""
    _require(kind in SCHEDULES, f"optim.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    _require(lr > 0, f"optim.lr={lr} must be > 0, e.g. 0.01")
    _require(warmup_steps >= 0, f"optim.warmup_steps={warmup_steps} must be >= 0")
    _require(step_size >= 1, f"optim.step_size={step_size} must be >= 1")
    _require(gamma > 0, f"optim.gamma={gamma} must be > 0, e.g. 0.1")
    _require(0 <= min_lr <= lr, f"optim.min_lr={min_lr} must be in [0, optim.lr={lr}]")
    _require(list(milestones) == sorted(set(milestones)) and all(m >= 1 for m in milestones),
             f"optim.milestones={list(milestones)} must be increasing steps of at least 1, e.g. [1000, 2000]")
    _require(0 < pct_start < 1, f"optim.pct_start={pct_start} must be in (0, 1), e.g. 0.3")
    _require(div_factor > 0 and final_div_factor > 0,
             f"optim.div_factor={div_factor} and optim.final_div_factor={final_div_factor} must be > 0")
    decay_steps = total_steps - warmup_steps
    _require(kind not in ("cosine", "onecycle") or decay_steps >= 1 + (kind == "onecycle"),
             f"the {kind} schedule needs more total steps ({total_steps}) than "
             f"optim.warmup_steps={warmup_steps}: lower warmup_steps or train longer")

    def decay(s: int) -> float:
        """The schedule kind at s steps after warm-up."""
        if kind == "step":
            return lr * gamma ** (s // step_size)
        if kind == "multistep":
            return lr * gamma ** sum(m <= s for m in milestones)
        if kind == "exponential":
            return lr * gamma ** s
        if kind == "onecycle":
            return one_cycle(lr, min(s, decay_steps - 1), decay_steps, pct_start, div_factor, final_div_factor)
        if kind == "cosine":
            return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(s, decay_steps) / decay_steps)) / 2
        return lr

    def schedule(step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return float(decay(step - warmup_steps))

    return schedule


PLATEAU_KEYS = ("plateau_lr", "plateau_best", "plateau_bad", "plateau_cooldown")  # checkpoint attributes


class Plateau:
    """torch's ReduceLROnPlateau (relative threshold) on the evaluations of one metric; state saved in checkpoints."""

    def __init__(self, lr: float, mode: str, factor: float, patience: int, threshold: float, cooldown: int,
                 min_lr: float):
        _require(factor < 1, f"optim.gamma={factor} must be < 1 for the plateau schedule (the factor it "
                             "multiplies the rate by), e.g. 0.1")
        self.lr, self.mode, self.factor, self.patience = lr, mode, factor, patience
        self.threshold, self.cooldown, self.min_lr = threshold, cooldown, min_lr
        self.best, self.bad, self.cooldown_left = (math.inf if mode == "min" else -math.inf), 0, 0

    def _better(self, value: float) -> bool:
        """value beats best by more than the relative threshold (a NaN never does)."""
        if self.mode == "min":
            return value < self.best * (1 - self.threshold)
        return value > self.best * (1 + self.threshold)

    def step(self, value: float) -> bool:
        """Count one evaluation's value; True when it lowered the rate."""
        if self._better(value):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left, self.bad = self.cooldown_left - 1, 0
        if self.bad <= self.patience:
            return False
        self.bad, self.cooldown_left = 0, self.cooldown
        new = max(self.lr * self.factor, self.min_lr)
        if self.lr - new <= 1e-8:  # torch's eps: changes smaller than that are ignored
            return False
        self.lr = new
        return True

    def state(self) -> dict:
        """What a checkpoint keeps."""
        return dict(zip(PLATEAU_KEYS, (self.lr, self.best, self.bad, self.cooldown_left)))

    def load(self, attrs: dict) -> None:
        """Continue from a checkpoint's state (absent keys: a run without it)."""
        if "plateau_lr" in attrs:
            self.lr, self.best = float(attrs["plateau_lr"]), float(attrs["plateau_best"])
            self.bad, self.cooldown_left = int(attrs["plateau_bad"]), int(attrs["plateau_cooldown"])
