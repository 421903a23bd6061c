"""The end of a run: the best weights kept in memory (train.restore_best ends on them), the per-class report of
the best weights on the validation split, and the test split's metrics when the dataset has one."""
from __future__ import annotations

import numpy as np

from ..errors import agree
from ..inference.evaluate import evaluate
from ..reporting.scores import format_report


class BestWeights:
    """A copy of the parameters and buffers (BatchNorm statistics) at the best evaluation, with its metrics."""

    def __init__(self):
        self.params = self.buffers = None
        self.result: dict = {}

    def keep(self, model, result: dict):
        """Copy the model's current state as the best."""
        self.params, self.buffers = model.params.copy(), model.buffers.copy()
        self.result = dict(result)

    def swap(self, model):
        """Exchange the model's state with the kept one (twice is a no-op)."""
        for mine, its in ((self.params, model.params), (self.buffers, model.buffers)):
            held = its.copy()
            its[...] = mine
            mine[...] = held


def keep_best_on(cfg) -> bool:
    """checkpoint.keep_best, "auto" meaning on with early stopping or train.restore_best."""
    keep = cfg.checkpoint.keep_best
    return bool(cfg.train.early_stop_patience or cfg.train.restore_best) if keep == "auto" else bool(keep)


def restore_best(trainer):
    """train.restore_best: the model takes the best evaluation's weights, the summary its metrics."""
    t, best = trainer, trainer.best_weights
    if best.params is None or t.best is None or t.best[1] == t.pos.step:
        return
    best.swap(t.model)
    best.params = best.buffers = None
    t.restored, t.result = True, best.result
    t.log(f"restored the weights of the best evaluation, step {t.best[1]} ({t.metric} {t.best[0]:.4f}): the final "
          "checkpoint holds them (train.restore_best)")


def final_reports(trainer) -> dict:
    """Log the per-class report of the best weights on the validation split (classification) and evaluate the
    test split if there is one; returns {"test_loss": ..., ...} for the summary."""
    t, best = trainer, trainer.best_weights
    swapped = best.params is not None and t.best is not None and t.best[1] != t.pos.step
    if swapped:  # the best weights, the final ones put back afterwards
        best.swap(t.model)
    try:
        on_best = swapped or t.restored or (t.best is not None and t.best[1] == t.pos.step)
        which = f"the best weights (step {t.best[1]})" if on_best else f"the final weights (step {t.pos.step})"
        if t.val_split is not None and t.data.class_names:
            result = evaluate(t.model, t.loss, t.val_split, t.comm, t.task, t.norm, t.data.class_names)
            t.log(f"validation split, {which}:\n" + "\n".join(format_report(result["report"])))
        if "test" not in t.data.splits or t.cfg.data.val_split == "test":
            return {}
        test = agree(t.comm, t.data.split, "test")
        agree(t.comm, test.load, t.cfg.data.memory_mb * 2**20, t.comm)
        result = evaluate(t.model, t.loss, test, t.comm, t.task, t.norm)
        metrics = {"test_" + k[len("val_"):]: v for k, v in result.items() if isinstance(v, float | np.floating)}
        t.runlog.record(step=t.pos.step, epoch=t.pos.epoch_number, weights_of_step=t.best[1] if on_best else t.pos.step,
                        **metrics)
        t.log(f"test split ({test.n} rows), {which}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics
    finally:
        if swapped:
            best.swap(t.model)
