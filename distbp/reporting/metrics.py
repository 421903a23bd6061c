"""Rank 0's view of a run: log lines, metrics.jsonl, progress display and step timers."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import trackers
from .progress import Progress

from ..errors import UserError

PHASES = ("data", "forward", "backward", "allreduce", "optimizer", "eval", "checkpoint")


def _open_log(path: Path, mode: str, **kwargs):
    """open(path, mode), with a UserError naming the file when it cannot be (a directory, no permission)."""
    try:
        return open(path, mode, **kwargs)
    except OSError as e:
        raise UserError(f"run directory {path.parent}: cannot open {path.name} ({e.strerror}); HINT: "
                        "remove or rename what is there, or choose another --run-dir") from None


class LineFile:
    """A text file lines are appended to, one unbuffered write each; a failed write warns and never raises."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = _open_log(self.path, "ab", buffering=0)
        self.cut = self.f.tell() > 0 and _last_byte(self.path) != b"\n"  # a line cut short by a crash
        self.failing = False

    def write(self, line: str):
        """Append line (and a newline); on a full disk, warn once on stderr and lose the line."""
        data = (("\n" if self.cut else "") + line + "\n").encode()
        try:
            written = self.f.write(data)
        except OSError as e:  # nothing written: the file is as it was
            return self._failed(e.strerror)
        self.cut = written < len(data)  # a partial write stays apart from the next line
        if self.cut:
            return self._failed("partial write, the disk is full")
        self.failing = False

    def _failed(self, why: str):
        """Warn on stderr once per stretch of failures (a full disk fails every write)."""
        if not self.failing:
            print(f"distbp: WARNING: cannot append to {self.path} ({why}); its lines are lost until "
                  "it can be written again", file=sys.stderr, flush=True)
        self.failing = True

    def close(self):
        """Close the file."""
        self.f.close()


