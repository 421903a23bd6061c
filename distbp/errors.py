"""Exit codes, the user-error type and require(), agreeing on an error across ranks, and work done on rank 0 alone."""
from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped early by a signal, resume with --resume auto


class UserError(Exception):
    """Bad input the user can fix; printed once by rank 0 without a traceback."""

    agreed = False  # set by agree(): every rank raised it, so no rank waits for another


def require(ok: bool, message: str, error: type[Exception] = UserError):
    """Raise error(message) unless ok."""
    if not ok:
        raise error(message)


class NonFiniteError(Exception):
    """A NaN or Inf loss or gradient stopped training."""


def agree(comm, fn, *args, **kwargs):
    """Run fn on every rank; if it raises a UserError (or an OSError naming a file) on any rank, raise it on all
    (naming the hosts if not all failed)."""
    try:
        result, error = fn(*args, **kwargs), None
    except UserError as e:
        result, error = None, e
    except OSError as e:  # a path that cannot be read or written (a directory, no permission) is bad input too
        if e.filename is None:
            raise
        result, error = None, e
    reports = comm.gather_obj((None if error is None else f"{error}", comm.host))
    first = comm.bcast_obj(first_error(reports) if comm.is_root else None)
    if first is not None:
        if error is None or f"{error}" != first:
            error = UserError(first)  # else this rank's own error keeps its type and traceback (--debug)
        error.agreed = True
        raise error
    return result


def first_error(reports) -> str | None:
    """The first rank's error of (error or None, host) per rank; says where when some hosts had none."""
    failed = [host for e, host in reports if e]
    if not failed:
        return None
    first = next(e for e, _ in reports if e)
    fine = sorted({host for e, host in reports if not e} - set(failed))
    if fine:  # the nodes differ, e.g. a path on node-local storage
        first = f"on {', '.join(sorted(set(failed)))} (not on {', '.join(fine)}): {first}"
    return first


def on_root(comm, fn, *args, **kwargs):
    """Run fn on rank 0 only (None elsewhere); a UserError there is raised on every rank."""
    return agree(comm, lambda: fn(*args, **kwargs) if comm.is_root else None)
