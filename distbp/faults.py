"""Fault injection for tests: DISTBP_FAULT='rank=R,step=S,kind=K[;...]' makes rank R fail at step S."""
from __future__ import annotations

import os
import resource
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import UserError

ENV = "DISTBP_FAULT"
KINDS = ("raise", "exit", "kill", "stop", "slow", "nan", "oom", "diskfull", "readonly")
OOM_HEADROOM = 256 << 20  # kind=oom: address space allowed beyond what the process already maps
DISKFULL_BYTES = 1 << 20  # kind=diskfull: no file this process writes may grow past this size
SLOW_SECONDS = 2.0  # kind=slow: a late but live rank, which the stall watchdog must tolerate
NOBODY = 65534  # kind=readonly: the unprivileged uid root switches to, as root ignores file modes
WHAT = {"raise": "raise InjectedFault", "exit": "sys.exit(1)", "kill": "SIGKILL", "stop": "SIGSTOP (frozen)",
        "slow": f"sleeping {SLOW_SECONDS:g} s",
        "nan": "NaN in the local gradient",
        "oom": f"allocating memory until it runs out (address space capped at +{OOM_HEADROOM >> 20} MiB)",
        "diskfull": f"files may no longer grow past {DISKFULL_BYTES >> 20} MiB (RLIMIT_FSIZE)",
        "readonly": f"write permission lost (effective uid {NOBODY}, which owns nothing)"}


class InjectedFault(RuntimeError):
    """The error kind=raise raises."""


@dataclass(frozen=True)
class Fault:
    """One planned failure: rank `rank` does `kind` when it reaches step `step`."""
    rank: int
    step: int
    kind: str


def parse(text: str) -> list[Fault]:
    """The faults in a DISTBP_FAULT value; UserError naming the bad part."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        try:
            fields = dict(kv.split("=", 1) for kv in item.split(","))
            fault = Fault(int(fields.pop("rank")), int(fields.pop("step")), fields.pop("kind").strip())
        except (KeyError, ValueError):
            fields, fault = {}, None
        if fault is None or fields or fault.kind not in KINDS:
            raise UserError(f"{ENV}={text!r}: '{item}' must look like rank=1,step=5,kind=raise with kind "
                            f"one of {', '.join(KINDS)}; HINT: unset {ENV} outside fault-injection tests")
        faults.append(fault)
    return faults


_PLAN: list[Fault] | None = None


def inject(rank: int, step: int, grads: np.ndarray) -> None:
    """Carry out the faults planned for this rank at this step (nothing when DISTBP_FAULT is unset)."""
    global _PLAN
    if _PLAN is None:
        _PLAN = parse(os.environ.get(ENV, ""))
    for fault in _PLAN:
        if fault.rank == rank and fault.step == step:
            _do(fault, grads)


def _do(fault: Fault, grads: np.ndarray):
    """Carry out one fault, announced on stderr first (the only trace a SIGKILL leaves in the log)."""
    kind = fault.kind
    print(f"distbp: fault injection: rank {fault.rank} at step {fault.step}: {WHAT[kind]}",
          file=sys.stderr, flush=True)
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {fault.rank} at step {fault.step}")
    if kind == "exit":
        sys.exit(1)
    if kind in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    elif kind == "slow":
        time.sleep(SLOW_SECONDS)
    elif kind == "nan":
        grads.flat[0] = np.nan  # the first parameter of the first layer
    elif kind == "oom":
        _exhaust_memory()
    elif kind == "diskfull":
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISKFULL_BYTES, DISKFULL_BYTES))
    elif kind == "readonly":
        if os.geteuid() != 0:
            raise UserError(f"{ENV}: kind=readonly needs root; as another user chmod the folder read-only")
        os.seteuid(NOBODY)  # files already open stay writable, new ones in root's folders are denied


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
