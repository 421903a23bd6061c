"""Start-up before MPI: what the launcher says it started, and a deadline for MPI and the watchdog to come up.

A rank frozen or dead before MPI initialisation leaves the others in MPI_Init_thread, which
holds the interpreter lock, so no Python thread or signal handler of theirs can run (measured:
a threading.Timer never fired). The deadline is therefore kept by a forked watcher process,
which needs neither MPI nor the parent's interpreter: it prints what its rank waited for and
kills the rank when the deadline passes before the parent disarms it."""
from __future__ import annotations

import os
import select
import signal
import socket
import stat
import sys
import time

# Launcher variables holding the number of processes it started, most specific first.
LAUNCHER_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
LAUNCHERS = ("mpirun", "mpiexec", "mpiexec.hydra", "prterun", "orterun", "srun")  # process names
TIMEOUT_ENV = "DISTBP_STALL_TIMEOUT"  # seconds, before a command has read train.stall_timeout
DEFAULT_TIMEOUT = 300.0  # the default of train.stall_timeout
PHASES = ("MPI initialisation (mpi4py's import: every rank the launcher started must reach it)",
          "the first collective (the stall watchdog's start: every rank must reach it)")
FLUSH = 0.5  # s for the launcher to forward the watcher's message before the rank is killed


def launcher_size(environ) -> tuple[str, int] | None:
    """(variable, processes) the launcher (mpirun, srun) says it started, or None."""
    names = list(LAUNCHER_ENV)
    if "SLURM_PROCID" in environ:  # inside an srun step, not merely inside an allocation
        names.append("SLURM_STEP_NUM_TASKS")
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return name, int(value)
    return None


def launched(environ) -> bool:
    """Whether a launcher (mpirun, srun) started this process."""
    return any(k in environ for k in RANK_ENV)


def _parent(pid: int) -> tuple[str, int]:
    """(command name, parent pid) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
    return name, int(rest.split()[1])


def launcher_pid(pid: int | None = None, depth: int = 12) -> int | None:
    """The nearest ancestor that is an MPI or SLURM launcher on this node (mpirun, mpiexec, prterun, srun)."""
    pid = pid or os.getpid()
    for _ in range(depth):
        try:
            name, parent = _parent(pid)
        except (OSError, ValueError, IndexError):
            return None
        if name in LAUNCHERS:
            return pid
        if parent <= 1:
            return None
        pid = parent
    return None


_LAUNCHER_PIPES: list[int] = []  # the proxy's ends of stdout/stderr, kept open while rank 0 writes past them


def write_past_the_launcher() -> None:
    """Rank 0 writes its stdout/stderr straight into the pipes its launcher on this node writes to.

    When the reader of `mpirun ... | head` goes, MPICH's mpiexec dies of SIGPIPE at its next write and
    its proxies then SIGKILL every rank (hydra's proxy/pmip.c), which no handler can catch. Written
    past mpiexec, the EPIPE is rank 0's own, the command's QuietPipe silences it and the run goes on
    to its checkpoint. Pipes only: a file reopened through /proc would be written from offset 0.
    """
    pid = launcher_pid()
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not pid or not stat.S_ISFIFO(os.stat(path).st_mode) or os.path.samestat(os.stat(path), os.fstat(fd)):
                continue
            pipe = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails at once (ENXIO) if its reader is gone
        except OSError:
            continue
        os.set_blocking(pipe, True)
        stream.flush()
        _LAUNCHER_PIPES.append(os.dup(fd))  # the proxy's end stays open: it forwards the other ranks
        os.dup2(pipe, fd)
        os.close(pipe)


def launcher_rank(environ) -> int:
    """This process's rank as the launcher numbers it (0 without a launcher)."""
    value = next((environ[k] for k in RANK_ENV if environ.get(k, "").strip().isdigit()), "0")
    return int(value)


def default_timeout(environ) -> float:
    """The stall timeout before a command reads its config: DISTBP_STALL_TIMEOUT, else 300 s (0 = off)."""
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        sys.stderr.write(f"distbp: error: {TIMEOUT_ENV}={text!r} is not a number of seconds >= 0; HINT: unset "
                         f"it for the default {DEFAULT_TIMEOUT:g} s, or give e.g. {TIMEOUT_ENV}=60\n")
        sys.exit(2)
    return seconds


class Deadline:
    """A watcher process that ends this rank unless disarm() comes within `seconds` of arm()."""

    def __init__(self, seconds: float, environ=os.environ):
        self.pid, self._pipe = None, None
        found = launcher_size(environ)
        if seconds <= 0 or found is None or found[1] <= 1:  # a world of one waits for no one
            return
        rank, parent = launcher_rank(environ), os.getpid()
        read, self._pipe = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the watcher: no MPI, no threads, leaves by os._exit only
            os.close(self._pipe)
            code = 1
            try:
                code = _watch(read, seconds, rank, found, parent)
            finally:
                os._exit(code)
        os.close(read)

    def phase(self, k: int):
        """Tell the watcher start-up reached PHASES[k]."""
        if self._pipe is not None:
            os.write(self._pipe, bytes([k]))

    def disarm(self):
        """Start-up is over: the watcher exits."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
            os.waitpid(self.pid, 0)


def _watch(read: int, seconds: float, rank: int, found: tuple[str, int], parent: int) -> int:
    """The watcher's body: follow the phases until the pipe closes (0), or end the parent at the deadline."""
    os.close(1)  # only stderr is needed: the launcher need not wait for this process's stdout
    phase, end = 0, time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if not select.select([read], [], [], left)[0]:
            continue
        got = os.read(read, 16)
        if not got:
            return 0
        phase = got[-1]
    name, n = found
    os.write(2, (f"distbp: start-up: rank {rank} (pid {parent} on {socket.gethostname()}) waited {seconds:g} s "
                 f"for {PHASES[phase]}; not all {n} ranks ({name}={n}) arrived (one is frozen, dead or never "
                 f"started): ending this rank. HINT: check the ranks' hosts and the launcher, or raise "
                 f"{TIMEOUT_ENV} (default {DEFAULT_TIMEOUT:g} s, the bound until a command reads "
                 f"train.stall_timeout)\n").encode())
    time.sleep(FLUSH)
    os.kill(parent, signal.SIGKILL)  # the parent's interpreter may be stuck in C: only a signal ends it
    return 1
