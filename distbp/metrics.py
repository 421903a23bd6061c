"""Rank 0's view of a run: log lines, metrics.jsonl, progress display and step timers."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

PHASES = ("data", "forward", "backward", "allreduce", "optimizer", "eval", "checkpoint")


class RunLog:
    """Log lines, metrics records and progress, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, master: bool, total_steps: int, log_every: int):
        self.master, self.log_every = master, log_every
        self.metrics = open(run_dir / "metrics.jsonl", "a") if master and run_dir else None
        self.logfile = open(run_dir / "train.log", "a") if master and run_dir else None
        use_bar = master and sys.stdout.isatty()
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True) if use_bar else None

    def info(self, msg: str):
        """One log line on rank 0: terminal (above the bar) and train.log."""
        if not self.master:
            return
        if self.bar:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        if self.logfile:
            self.logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.logfile.flush()

    def record(self, **fields):
        """Append one JSON object to metrics.jsonl."""
        if self.metrics:
            self.metrics.write(json.dumps(fields) + "\n")
            self.metrics.flush()

    def progress(self, step: int, fields: dict):
        """Advance the bar, or print a plain line every log_every steps."""
        if not self.master:
            return
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items()}, refresh=True)
        elif step % self.log_every == 0:
            self.info(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in fields.items()))

    def resume_bar(self, step: int):
        """Start the bar at a resumed step."""
        if self.bar:
            self.bar.n = self.bar.last_print_n = step

    def close(self):
        """Close files and the bar."""
        for f in (self.bar, self.metrics, self.logfile):
            if f:
                f.close()


class StepTimer:
    """Accumulates wall time per phase of a step; steady state skips the first steps."""

    def __init__(self, warmup_steps: int = 10):
        self.warmup = warmup_steps
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steady_time = 0.0
        self.steady_samples = 0
        self.steps = 0
        self._t = time.perf_counter()

    def start(self):
        """Mark the start of a timed stretch."""
        self._t = time.perf_counter()

    def lap(self, phase: str):
        """Charge the time since the last mark to phase."""
        now = time.perf_counter()
        self.totals[phase] += now - self._t
        self._t = now

    def step_done(self, step_seconds: float, samples: int):
        """Count one finished step toward steady-state throughput."""
        self.steps += 1
        if self.steps > self.warmup:
            self.steady_time += step_seconds
            self.steady_samples += samples

    def samples_per_s(self) -> float:
        """Steady-state throughput (0 until past the warm-up steps)."""
        return self.steady_samples / self.steady_time if self.steady_time > 0 else 0.0


def format_summary(summary: dict) -> list[str]:
    """The end-of-run summary as a small table."""
    rows = [("steps", summary["steps"]), ("epochs", summary["epochs"]),
            ("world size", summary["world_size"]),
            ("samples/s", f"{summary['samples_per_s']:.1f}"),
            ("final val_loss", summary.get("val_loss")), ("final val_accuracy", summary.get("val_accuracy")),
            ("best val_accuracy", summary.get("best_val_accuracy")),
            ("wall time", f"{summary['wall_time_s']:.1f} s")]
    t = summary.get("time_s", {})
    total = sum(t.values()) or 1.0
    rows += [(f"time {k}", f"{v:.2f} s ({100 * v / total:.0f}%)") for k, v in t.items()]
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]
