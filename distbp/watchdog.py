"""Stall watchdog: abort the job, naming the missing ranks, when a collective waits too long."""
from __future__ import annotations

import os
import sys
import threading
import time
from time import monotonic

import numpy as np

from .errors import EXIT_CRASH

QUERY, ANSWER = 1, 2  # message tags on the watchdog's own communicator


def rank_table(comm) -> str:
    """'rank=pid@host' for every rank (collective), so a launcher's 'PID P at HOST' names a rank."""
    where = comm.gather_obj(f"{comm.rank}={os.getpid()}@{comm.host}")
    return "ranks (rank=pid@host): " + " ".join(where) if comm.is_root else ""


class Watchdog:
    """A daemon thread that aborts the job when this rank waits in a collective > timeout seconds."""

    def __init__(self, comm, timeout: float, step_of):
        self.comm, self.timeout, self.step_of = comm, float(timeout), step_of
        self.since: float | None = None  # when this rank entered the collective it is in, else None
        self._done = threading.Event()
        self._thread = None
        # Collective: every rank creates it at the same point. Queries travel on their own
        # communicator so they never match the training's messages.
        channel = comm.private_channel() if self.timeout > 0 and comm.size > 1 else None
        self.active = channel is not None
        if self.active:
            self._mpi, self._wcomm = channel
            self.poll = min(1.0, self.timeout / 4)

    def start(self) -> Watchdog:
        """Start watching (nothing when timeout is 0 or the world is one rank)."""
        if self.active:
            self._thread = threading.Thread(target=self._watch, name="distbp-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """Stop the thread."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def watched(self):
        """The comm to use while watching: its collectives mark this rank as waiting."""
        return WatchedComm(self.comm, self) if self.active else self.comm

    def _watch(self):
        """Thread body: answer other ranks' queries; on our own timeout, find who is missing."""
        while not self._done.wait(self.poll):
            self._answer_queries()
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                self._diagnose_and_abort(self.step_of())

    def _state(self) -> np.ndarray:
        """[step, 1 if waiting in a collective else 0, seconds waited]."""
        since = self.since
        return np.array([self.step_of(), since is not None, time.monotonic() - since if since else 0.0])

    def _answer_queries(self):
        """Reply with our state to every query that has arrived."""
        status = self._mpi.Status()
        while self._wcomm.Iprobe(source=self._mpi.ANY_SOURCE, tag=QUERY, status=status):
            self._wcomm.Recv(np.empty(1), source=status.Get_source(), tag=QUERY)
            self._wcomm.Send(self._state(), dest=status.Get_source(), tag=ANSWER)

    def _diagnose_and_abort(self, step: int):
        """Ask every rank for its state, wait a grace period, report the ranks that did not answer."""
        me, size = self.comm.rank, self.comm.size
        others = [r for r in range(size) if r != me]
        for r in others:
            self._wcomm.Isend(np.zeros(1), dest=r, tag=QUERY)
        replies = {r: np.full(3, np.nan) for r in others}
        recvs = {r: self._wcomm.Irecv(replies[r], source=r, tag=ANSWER) for r in others}
        deadline = time.monotonic() + 2 * self.poll + 1.0
        while time.monotonic() < deadline and not all(req.Test() for req in recvs.values()):
            self._answer_queries()
            time.sleep(0.01)
        states = {r: replies[r] for r in others if recvs[r].Test()}
        waiting = sorted([me] + [r for r, s in states.items() if s[1] and s[0] == step])
        missing = [r for r in range(size) if r not in waiting]
        if me != waiting[0]:  # the lowest waiting rank reports; the others back it up a little later
            self._done.wait(3 * self.poll + 2.0)
        detail = "; ".join(f"rank {r} " + (f"is at step {int(states[r][0])}, not in this collective"
                                           if r in states else "did not answer (frozen, dead or busy)")
                           for r in missing)
        print(f"distbp: stall: rank(s) {', '.join(map(str, missing)) or 'none'} did not arrive at the "
              f"collective of step {step} within train.stall_timeout={self.timeout:g} s; ranks "
              f"{', '.join(map(str, waiting))} waited ({detail}); aborting the job. HINT: check those "
              f"ranks' host (file system, memory, signals), or raise train.stall_timeout if steps "
              f"legitimately take that long", file=sys.stderr, flush=True)
        self.comm.abort(EXIT_CRASH)


WATCHED = ("allreduce_sum", "allreduce_max", "bcast", "barrier", "exchange", "allgatherv")


class WatchedComm:
    """A Comm whose collectives (WATCHED) tell the watchdog when this rank starts and stops waiting."""

    def __init__(self, comm, dog: Watchdog):
        self._inner, self._dog = comm, dog
        # copied, not delegated: the loop reads them every step
        self.rank, self.size, self.is_root, self.host = comm.rank, comm.size, comm.is_root, comm.host
        self.local_rank, self.local_size = comm.local_rank, comm.local_size
        for name in WATCHED:
            setattr(self, name, self._watched(getattr(comm, name)))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _watched(self, collective):
        """collective, with the time this rank waits in it visible to the watchdog."""
        dog = self._dog

        def call(*args, **kwargs):
            dog.since = monotonic()
            try:
                return collective(*args, **kwargs)
            finally:
                dog.since = None
        call.__doc__ = collective.__doc__
        return call
