"""Stall watchdog: abort the job, naming the missing ranks, when a collective waits too long."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from time import monotonic

import numpy as np

from .errors import EXIT_CRASH

STATE_BYTES = 3 * 8  # a state is 3 float64 (see Watchdog._state)


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
    """A daemon thread that aborts the job when this rank waits in a collective > timeout seconds."""

    def __init__(self, comm, timeout: float, step_of):
        self.comm, self.timeout, self.step_of = comm, float(timeout), step_of
        self.since: float | None = None  # when this rank entered the collective it is in, else None
        self._done = threading.Event()
        self._thread = None
        self.active = self.timeout > 0 and comm.size > 1
        if self.active:
            # Collective: every rank creates it at the same point. Queries go over plain TCP, not
            # MPI: MPI may be wedged by the very failure (MPICH over UCX crashed when a rank
            # queried a peer whose node had died), and a refused connection tells a dead process
            # from a silent one.
            self._server = socket.create_server(("", 0), backlog=comm.size)
            self._server.setblocking(False)
            where = comm.bcast_obj(comm.gather_obj((comm.host, self._server.getsockname()[1])))
            self.hosts, self._ports = [h for h, _ in where], [p for _, p in where]
            self.poll = min(1.0, self.timeout / 4)
            self._grace = 2 * self.poll + 1.0  # an answer comes within one poll of the peer's thread

    def start(self) -> Watchdog:
        """Start watching (nothing when timeout is 0 or the world is one rank)."""
        if self.active:
            self._thread = threading.Thread(target=self._watch, name="distbp-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """Stop the thread and close the query socket."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.active:
            self._server.close()

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
            with socket.create_connection((self.hosts[r], self._ports[r]), timeout=self._grace) as s:
                while len(data) < STATE_BYTES and (chunk := s.recv(STATE_BYTES - len(data))):
                    data += chunk
        except ConnectionRefusedError:  # its host answers but nothing listens: the process is gone
            return "gone", None
        except OSError:  # timed out, or its host cannot be reached
            pass
        return ("answered", np.frombuffer(data)) if len(data) == STATE_BYTES else ("silent", None)

    def _query_states(self) -> dict:
        """{rank: ('answered', state) | ('gone', None) | ('silent', None)} for every other rank."""
        others = [r for r in range(self.comm.size) if r != self.comm.rank]
        with ThreadPoolExecutor(max_workers=min(64, len(others))) as pool:
            asked = {r: pool.submit(self._ask, r) for r in others}
            while not all(f.done() for f in asked.values()):
                self._answer_queries()  # the other waiting ranks are asking us at the same time
                time.sleep(0.01)
        return {r: f.result() for r, f in asked.items()}

    def _diagnose_and_abort(self, step: int):
        """Ask every rank for its state, wait a grace period, report the ranks that did not answer."""
        me, size = self.comm.rank, self.comm.size
        replies = self._query_states()
        states = {r: state for r, (kind, state) in replies.items() if kind == "answered"}
        waiting = sorted([me] + [r for r, s in states.items() if s[1] and s[0] == step])
        missing = [r for r in range(size) if r not in waiting]
        if me != waiting[0]:  # the lowest waiting rank reports; the others back it up a little later
            self._done.wait(3 * self.poll + 2.0)
        detail = "; ".join(f"rank {r} " + (f"is at step {int(states[r][0])}, not in this collective" if r in states
                                           else "is gone (its process ended)" if replies[r][0] == "gone"
                                           else "did not answer (frozen, cut off or its node is down)")
                           for r in missing)
        print(f"distbp: stall: rank(s) {on_hosts(missing, self.hosts) or 'none'} did not arrive at the "
              f"collective of step {step} within train.stall_timeout={self.timeout:g} s; ranks "
              f"{on_hosts(waiting, self.hosts)} waited ({detail}); aborting the job. HINT: check those "
              f"ranks' host (network link, file system, memory, signals), or raise train.stall_timeout if "
              f"steps legitimately take that long", file=sys.stderr, flush=True)
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
