"""The run's learning-rate schedule: its horizon in optimizer steps, and what a resume with other settings
changes of it."""
from __future__ import annotations

import math

from ..config import Config, config_from_dict
from ..errors import UserError
from ..schedules import Plateau, make_schedule


def schedule_of(cfg: Config, total: int):
    """The learning rate as a function of the step, over optim.schedule_steps if set, else the run's total."""
    o = cfg.optim
    try:
        return make_schedule(o.schedule, o.lr, total_steps=o.schedule_steps or total, **o.schedule_options())
    except ValueError as e:
        raise UserError(f"optim schedule settings: {e}") from None


def plateau_of(cfg: Config, mode: str) -> Plateau | None:
    """The plateau schedule's state (optim.schedule = "plateau") on train.best_metric in its direction, else None."""
    o = cfg.optim
    if o.schedule != "plateau":
        return None
    try:
        return Plateau(o.lr, mode, o.gamma, o.plateau_patience, o.plateau_threshold, o.plateau_cooldown, o.min_lr)
    except ValueError as e:
        raise UserError(f"optim schedule settings: {e}") from None


def total_steps(cfg: Config, per_epoch: int) -> int:
    """Optimizer steps of the whole run: train.epochs of per_epoch steps, capped by train.max_steps."""
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps >= 0 else total


def schedule_change(old_config: dict, cfg: Config, per_epoch: int, step: int) -> str | None:
    """A warning when a resume moves the schedule's horizon: the learning rate at step before and now."""
    try:
        old = config_from_dict(old_config)
        old_total, total = total_steps(old, per_epoch), total_steps(cfg, per_epoch)
        before, now = schedule_of(old, old_total)(step), schedule_of(cfg, total)(step)
    except UserError:  # the checkpoint's settings make no schedule here (say, another dataset size)
        return None
    if math.isclose(before, now, rel_tol=1e-6):
        return None
    was, span = old.optim.schedule_steps or old_total, cfg.optim.schedule_steps or total
    return (f"WARNING: the {cfg.optim.schedule} learning-rate schedule now spans {span} steps instead of {was}, "
            f"so the rate at the resumed step {step} changes from {before:.3g} to {now:.3g}; HINT: "
            f"--set optim.schedule_steps={was} keeps the original horizon (the rate then stays at its final "
            "value after it)")
