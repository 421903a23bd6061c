"""Process death on error: one report per failed rank, the whole job aborted, and a bounded exit whatever
the process's threads are doing."""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from ..errors import EXIT_USAGE, UserError

ALARM_MARGIN = 2  # s after an exit timer that the kernel's SIGALRM ends a process whose interpreter is stuck


def exit_after(seconds: float, code: int):
    """End this process with exit code `code` after `seconds`, whatever its threads are doing."""
    signal.alarm(int(seconds) + ALARM_MARGIN)  # if the interpreter itself is stuck, the kernel's SIGALRM ends it
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    try:
        timer.start()
    except RuntimeError:  # no thread to be had (out of memory): the alarm ends it
        pass


def flush():
    """Flush stdout and stderr before the process is ended from outside Python's exit path."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _exit_code(exc: BaseException) -> int:
    """The process exit code Python would use for this exception."""
    if isinstance(exc, SystemExit):
        code = exc.code
        return 0 if code is None else code if isinstance(code, int) else 1
    return 130 if isinstance(exc, KeyboardInterrupt) else EXIT_USAGE if isinstance(exc, UserError) else 1


def report_failure(comm, exc: BaseException):
    """Print this rank's traceback and one 'distbp: rank R on HOST failed' line to stderr."""
    if isinstance(exc, KeyboardInterrupt):
        what, trace = "was interrupted", ""
    elif isinstance(exc, SystemExit):
        what = f"exited with code {_exit_code(exc)}" + (f": {exc.code}" if isinstance(exc.code, str) else "")
        trace = ""
    else:
        what = f"failed: {type(exc).__name__}: {exc}"
        # a user error's message names the file and the fix: no traceback
        trace = "" if isinstance(exc, UserError) else "".join(traceback.format_exception(exc))
    sys.stderr.write(f"{trace}distbp: rank {comm.rank} on {comm.host} {what}\n")  # one write: kept together
    sys.stderr.flush()


def install_abort_on_error(comm):
    """Make an uncaught exception on any rank print once and abort the whole job (size > 1)."""
    def hook(etype, value, tb):
        report_failure(comm, value)
        if comm.size > 1:
            comm.abort(_exit_code(value))

    sys.excepthook = hook


def run_guarded(fn, comm, *args, **kwargs):
    """Return fn(*args, **kwargs); an exception or non-zero SystemExit on one rank aborts all ranks."""
    # An error every rank agrees on should come back as a returned exit code: returning lets
    # every rank leave MPI cleanly, while a raise on a multi-rank job ends it with MPI Abort.
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:
        code = _exit_code(exc)
        if comm.size == 1 or code == 0:
            raise
        report_failure(comm, exc)
        comm.abort(code)
