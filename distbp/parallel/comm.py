"""The only importer of mpi4py: the world communicator and its buffer collectives."""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from ..errors import UserError
from .guard import exit_after, flush

# Launcher variables holding the number of processes it started, most specific first.
LAUNCHER_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_WORLD = None
_WINDOWS = []  # shared-memory windows stay allocated until MPI finalizes
ABORT_GRACE = 3.0  # s MPI_Abort gets before the process ends itself: a launcher out of reach never answers
LAUNCHER_FLUSH = 0.5  # s for the launcher to forward what was just printed before MPI_Abort tears the job down


class CommError(UserError):
    """MPI and the launcher disagree, or a collective got an unusable buffer."""


def _import_mpi():
    """The mpi4py.MPI module (MPI initialised), or None when mpi4py is missing."""
    try:
        import mpi4py
    except ImportError:
        return None
    # Thread level "multiple" (mpi4py's default; MPI4PY_RC_THREAD_LEVEL overrides it): with
    # "funneled" MPICH spins without yielding, which is far slower with more ranks than cores
    # (docs/PERFORMANCE.md, "Choices in the code").
    mpi4py.rc.initialize = True
    mpi4py.rc.finalize = True
    from mpi4py import MPI
    return MPI


def _check_buffer(buf, what: str):
    """Raise CommError unless buf is a writable contiguous numpy array."""
    if not isinstance(buf, np.ndarray):
        raise CommError(f"{what} needs a numpy array, got {type(buf).__name__}; "
                        f"HINT: pack scalars into one array, e.g. np.array([loss_sum, rows])")
    if not buf.flags.c_contiguous or not buf.flags.writeable:
        kind = "read-only" if not buf.flags.writeable else "strided"
        raise CommError(f"{what} needs a writable C-contiguous array, got a {kind} view of shape "
                        f"{buf.shape}; HINT: reduce the flat vector the views come from, or copy with "
                        f"np.ascontiguousarray and copy the result back")


class Comm:
    """An MPI communicator: world rank and size, ranks on this node, buffer collectives."""

    def __init__(self, mpi, mpi_comm):
        self._mpi = mpi
        self._comm = mpi_comm.Dup()  # distbp's collectives never match a user's on the same comm
        self._node = self._comm.Split_type(mpi.COMM_TYPE_SHARED, key=self._comm.Get_rank())
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        self.local_rank, self.local_size = self._node.Get_rank(), self._node.Get_size()
        self.host = mpi.Get_processor_name()
        self.is_root = self.rank == 0

    def __repr__(self):
        return (f"Comm(rank={self.rank}, size={self.size}, "
                f"local={self.local_rank}/{self.local_size}, host={self.host})")

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum buf over all ranks in place with one buffer Allreduce; returns buf."""
        _check_buffer(buf, "allreduce_sum")
        if self.size > 1:
            self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        """Element-wise maximum of buf over all ranks, in place; returns buf."""
        _check_buffer(buf, "allreduce_max")
        if self.size > 1:
            self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.MAX)
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite buf on every rank with root's buf (one buffer Bcast); returns buf."""
        _check_buffer(buf, "bcast")
        if self.size > 1:
            self._comm.Bcast(buf, root=root)
        return buf

    def exchange(self, sends, recvs):
        """Point to point: send each (rank, array) of sends, fill each (rank, array) of recvs; wait for all.

        Messages between two ranks pair up in the order they are listed. Faster than Alltoallv
        or Allgatherv on 2 ranks (docs/PERFORMANCE.md, "Choices in the code")."""
        for _, buf in [*sends, *recvs]:
            _check_buffer(buf, "exchange")
        requests = [self._comm.Irecv(buf, source=q) for q, buf in recvs]
        requests += [self._comm.Isend(buf, dest=q) for q, buf in sends]
        self._mpi.Request.Waitall(requests)

    def allgatherv(self, buf: np.ndarray, counts) -> np.ndarray:
        """In place: rank q's piece (counts[q] items, after those of ranks < q) reaches every rank.

        By point-to-point messages: MPICH's Allgatherv was much slower on one node
        (docs/PERFORMANCE.md, "Choices in the code")."""
        _check_buffer(buf, "allgatherv")
        if self.size > 1:
            flat, ends = buf.reshape(-1), np.cumsum(counts)
            pieces = [flat[e - c:e] for c, e in zip(counts, ends)]
            others = [q for q in range(self.size) if q != self.rank]
            self.exchange([(q, pieces[self.rank]) for q in others], [(q, pieces[q]) for q in others])
        return buf

    def reduce_scatter_sum(self, buf: np.ndarray, out: np.ndarray, counts) -> np.ndarray:
        """out = rank q's piece (counts[q] items, after those of ranks < q) of buf summed over the ranks."""
        _check_buffer(buf, "reduce_scatter_sum")
        _check_buffer(out, "reduce_scatter_sum")
        self._comm.Reduce_scatter(buf, out, list(counts), op=self._mpi.SUM)
        return out

    def gatherv(self, piece: np.ndarray, out: np.ndarray | None, counts, root: int = 0):
        """Every rank's piece (counts[q] items each) into out on root, in rank order (out unused elsewhere)."""
        _check_buffer(piece, "gatherv")
        recv = [out, (list(counts), _displacements(counts))] if self.rank == root else None
        self._comm.Gatherv(piece, recv, root=root)
        return out

    def bcast_obj(self, obj, root: int = 0):
        """Root's small picklable object on every rank (setup only, never the hot path)."""
        return self._comm.bcast(obj, root=root)

    def gather_obj(self, obj, root: int = 0):
        """List of every rank's object on root (rank order), None elsewhere."""
        return self._comm.gather(obj, root=root)

    def barrier(self):
        """Wait until every rank arrives."""
        self._comm.Barrier()

    def abort(self, code: int = 1):
        """End every rank of the job now with exit code `code`; this process ends within seconds in any case."""
        flush()
        exit_after(ABORT_GRACE, code)
        time.sleep(LAUNCHER_FLUSH)
        self._mpi.COMM_WORLD.Abort(code)
        os._exit(code)  # MPICH's MPI_Abort returned when its launcher was out of reach

    def allocate_shared(self, nbytes: int, itemsize: int):
        """A buffer of nbytes held once per node in MPI shared memory (collective over the node)."""
        win = self._mpi.Win.Allocate_shared(nbytes if self.local_rank == 0 else 0, itemsize, comm=self._node)
        _WINDOWS.append(win)
        return win.Shared_query(0)[0]

    def node_cpus(self) -> int:
        """Number of distinct CPUs the ranks on this node may run on (collective on the node)."""
        return len(set().union(*self._node.allgather(own_cpus())))


