"""Reads of files distbp did not just write, run in a forked child with a time limit.

Some damaged HDF5 files make the library loop forever (a flipped bit in the global heap
that holds variable-length strings) or crash the process. A read that does not end in
time, or kills its process, is a damaged file: the caller gets its error type with a
message instead of a hang. The child is a fork, so it starts in milliseconds, sees the
parent's open files and returns its result through a pipe; it never touches MPI.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from pathlib import Path

from ..errors import UserError

BASE_SECONDS = 10.0  # plus one second per READ_BYTES_PER_SECOND of file
READ_BYTES_PER_SECOND = 20e6
TIMEOUT_ENV = "DISTBP_READ_TIMEOUT"
_WRITTEN_HERE: list[Path] = []  # folders whose files this process has just written itself


@contextlib.contextmanager
def written_here(folder):
    """Within the block, files under folder (written by distbp a moment ago, e.g. by distbp.sklearn) are read
    in this process: the fork guards against damaged files, and these are not."""
    _WRITTEN_HERE.append(Path(folder).resolve())
    try:
        yield
    finally:
        _WRITTEN_HERE.pop()


def _written_here(path) -> bool:
    """Whether path lies under a folder of written_here."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(folder) for folder in _WRITTEN_HERE)


def time_limit(path) -> float:
    """Seconds a read of path may take: DISTBP_READ_TIMEOUT (default 10) plus 1 s per 20 MB."""
    base = float(os.environ.get(TIMEOUT_ENV) or BASE_SECONDS)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return base + size / READ_BYTES_PER_SECOND


def _child(fn, conn):
    """Child body: send ("ok", result) or ("error", exception) and leave without cleanup."""
    try:
        conn.send(("ok", fn()))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        try:
            conn.send(("error", e))
        except Exception:  # the exception itself does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()
        os._exit(0)


def call(fn, kind: str, path, error: type[Exception], damaged: str):
    """fn() run in a child within time_limit(path); its exception, or `error` on a hang or crash."""
    # Messages read "KIND PATH: ...; DAMAGED", DAMAGED telling the user what to do with the file.
    if _WRITTEN_HERE and _written_here(path):
        return fn()
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, send), daemon=True)
    child.start()
    send.close()
    limit = time_limit(path)
    try:
        if not recv.poll(limit):
            raise error(f"{kind} {path}: reading it did not finish within {limit:.0f} s, so the file is damaged "
                        f"(HDF5 loops on some damaged files); {damaged}. HINT: on a very slow file "
                        f"system raise {TIMEOUT_ENV} (seconds, default {BASE_SECONDS:.0f})")
        try:
            status, value = recv.recv()
        except (EOFError, OSError):
            child.join(1)
            code = child.exitcode
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            raise error(f"{kind} {path}: reading it crashed the reader ({how}), so the file is damaged; "
                        f"{damaged}") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        recv.close()
    if status == "error" and isinstance(value, (UserError, KeyboardInterrupt, NameError, ImportError)):
        raise value  # a message for the user, an interrupt, or a bug in distbp: not the file's fault
    if status == "error":  # h5py's RuntimeError, AttributeError, RecursionError, MemoryError, ...
        raise error(f"{kind} {path}: reading it failed ({type(value).__name__}: {value}), so the file is damaged; "
                    f"{damaged}")
    return value
