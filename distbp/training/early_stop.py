"""Early stopping: evaluations without improvement of the best metric, as Keras' and Lightning's EarlyStopping."""
from __future__ import annotations

import math
from dataclasses import dataclass

EARLY_STOP_KEYS = ("early_stop_best", "early_stop_best_step", "early_stop_wait")  # checkpoint attributes


@dataclass
class EarlyStopping:
    """Counts evaluations since the metric last beat `best` by more than min_delta; state saved in checkpoints."""
    metric: str
    direction: str  # "max" or "min"
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = 0
    wait: int = 0

    def update(self, value: float, step: int) -> bool:
        """Count one evaluation's value; True when patience evaluations in a row have not improved."""
        sign = 1.0 if self.direction == "max" else -1.0
        if math.isfinite(value) and (self.best is None or sign * (value - self.best) > self.min_delta):
            self.best, self.best_step, self.wait = value, step, 0
        else:  # a NaN metric never improves
            self.wait += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        """Patience is on and used up."""
        return 0 < self.patience <= self.wait

    def reason(self) -> str:
        """Why the run stopped, for the summary."""
        best = "no finite value" if self.best is None else f"best {self.best:.6g} at step {self.best_step}"
        return (f"early stop: {self.metric} did not improve by more than {self.min_delta:g} for {self.wait} "
                f"evaluation(s) (train.early_stop_patience={self.patience}); {best}")

    def state(self) -> dict:
        """What a checkpoint keeps (the metric's best, its step, the patience counter); nothing before an evaluation."""
        if self.best is None and not self.wait:
            return {}
        return dict(zip(EARLY_STOP_KEYS, (float("nan") if self.best is None else self.best, self.best_step,
                                          self.wait)))

    def load(self, attrs: dict) -> None:
        """Continue from a checkpoint's state (absent keys: a run without early-stopping state)."""
        if "early_stop_wait" in attrs:
            best = float(attrs["early_stop_best"])
            self.best = best if math.isfinite(best) else None
            self.best_step = int(attrs["early_stop_best_step"])
            self.wait = int(attrs["early_stop_wait"])
