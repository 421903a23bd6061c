"""SLURM environment and preemption: a stop signal only sets a flag the loop acts on."""
from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def job_id() -> str | None:
    """SLURM_JOB_ID, or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def describe() -> str | None:
    """One log line about the SLURM job, or None outside SLURM."""
    if job_id() is None:
        return None
    return (f"SLURM job {job_id()} step {os.environ.get('SLURM_STEP_ID', '?')}, "
            f"{os.environ.get('SLURM_NTASKS', '?')} tasks on {os.environ.get('SLURM_JOB_NUM_NODES', '?')} "
            f"node(s), restart {restart_count()}")


class StopRequest:
    """Set by SIGUSR1/SIGTERM/SIGINT; the step's allreduce makes every rank see it."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self):
        """Replace the stop signals' handlers with one that records the signal."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        """Record the signal; a second SIGINT falls back to the usual KeyboardInterrupt."""
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived on this rank."""
        return self.signum != 0

    def restore(self):
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
