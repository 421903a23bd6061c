"""Callbacks of distbp.train: hooks every rank calls at the same point with the same arguments, a stop every
rank takes after the same step, and custom metrics into metrics.jsonl and the trackers."""
from __future__ import annotations

import numpy as np

HOOKS = ("on_train_start", "on_epoch_end", "on_evaluate", "on_checkpoint", "on_train_end")


class Callback:
    """Override the hooks you need; each is called on every rank with the run (a Run) and the same arguments."""

    def on_train_start(self, run: Run):
        """Before the first step of this call of train (a resumed run starts at run.step)."""

    def on_epoch_end(self, run: Run, metrics: dict):
        """After the last step of an epoch: its exact train_loss (and train_accuracy) and the val metrics."""

    def on_evaluate(self, run: Run, metrics: dict):
        """After each evaluation of the validation split: {"val_loss": ..., ...}."""

    def on_checkpoint(self, run: Run, path: str):
        """After a checkpoint was handed to rank 0's writer (on disk by the next hook; the final one at once)."""

    def on_train_end(self, run: Run, summary: dict):
        """After the final checkpoint, with the summary record that distbp.train returns."""


class Run:
    """What a hook sees of the run (position, ranks, folder) and may do: stop it, log metrics."""

    def __init__(self, trainer):
        self._trainer = trainer
        self.rank, self.world_size, self.run_dir = trainer.comm.rank, trainer.comm.size, trainer.run_dir
        self.stop_reason: str | None = None

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._trainer.pos.step

    @property
    def epoch(self) -> int:
        """The epoch (from 1) the last step belongs to."""
        return self._trainer.pos.epoch_number

    def stop(self, reason: str = "a callback asked to stop"):
        """End training after the current step on every rank (one rank asking is enough), with a final checkpoint."""
        self.stop_reason = reason

    def log(self, **metrics: float):
        """Append {step, epoch, **metrics} to metrics.jsonl and the trackers (rank 0 writes)."""
        self._trainer.runlog.record(step=self.step, epoch=self.epoch, **metrics)


class Callbacks:
    """The run's callbacks in order; after each hook the ranks agree whether one of them asked to stop."""

    def __init__(self, callbacks, trainer):
        self.callbacks, self.comm = list(callbacks or ()), trainer.comm
        for cb in self.callbacks:
            if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
                raise TypeError(f"callback {cb!r} has none of the hooks {', '.join(HOOKS)}: subclass "
                                "distbp.Callback and override the ones you need")
        self.run = Run(trainer)
        self.stopped: str | None = None

    def __call__(self, hook: str, *args) -> bool:
        """Call hook(run, *args) of every callback; True when any rank's callbacks asked to stop."""
        if not self.callbacks:
            return False
        for cb in self.callbacks:
            if callable(fn := getattr(cb, hook, None)):
                fn(self.run, *args)
        asked = self.comm.allreduce_max(np.array([self.run.stop_reason is not None], np.float64))[0] > 0
        if asked and self.stopped is None:  # rank 0's reason when it has one, so the log line is the same
            reasons = self.comm.gather_obj(self.run.stop_reason)
            self.stopped = self.comm.bcast_obj(next(filter(None, reasons or []), None))
        return asked