class SerialComm:
    """A world of one with the same methods as Comm, used when mpi4py is not installed."""

    rank, size, local_rank, local_size, is_root = 0, 1, 0, 1, True

    def __init__(self):
        self.host = socket.gethostname()

    def __repr__(self):
        return f"SerialComm(host={self.host})"

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum over one rank: checks buf and returns it unchanged."""
        _check_buffer(buf, "allreduce_sum")
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        """Maximum over one rank: checks buf and returns it unchanged."""
        _check_buffer(buf, "allreduce_max")
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast from the only rank: checks buf and returns it unchanged."""
        _check_buffer(buf, "bcast")
        return buf

    def exchange(self, sends, recvs):
        """Point to point with the only rank: the arrays of recvs get those of sends, in order."""
        for _, buf in [*sends, *recvs]:
            _check_buffer(buf, "exchange")
        for (_, buf), (_, sent) in zip(recvs, sends, strict=True):
            buf[...] = sent

    def allgatherv(self, buf: np.ndarray, counts) -> np.ndarray:
        """Gather from the only rank: checks buf and returns it unchanged."""
        _check_buffer(buf, "allgatherv")
        return buf

    def reduce_scatter_sum(self, buf: np.ndarray, out: np.ndarray, counts) -> np.ndarray:
        """The only rank's piece: out = buf."""
        _check_buffer(out, "reduce_scatter_sum")
        out[...] = buf
        return out

    def gatherv(self, piece: np.ndarray, out: np.ndarray | None, counts, root: int = 0):
        """The only rank's piece into out."""
        out[...] = piece
        return out

    def bcast_obj(self, obj, root: int = 0):
        """The object itself."""
        return obj

    def gather_obj(self, obj, root: int = 0):
        """A list holding the object."""
        return [obj]

    def barrier(self):
        """Nothing to wait for."""

    def abort(self, code: int = 1):
        """End this process now with exit code `code`."""
        flush()
        os._exit(code)

    def node_cpus(self) -> int:
        """Number of CPUs this process may run on."""
        return len(own_cpus())


def _displacements(counts) -> list[int]:
    """Start of each piece when pieces of counts[q] items lie back to back."""
    starts = [0]
    for c in list(counts)[:-1]:
        starts.append(starts[-1] + int(c))
    return starts


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


def check_launcher(mpi_size: int, environ, have_mpi: bool = True):
    """Raise CommError when the launcher started several processes but MPI sees a world of 1."""
    found = launcher_size(environ)
    if found is None or found[1] <= 1 or mpi_size != 1:
        return
    name, n = found
    if not have_mpi:
        raise CommError(f"the launcher started {n} processes ({name}={n}) but mpi4py is not installed, "
                        f"so each would train alone as a world of 1; HINT: pip install mpi4py mpich "
                        f"(or mpi4py built against your cluster's MPI), then launch again")
    raise CommError(f"the launcher started {n} processes ({name}={n}) but MPI sees a world of 1: "
                    f"mpi4py is built against a different MPI than the launcher; HINT: use the mpirun "
                    f"from the same MPI as mpi4py (e.g. the one in this venv's bin/), or rebuild mpi4py "
                    f"against the launcher's MPI with pip install --force-reinstall --no-binary mpi4py "
                    f"mpi4py; under SLURM use srun --mpi=pmi2")


def world():
    """The world communicator: MPI if mpi4py imports, else SerialComm; checks the launcher agrees."""
    global _WORLD
    if _WORLD is None:
        mpi = _import_mpi()
        comm = Comm(mpi, mpi.COMM_WORLD) if mpi is not None else SerialComm()
        check_launcher(comm.size, os.environ, have_mpi=mpi is not None)
        _WORLD = comm
    return _WORLD


def own_cpus() -> set[int]:
    """CPUs this process may run on (its affinity mask, else all of them)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def node_shared_array(comm, shape, dtype) -> np.ndarray:
    """An uninitialised array held once per node in MPI shared memory (np.empty without MPI)."""
    # Collective over the node: local rank 0 allocates the window, the other ranks map its
    # pages. Fill it on local rank 0 only, then synchronise (comm.barrier) before reading.
    shape, dtype = tuple(int(s) for s in np.atleast_1d(shape)), np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if comm.local_size == 1 or nbytes == 0:
        return np.empty(shape, dtype)
    buf = comm.allocate_shared(nbytes, dtype.itemsize)
    return np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)
