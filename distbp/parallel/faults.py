"""Fault injection for tests: DISTBP_FAULT='rank=R,step=S,kind=K[;...]' makes rank R fail at step S.

Instead of step=S, at=POINT names a place outside the training step (POINTS)."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

ENV = "DISTBP_FAULT"
KINDS = ("raise", "exit", "kill", "stop", "slow", "nan", "oom", "diskfull", "readonly", "fill", "term")
FILL_NAME = "distbp-fill"  # kind=fill: the file of zeros that fills the working directory's file system
POINTS = {"setup": "during set-up (train: before the run directory; eval, predict: after loading the model)",
          "eval": "in evaluation (train's and distbp eval's)", "predict": "in distbp predict's loop",
          "final": "after the last training step, before the final checkpoint",
          "saving": "while rank 0 writes the final checkpoint (its bytes in memory, the file not yet on disk)",
          "summary": "after the final checkpoint, before the summary",
          "startup": "at process start, before MPI is initialised (mpi4py's import)",
          "mpi": "after MPI initialisation, before the stall watchdog starts",
          "command": "once the stall watchdog runs, before the command reads its config",
          "bucket": "right after starting the first gradient bucket's reduction (train.overlap), mid-backward"}
OOM_HEADROOM = 256 << 20  # kind=oom: address space allowed beyond what the process already maps
DISKFULL_BYTES = 1 << 20  # kind=diskfull: no file this process writes may grow past this size
SLOW_SECONDS = 2.0  # kind=slow: a late but live rank, which the stall watchdog must tolerate
NOBODY = 65534  # kind=readonly: the unprivileged uid root switches to, as root ignores file modes
WHAT = {"raise": "raise InjectedFault", "exit": "sys.exit(1)", "kill": "SIGKILL", "stop": "SIGSTOP (frozen)",
        "slow": f"sleeping {SLOW_SECONDS:g} s",
        "nan": "NaN in the local gradient",
        "oom": f"allocating memory until it runs out (address space capped at +{OOM_HEADROOM >> 20} MiB)",
        "diskfull": f"files may no longer grow past {DISKFULL_BYTES >> 20} MiB (RLIMIT_FSIZE)",
        "readonly": f"write permission lost (effective uid {NOBODY}, which owns nothing)",
        "fill": f"filling the working directory's file system ({FILL_NAME}: zeros until ENOSPC)",
        "term": "SIGTERM to itself (as SLURM's preemption or time limit)"}


class InjectedFault(RuntimeError):
    """The error kind=raise raises."""


@dataclass(frozen=True)
class Fault:
    """One planned failure: rank `rank` does `kind` when it reaches step `step` (or the point `at`)."""
    rank: int
    step: int
    kind: str
    at: str = ""


def parse(text: str) -> list[Fault]:
    """The faults in a DISTBP_FAULT value; UserError naming the bad part."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        try:
            fields = dict(kv.split("=", 1) for kv in item.split(","))
            at = fields.pop("at", "").strip()
            step = -1 if at else int(fields.pop("step"))  # a step next to at= is left over: an error
            fault = Fault(int(fields.pop("rank")), step, fields.pop("kind").strip(), at)
        except (KeyError, ValueError):
            fields, fault = {}, None
        if (fault is None or fields or fault.kind not in KINDS or (fault.at and fault.at not in POINTS)
                or (fault.at and fault.kind == "nan")):
            raise UserError(f"{ENV}={text!r}: '{item}' must look like rank=1,step=5,kind=raise or "
                            f"rank=1,at=eval,kind=stop with kind one of {', '.join(KINDS)} (not nan with at=) "
                            f"and at one of {', '.join(POINTS)}; HINT: unset {ENV} outside fault-injection tests")
        faults.append(fault)
    return faults


_PLAN: list[Fault] | None = None


def _plan() -> list[Fault]:
    """The faults DISTBP_FAULT plans (parsed once)."""
    global _PLAN
    if _PLAN is None:
        _PLAN = parse(os.environ.get(ENV, ""))
    return _PLAN


def inject(rank: int, step: int, grads: np.ndarray) -> None:
    """Carry out the faults planned for this rank at this step (nothing when DISTBP_FAULT is unset)."""
    for fault in _plan():
        if fault.rank == rank and fault.step == step and not fault.at:
            _do(fault, grads)


def inject_at(rank: int, point: str) -> None:
    """Carry out the faults planned for this rank at a point of POINTS (nothing when DISTBP_FAULT is unset)."""
    for fault in _plan():
        if fault.rank == rank and fault.at == point:
            _do(fault, None)


def _do(fault: Fault, grads: np.ndarray | None):
    """Carry out one fault, announced on stderr first (the only trace a SIGKILL leaves in the log)."""
    kind = fault.kind
    where = f"at {fault.at}" if fault.at else f"at step {fault.step}"
    print(f"distbp: fault injection: rank {fault.rank} (pid {os.getpid()}) {where}: {WHAT[kind]}",
          file=sys.stderr, flush=True)
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {fault.rank} at step {fault.step}")
    if kind == "exit":
        sys.exit(1)
    if kind in ("kill", "stop", "term"):
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}[kind])
    elif kind == "slow":
        time.sleep(SLOW_SECONDS)
    elif kind == "nan":
        grads.flat[0] = np.nan  # the first parameter of the first layer
    elif kind == "oom":
        _exhaust_memory()
    elif kind == "diskfull":
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISKFULL_BYTES, DISKFULL_BYTES))
    elif kind == "fill":
        _fill_disk()
    elif kind == "readonly":
        if os.geteuid() != 0:
            raise UserError(f"{ENV}: kind=readonly needs root; as another user chmod the folder read-only")
        os.seteuid(NOBODY)  # files already open stay writable, new ones in root's folders are denied


def _fill_disk():
    """Append zeros to FILL_NAME in the working directory until the file system is full (a real ENOSPC)."""
    fd = os.open(FILL_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 16, 512):  # large blocks, then what is left of the last pages
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)


def _exhaust_memory():
    """Allocate and touch 64 MiB blocks under a lowered address-space limit until MemoryError."""
    # A real failed allocation (Python's MemoryError), bounded so it cannot push the machine into
    # swap or wake the kernel's OOM killer for other processes; the OOM killer's own SIGKILL is kind=kill.
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + OOM_HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    blocks = []
    while True:
        blocks.append(np.ones(64 << 20, np.uint8))
