"""Stall watchdog: abort the job, naming the missing ranks, when a collective waits too long."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from time import monotonic

import numpy as np

from ..errors import EXIT_CRASH

STATE_BYTES = 3 * 8  # a state is 3 float64 (see Watchdog._state)
SIGNAL_GRACE = 2.0  # s a rank waits in a collective after a stop signal before it checks its peers are alive
TICK = 0.05  # s between the thread's looks for queries


def rank_table(comm) -> str:
    """'rank=pid@host' for every rank (collective), so a launcher's 'PID P at HOST' names a rank."""
    where = comm.gather_obj(f"{comm.rank}={os.getpid()}@{comm.host}")
    return "ranks (rank=pid@host): " + " ".join(where) if comm.is_root else ""


def on_hosts(ranks, hosts) -> str:
    """'2, 3 on n2, 4 on n3': the ranks grouped by the host they run on."""
    groups = {}
    for r in ranks:
        groups.setdefault(hosts[r], []).append(str(r))
    return ", ".join(f"{', '.join(rs)} on {host}" for host, rs in groups.items())


class Watchdog:
    """A daemon thread that aborts the job when this rank waits in a collective > timeout seconds.

    It also ends this rank when a stop signal (SIGTERM, SIGUSR1, SIGINT) arrived while it waits
    in a collective that a silent peer (frozen, dead, cut off) keeps from ending: the signal's
    Python handler cannot run until the collective returns, so the thread watches the signal
    wake-up pipe instead."""

    def __init__(self, comm, timeout: float, step_of=lambda: -1, command: str = "train", strict: bool = True):
        # strict: a rank that answers but is not in the collective counts as missing; else (commands
        # whose other ranks wait while rank 0 works alone) only a rank that does not answer does
        self.comm, self.step_of, self.command, self.strict = comm, step_of, command, strict
        self.since: float | None = None  # when this rank entered the collective it is in, else None
        self._patient_until = 0.0  # not strict: when to ask again after every rank answered
        self.signalled: tuple[int, float] | None = None  # (signal, when) of the first stop signal
        self._done = threading.Event()
        self._thread = None
        self._pipe = None
        self.active = comm.size > 1
        if self.active:
            # Collective: every rank creates it at the same point. Queries go over plain TCP, not
            # MPI: MPI may be wedged by the very failure (MPICH over UCX crashed when a rank
            # queried a peer whose node had died), and a refused connection tells a dead process
            # from a silent one.
            self._server = socket.create_server(("", 0), backlog=comm.size)
            self._server.setblocking(False)
            where = comm.bcast_obj(comm.gather_obj((comm.host, self._server.getsockname()[1])))
            self.hosts, self._ports = [h for h, _ in where], [p for _, p in where]
        self.set_timeout(timeout)

    def set_timeout(self, timeout: float):
        """Seconds a collective may wait before the job is aborted (0 = never)."""
        self.timeout = float(timeout)
        self.poll = min(1.0, self.timeout / 4) if self.timeout > 0 else 1.0

    def start(self) -> Watchdog:
        """Start watching (nothing in a world of one); call from the main thread."""
        if self.active:
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
            self._old_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            self._thread = threading.Thread(target=self._watch, name="distbp-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """Stop the thread (from the main thread)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._pipe:
                os.close(fd)
        if self.active:
            self._server.close()

    def watched(self):
        """The comm to use while watching: its collectives mark this rank as waiting."""
        return WatchedComm(self.comm, self) if self.active else self.comm

    def _watch(self):
        """Thread body (see _check); an error in it ends this rank rather than the watching."""
        try:
            self._check()
        except Exception as e:
            print(f"distbp: rank {self.comm.rank}: the stall watchdog failed ({type(e).__name__}: {e}); "
                  "ending this rank", file=sys.stderr, flush=True)
            self.comm.abort(EXIT_CRASH)

    def _check(self):
        """Answer other ranks' queries; on a timeout, or a signal while stuck, find who is missing."""
        while not self._done.wait(TICK):
            self._answer_queries()
            self._note_signals()
            since, now = self.since, monotonic()
            if since is None:
                continue
            if self.timeout > 0 and now - since > self.timeout and now > self._patient_until:
                self._diagnose_and_abort(self.step_of())
            elif self.signalled and now - max(since, self.signalled[1]) > SIGNAL_GRACE:
                self._exit_if_peers_silent(now - since)

    def _note_signals(self):
        """Record the first stop signal written to the wake-up pipe."""
        try:
            got = os.read(self._pipe[0], 64)
        except BlockingIOError:
            return
        stops = [s for s in got if s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
        if stops and self.signalled is None:
            self.signalled = (stops[0], monotonic())

    def _state(self) -> np.ndarray:
        """[step, 1 if waiting in a collective else 0, seconds waited]."""
        since = self.since
        return np.array([self.step_of(), since is not None, monotonic() - since if since else 0.0])

    def _answer_queries(self):
        """Reply with our state to every query that has arrived."""
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # none waiting (or the socket was closed)
                return
            with conn:
                try:
                    conn.sendall(self._state().tobytes())
                except OSError:  # the asking rank gave up
                    pass

    def _ask(self, r: int) -> tuple[str, np.ndarray | None]:
        """('answered', state) of rank r, or ('gone', None) if its process is dead, or ('silent', None)."""
        data = b""
        try:
            with socket.create_connection((self.hosts[r], self._ports[r]), timeout=2 * self.poll + 1.0) as s:
                while len(data) < STATE_BYTES and (chunk := s.recv(STATE_BYTES - len(data))):
                    data += chunk
        except ConnectionRefusedError:  # its host answers but nothing listens: the process is gone
            return "gone", None
        except OSError:  # timed out, or its host cannot be reached
            pass
        return ("answered", np.frombuffer(data)) if len(data) == STATE_BYTES else ("silent", None)

    def _query(self) -> tuple[dict[int, np.ndarray], set[int]]:
        """Ask every other rank for its state: ({rank: state} of those that answer, ranks whose process is gone)."""
        others = [r for r in range(self.comm.size) if r != self.comm.rank]
        with ThreadPoolExecutor(max_workers=min(64, len(others))) as pool:
            asked = {r: pool.submit(self._ask, r) for r in others}
            while not all(f.done() for f in asked.values()):
                self._answer_queries()  # the other waiting ranks are asking us at the same time
                time.sleep(0.01)
        replies = {r: f.result() for r, f in asked.items()}
        return ({r: state for r, (kind, state) in replies.items() if kind == "answered"},
                {r for r, (kind, _) in replies.items() if kind == "gone"})

    def _where(self, step: int) -> str:
        """'the collective of step S', or of the command outside the training loop."""
        return f"the collective of step {step}" if step >= 0 else f"a collective of distbp {self.command}"

    def _diagnose_and_abort(self, step: int):
        """Ask every rank for its state, wait a grace period, report the ranks that did not answer."""
        me, size = self.comm.rank, self.comm.size
        states, gone = self._query()
        waiting = sorted([me] + [r for r, s in states.items() if s[1] and s[0] == step])
        missing = [r for r in range(size) if r not in waiting]
        if not self.strict and all(r in states for r in missing):  # alive and busy (rank 0 working alone)
            self._patient_until = monotonic() + self.timeout
            return
        if me != waiting[0]:  # the lowest waiting rank reports; the others back it up a little later
            self._done.wait(3 * self.poll + 2.0)
        detail = "; ".join(f"rank {r} " + (f"is at step {int(states[r][0])}, not in this collective" if r in states
                                           else "is gone (its process ended)" if r in gone
                                           else "did not answer (frozen, cut off or its node is down)")
                           for r in missing)
        print(f"distbp: stall: rank(s) {on_hosts(missing, self.hosts) or 'none'} did not arrive at "
              f"{self._where(step)} within train.stall_timeout={self.timeout:g} s; ranks "
              f"{on_hosts(waiting, self.hosts)} waited ({detail}); aborting the job. HINT: check those "
              f"ranks' host (network link, file system, memory, signals), or raise train.stall_timeout if "
              f"steps legitimately take that long", file=sys.stderr, flush=True)
        self.comm.abort(EXIT_CRASH)

    def _exit_if_peers_silent(self, waited: float):
        """After a stop signal: end this rank now if a peer does not answer (it cannot end the collective)."""
        silent = sorted(set(range(self.comm.size)) - {self.comm.rank} - set(self._query()[0]))
        if not silent:
            self.signalled = (self.signalled[0], monotonic())  # peers alive (say writing a checkpoint): ask later
            return
        signum = self.signalled[0]
        print(f"distbp: rank {self.comm.rank} got {signal.Signals(signum).name} while waiting {waited:.0f} s in "
              f"{self._where(self.step_of())}, and rank(s) {on_hosts(silent, self.hosts)} do not answer "
              "(frozen, dead or cut off): exiting now without a checkpoint", file=sys.stderr, flush=True)
        self.comm.abort(128 + signum)


@contextlib.contextmanager
def watching(comm, timeout: float, command: str = "train", strict: bool = True):
    """comm with its collectives watched (timeout s, 0 = off) in the block; a watched comm just gets the timeout."""
    if isinstance(comm, WatchedComm):
        comm.watchdog.set_timeout(timeout)
        yield comm
        return
    dog = Watchdog(comm, timeout, command=command, strict=strict).start()
    try:
        yield dog.watched()
    finally:
        dog.stop()


def configure(comm, timeout: float | None = None, step_of=None):
    """Set the stall timeout and/or the step source of the watchdog behind comm (nothing if it is not watched)."""
    if isinstance(comm, WatchedComm):
        if timeout is not None:
            comm.watchdog.set_timeout(timeout)
        if step_of is not None:
            comm.watchdog.step_of = step_of


# wait_all: a rank waiting for a non-blocking collective (an overlapped gradient bucket) waits in it
WATCHED = ("allreduce_sum", "allreduce_max", "bcast", "barrier", "exchange", "allgatherv", "reduce_scatter_sum",
           "wait_all", "gatherv", "bcast_obj", "gather_obj", "node_cpus", "allocate_shared")


class WatchedComm:
    """A Comm whose collectives (WATCHED) tell the watchdog when this rank starts and stops waiting."""

    def __init__(self, comm, dog: Watchdog):
        self._inner, self.watchdog = comm, dog
        # copied, not delegated: the loop reads them every step
        self.rank, self.size, self.is_root, self.host = comm.rank, comm.size, comm.is_root, comm.host
        self.local_rank, self.local_size = comm.local_rank, comm.local_size
        for name in WATCHED:
            setattr(self, name, self._watched(getattr(comm, name)))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _watched(self, collective):
        """collective, with the time this rank waits in it visible to the watchdog."""
        dog = self.watchdog

        def call(*args, **kwargs):
            dog.since = monotonic()
            try:
                return collective(*args, **kwargs)
            finally:
                dog.since = None
        call.__doc__ = collective.__doc__
        return call