def _last_byte(path: Path) -> bytes:
    """The last byte of a file."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class RunLog:
    """Log lines, metrics records (also fed to the trackers) and progress, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, master: bool, progress: Progress | None = None, trackers=()):
        self.master, self.trackers = master, list(trackers)
        self.metrics = LineFile(run_dir / "metrics.jsonl") if master and run_dir else None
        self.logfile = LineFile(run_dir / "train.log") if master and run_dir else None
        self.display = progress if master else None

    def info(self, msg: str):
        """One log line on rank 0: terminal (above the bar) and train.log."""
        if not self.master:
            return
        if self.display and self.display.bar:
            self.display.bar.write(msg)
        else:
            print(msg, flush=True)
        if self.logfile:
            self.logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}")

    def record(self, **fields):
        """Append one JSON object to metrics.jsonl and hand the same record to each tracker."""
        if self.metrics:
            self.metrics.write(json.dumps(fields))
        for tracker in list(self.trackers):
            try:
                tracker.record(fields)
            except Exception as e:  # a tracker that fails mid-run (say its server went away) never stops training
                self.trackers.remove(tracker)
                self.info(f"WARNING: {type(tracker).__name__} tracking stopped ({type(e).__name__}: {e}); "
                          "metrics.jsonl keeps every record")

    def best(self, key: str, up_to_step: int, direction: str = "max") -> tuple[float, int] | None:
        """Rank 0: the best (value, step) of `key` ("max" or "min") in metrics.jsonl at steps <= up_to_step."""
        if not self.metrics:
            return None
        values = []
        with open(self.metrics.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if key in r and not r.get("summary") and r.get("step", 0) <= up_to_step:
                    values.append((r[key] if direction == "max" else -r[key], -r["step"]))
        best = max(values, default=None)  # the earliest step among equal values
        return None if best is None else (best[0] if direction == "max" else -best[0], -best[1])

    def last_summary(self) -> dict | None:
        """Rank 0: the last summary record of metrics.jsonl."""
        if not self.metrics:
            return None
        found = None
        with open(self.metrics.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                found = r if r.get("summary") else found
        return found

    def progress(self, step: int, epoch: int, samples: int, fields: dict):
        """Advance the bar or print a progress line (see progress.Progress)."""
        if self.display:
            self.display.update(step, epoch, samples, fields)

    def start_progress(self, step: int, samples: int):
        """Count progress (rates, ETA) from the first step of this invocation, a resumed one included."""
        if self.display:
            self.display.start(step, samples)

    def end_progress(self):
        """Close the bar, so that its last line comes before what is logged next (the summary)."""
        if self.display:
            self.display.close()

    def close(self, exit_code: int | None = None):
        """Close the bar, the trackers (with the run's exit code) and the files."""
        self.end_progress()
        for tracker in self.trackers:
            if problem := trackers.close_within(tracker, exit_code, trackers.CLOSE_TIMEOUT_S):
                self.info(f"WARNING: {type(tracker).__name__} did not close cleanly ({problem})")
        self.trackers = []
        for f in (self.metrics, self.logfile):
            if f:
                f.close()


class StepTimer:
    """Accumulates wall time per phase of a step; steady state skips the first steps."""

    def __init__(self, warmup_steps: int = 10):
        self.warmup = warmup_steps
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steady_time = 0.0
        self.steady_samples = 0
        self.all_time, self.all_samples = 0.0, 0
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
        self.all_time += step_seconds
        self.all_samples += samples
        if self.steps > self.warmup:
            self.steady_time += step_seconds
            self.steady_samples += samples

    @property
    def steady(self) -> bool:
        """Whether steps past the warm-up were timed (else the rate counts every step, warm-up included)."""
        return self.steady_time > 0

    def samples_per_s(self) -> float:
        """Steady-state throughput; over every step so far while there are no more than the warm-up steps."""
        if self.steady:
            return self.steady_samples / self.steady_time
        return self.all_samples / self.all_time if self.all_time > 0 else 0.0


TIME_GROUPS = {"data": ("data",), "compute": ("forward", "backward", "optimizer"),
               "communication": ("allreduce",), "eval": ("eval",), "checkpoint": ("checkpoint",)}


def _metric_rows(summary: dict) -> list[tuple[str, str]]:
    """One row per final validation metric, the best one's with its best value and step."""
    rows = []
    for k, v in summary.items():
        if k.startswith("val_") and v is not None:
            best = summary.get(f"best_{k}") if summary.get("best_metric") == k else None
            rows.append((k, f"final {v:.4f}" + (f", best {best:.4f} (step {summary['best_step']})"
                                                 if best is not None else "")))
    return rows


def _time_rows(t: dict, wall: float | None = None) -> list[tuple[str, str]]:
    """Time split into data / compute / communication / eval / checkpoint, with the phases of each, and
    "other" (start-up, trackers, logging: the wall time no phase counted) so the shares add up to the wall time."""
    if wall is not None and t:
        t = {**t, "other": max(wall - sum(t.values()), 0.0)}
    total = sum(t.values()) or 1.0
    groups = {g: [p for p in phases if p in t] for g, phases in TIME_GROUPS.items()}
    grouped = {p for phases in groups.values() for p in phases}
    groups.update({p: [p] for p in t if p not in grouped})  # phases added later get rows of their own
    rows = []
    for group, phases in groups.items():
        if phases:
            v = sum(t[p] for p in phases)
            detail = f"  ({', '.join(f'{p} {t[p]:.2f}' for p in phases)})" if len(phases) > 1 else ""
            why = "  (start-up, trackers, logging)" if group == "other" else ""
            rows.append((f"time {group}", f"{v:8.2f} s {100 * v / total:3.0f}%{detail}{why}"))
    return rows


def format_summary(summary: dict) -> list[str]:
    """The end-of-run summary as a small table: progress, metrics, throughput, where the time went."""
    rows = [("steps", f"{summary['steps']} ({summary['epochs']:.2f} epochs) on {summary['world_size']} rank(s)"),
            *_metric_rows(summary),
            ("samples/s", f"{summary['samples_per_s']:.1f} " + ("(steady state)" if summary.get("steady", True) else
                                                                 f"(all {summary['steps']} steps, warm-up included)")),
            ("wall time", f"{summary['wall_time_s']:.1f} s"),
            ("stopped", summary.get("stopped"))]
    rows = [(k, v) for k, v in rows if v is not None] + _time_rows(summary.get("time_s", {}),
                                                                   summary.get("wall_time_s"))
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]
