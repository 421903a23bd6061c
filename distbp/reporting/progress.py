"""Rank 0's progress display: a tqdm bar, plain lines (epoch, percent, samples/s, ETA), or nothing."""
from __future__ import annotations

import math
import os
import sys
import time

from tqdm import tqdm

from ..parallel.startup import launched, launcher_pid

MODES = ("auto", "bar", "lines", "none")


def _tty_columns(path: str) -> int | None:
    """Columns of the terminal open at path (a /proc fd link), or None when it is not a terminal."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return (os.get_terminal_size(fd).columns or 80) if os.isatty(fd) else None  # a new pty may say 0
    except OSError:
        return None
    finally:
        os.close(fd)


def terminal_columns() -> int | None:
    """Width of the terminal the user launched from (where a bar would show), None if not a terminal.

    srun --pty exports SLURM_PTY_PORT and the window size. MPICH's hydra and Open MPI do not say
    whether mpirun's output is a terminal, and Open MPI gives every rank a pseudo-terminal of its
    own even when mpirun's output is a file, so a launched rank looks at the stderr of its
    launcher on this node; without one (a rank started from another node) it shows lines.
    """
    if os.environ.get("SLURM_PTY_PORT"):
        return int(os.environ.get("SLURM_PTY_WIN_COL") or 80)
    if not launched(os.environ):
        return _tty_columns("/proc/self/fd/2") if sys.stderr.isatty() else None
    pid = launcher_pid()
    return _tty_columns(f"/proc/{pid}/fd/2") if pid else None


class Progress:
    """A bar, a line every `every` steps, or nothing, over `total` steps of `per_epoch` each."""

    def __init__(self, mode: str, total: int, per_epoch: int, every: int, write):
        columns = terminal_columns() if mode in ("auto", "bar") else None
        self.mode = ("bar" if columns else "lines") if mode == "auto" else mode
        self.total, self.per_epoch, self.every, self.write = total, per_epoch, every, write
        self.epochs = math.ceil(total / per_epoch)
        self.columns, self.bar = columns, None
        self.t0 = self.t_last = time.perf_counter()  # until start(): the bar appears there, after the start-up
        self.step0 = self.samples_last = 0           # lines, counting from the (resumed) step

    def start(self, step: int, samples: int):
        """Start showing progress at a (resumed) step: the bar appears, rates and ETA count from here."""
        self.t0 = self.t_last = time.perf_counter()
        self.step0, self.samples_last = step, samples
        if self.mode == "bar" and self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, unit="step", ncols=self.columns or 100,
                            dynamic_ncols=self.columns is None, file=sys.stderr)

    def update(self, step: int, epoch: int, samples: int, fields: dict):
        """Show step (of 1-based epoch), the samples seen so far and fields such as loss and lr."""
        if self.bar:
            self.bar.set_description(f"epoch {epoch}/{self.epochs}", refresh=False)
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items()}, refresh=True)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            self.write(self.line(step, epoch, samples, fields))

    def line(self, step: int, epoch: int, samples: int, fields: dict) -> str:
        """'epoch E/N  P%  step S/T  loss=...  R samples/s  ETA h:mm:ss' (rate since the last line)."""
        now = time.perf_counter()
        rate = (samples - self.samples_last) / max(now - self.t_last, 1e-9)
        eta = (now - self.t0) / max(step - self.step0, 1) * (self.total - step)
        self.t_last, self.samples_last = now, samples
        values = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        return (f"epoch {epoch}/{self.epochs} {100 * step / self.total:3.0f}% step {step}/{self.total} "
                f"{values} {rate:,.0f} samples/s ETA {tqdm.format_interval(eta)}")

    def close(self):
        """End the bar (its last line stays on screen, above what is printed next)."""
        if self.bar:
            self.bar.close()
            self.bar = None
