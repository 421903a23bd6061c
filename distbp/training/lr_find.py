"""`distbp lr-find CONFIG`: an exponential learning-rate sweep over a few hundred steps (Lightning's
Tuner.lr_find, fastai's lr_find), the loss against the rate, and a suggested rate."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import Config, config_to_dict
from ..errors import UserError, agree, on_root
from ..files.bounded import written_here

DIVERGED = 4.0  # the smoothed loss is taken as diverged past this many times its lowest (Lightning's threshold)
SKIP_START = 10  # first steps left out of the suggestion: the smoothed loss starts on few points


def sweep_rates(start: float, end: float, steps: int) -> np.ndarray:
    """steps rates from start to end, evenly spaced in log scale."""
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def smooth(losses, beta: float | None = None) -> np.ndarray:
    """Exponential moving average with its start-up bias removed; the default weight averages over about 5%
    of the sweep (fastai's 0.98 smears a 200-step sweep over more than a decade of rates)."""
    beta = min(0.98, max(0.6, 1 - 20 / max(len(losses), 1))) if beta is None else beta
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return np.array(out)


def suggest(rates: np.ndarray, losses: np.ndarray) -> dict:
    """The sweep up to divergence (a non-finite loss, or the smoothed loss past DIVERGED times its lowest so
    far) and the suggested rate: a third of the rate where the smoothed loss is lowest. Measured on the
    digits: the MLP's lowest is at 0.19 (suggesting 0.063; it trains well at 0.05), digits-cnn's at 0.038 on
    8x8 and 0.018 on 28x28 images, where the loss diverges from 0.033 (suggesting 0.013 and 0.006; 28x28
    trains to 97.5% at 0.01 and 94.4% at 0.05)."""
    finite = np.isfinite(losses)
    end = int(np.argmin(finite)) if not finite.all() else len(losses)
    s = smooth(losses[:end])
    over = np.nonzero(s > DIVERGED * np.minimum.accumulate(s))[0]
    end = int(over[0]) if len(over) else end
    if end < SKIP_START + 3:
        raise UserError(f"the loss diverged after {end} of {len(losses)} sweep steps, too few to suggest a rate; "
                        "HINT: lower --start (and --end)")
    low = SKIP_START + int(np.argmin(s[SKIP_START:end]))
    return {"suggested_lr": float(rates[low] / 3), "min_loss_lr": float(rates[low]),
            "diverged_at_lr": float(rates[end]) if end < len(rates) else None, "steps_used": end}


def sweep_config(cfg: Config, data_path: str, steps: int) -> Config:
    """The run's config for the sweep: steps optimizer steps at a constant schedule, no evaluation, no
    early stop, no trackers, every step logged, a non-finite step skipped."""
    d = config_to_dict(cfg)
    d["data"].update(path=data_path, val_split="")
    d["train"].update(max_steps=steps, epochs=10**9, log_every=1, nonfinite="skip", early_stop_patience=0,
                      eval_every=0)
    d["optim"].update(schedule="constant", warmup_steps=0)
    d["checkpoint"].update(every_steps=0, every_seconds=0.0, keep_best=False, keep=1)
    d["log"].update(tensorboard=False, mlflow=False)
    return Config(d)


def check_sweep(start: float, end: float, steps: int):
    """A UserError unless 0 < start < end and the sweep has enough steps to smooth and suggest."""
    if not (0 < start < end) or steps < SKIP_START + 10:
        raise UserError(f"--start {start:g} --end {end:g} --steps {steps}: need 0 < start < end and at least "
                        f"{SKIP_START + 10} steps, e.g. --start 1e-6 --end 1 --steps 200")


def read_losses(run_dir: Path) -> list[float]:
    """The loss of every step of the sweep's metrics.jsonl (NaN for a skipped, non-finite step)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [math.nan if r.get("skipped") else r["loss"] for r in lines if "lr" in r]


def find_lr(cfg: Config, comm, steps: int, start: float, end: float) -> dict | None:
    """Train steps steps of cfg's model with the rate swept from start to end; every rank gets the sweep and
    the suggestion."""
    from ..datasets.dataset import digits_path
    from .loop import run
    agree(comm, check_sweep, start, end, steps)
    rates = sweep_rates(start, end, steps)
    data_path = str(Path(cfg.data.path or digits_path()).resolve())
    folder = Path(comm.bcast_obj(tempfile.mkdtemp(prefix="distbp-lr-find-") if comm.is_root else None))
    try:
        # the sweep's log lines stay in its train.log
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), written_here(folder):
            run(sweep_config(cfg, data_path, steps), comm, folder / "run", "never", progress="none",
                        lr_at=lambda step: float(rates[min(step, steps - 1)]))
        losses = np.array(comm.bcast_obj(on_root(comm, read_losses, folder / "run")))
        return {"lr": rates[:len(losses)].tolist(), "loss": losses.tolist(),
                **agree(comm, suggest, rates[:len(losses)], losses)}
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(folder, ignore_errors=True)


def plot_sweep(result: dict, out: Path, current_lr: float):
    """The loss (raw and smoothed) against the rate in log scale, the suggestion and the config's rate marked."""
    from ..reporting.plot import save_figure, _pyplot_free_figure
    fig = _pyplot_free_figure(figsize=(8, 5))
    ax = fig.subplots()
    rates, losses = np.array(result["lr"]), np.array(result["loss"])
    ax.plot(rates, losses, color="C0", lw=0.8, alpha=0.35, label="loss per step")
    ax.plot(rates[:result["steps_used"]], smooth(losses)[:result["steps_used"]], color="C0", lw=1.8,
            label="smoothed loss (up to divergence)")
    ax.axvline(result["suggested_lr"], color="C2", ls="--", label=f"suggested lr {result['suggested_lr']:.3g}")
    ax.axvline(current_lr, color="C3", ls=":", label=f"config's optim.lr {current_lr:.3g}")
    finite = losses[np.isfinite(losses)]
    if len(finite):  # from below the lowest loss to above the first ones: a diverged tail runs off the top
        ax.set(ylim=(0.9 * finite.min(), 1.3 * float(np.median(finite[:SKIP_START]))))
    ax.set(xscale="log", xlabel="learning rate", ylabel="train loss (batch)", title="learning-rate sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out)
