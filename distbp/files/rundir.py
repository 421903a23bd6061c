"""The run directory: one run at a time (a lock naming its holder), an earlier run's files archived on request."""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import stat
import time
from pathlib import Path

from . import checkpoint as ckpt
from .safeio import same_file, write_bytes
from ..parallel import slurm
from ..errors import UserError, on_root

LOCK_NAME = "distbp.lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "train.log", "config.toml")  # what --force archives
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # no locks on this file system


def default_path(comm) -> str:
    """A new run directory when none is given: runs/<local time>, or runs/<local time>-2, -3, ... when
    that is taken (two runs started in one second); rank 0 creates it, every rank gets its name."""
    def claim() -> str:
        stamp = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        for path in itertools.chain([stamp], (f"{stamp}-{k}" for k in itertools.count(2))):
            try:
                os.makedirs(path)  # atomic: another process cannot claim the same name
                return path
            except FileExistsError:
                continue
            except OSError as e:
                raise UserError(f"cannot create the run directory {path} ({e.strerror}); HINT: run in a "
                                "writable folder, or give --run-dir") from None
    return comm.bcast_obj(on_root(comm, claim))


def remove_if_empty(path):
    """Remove a run directory default_path made for a run that failed before writing into it."""
    for folder in (Path(path), Path(path).parent):  # runs/ too when this made it and nothing else is in it
        try:
            os.rmdir(folder)  # only an empty folder goes
        except OSError:
            return


class RunDirBusy(UserError):
    """Another distbp train holds the run directory."""


def holder_line() -> str:
    """'host H, pid P, SLURM job J, since T' of this process."""
    return (f"host {socket.gethostname()}, pid {os.getpid()}, SLURM job {slurm.job_id() or 'none'}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")


def open_own_file(path: Path) -> int:
    """A descriptor of path opened read-write (created if missing), refused unless it is a plain file of ours:
    never a symlink (O_NOFOLLOW), a FIFO, a device or another user's or hard-linked file, which truncating
    would damage."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        what = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise UserError(f"run directory lock {path} cannot be used ({what}); distbp writes only a regular "
                        "file of its own there. HINT: remove it (it is not distbp's), or choose another "
                        "--run-dir") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        what = ("not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link to another file"
                if st.st_nlink != 1 else f"owned by uid {st.st_uid}, not this user")
        raise UserError(f"run directory lock {path} is {what}; distbp writes only a regular file of its own "
                        "there. HINT: remove it (it is not distbp's), or choose another --run-dir")
    return fd


class RunLock:
    """An exclusive POSIX lock (fcntl) on RUN_DIR/distbp.lock; the kernel drops it when the holder exits."""

    def __init__(self, run_dir: Path, log=print):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = open_own_file(self.path)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                log(f"WARNING: {self.path}: the file system does not support locks ({e.strerror}); "
                    "nothing stops a second run from using this run directory at the same time")
                return
            self.release()
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"run directory lock {self.path} cannot be taken ({e.strerror}); "
                                "HINT: choose another --run-dir") from None
            holder = self.path.read_text(errors="replace").strip() or "unknown holder"
            raise RunDirBusy(f"run directory {run_dir} is in use by another distbp train ({holder}); "
                             "HINT: wait for it to end or stop it, or choose another --run-dir") from None
        os.ftruncate(self.fd, 0)
        try:  # who holds it, for the message of a second run; a full disk only loses the name
            os.write(self.fd, (holder_line() + "\n").encode())
        except OSError:
            pass

    def release(self):
        """Drop the lock (closing the file releases it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def archive_earlier_run(run_dir: Path, force: bool) -> str | None:
    """For --resume never: refuse a folder holding checkpoints, or with force move the earlier run's files aside."""
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        return None
    if not force:
        raise UserError(f"--resume never, but run directory {run_dir} holds checkpoints of an earlier run "
                        f"(newest {found[-1].name}) that a new run would mix with its own; HINT: --resume auto "
                        f"to continue that run, --force to move its files to {run_dir}/old-<time>/, or "
                        "another --run-dir")
    dest = run_dir / f"old-{time.strftime('%Y%m%d-%H%M%S')}"
    if dest.exists():
        dest = dest.with_name(f"{dest.name}-{os.getpid()}")
    dest.mkdir()
    moved = [name for name in RUN_FILES if (run_dir / name).exists()]
    for name in moved:
        os.rename(run_dir / name, dest / name)
    return f"--resume never --force: moved the earlier run's {', '.join(moved)} to {dest}"


def prepare(run_dir: Path, config_toml: str, resume: str, force: bool, comm, log=print, config_file=None):
    """Rank 0: create and lock the run directory, archive an earlier run if asked, write config.toml (unless
    it is config_file, the config given as input).

    Returns the RunLock (None on other ranks) and the notes to log once the run log is open."""
    if not comm.is_root:
        return None, []
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, log)
        notes = [archive_earlier_run(run_dir, force)] if resume == "never" else []
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        ckpt.clean_stale(run_dir / "checkpoints")  # only now: the lock says no other writer is running
        if config_file and same_file(config_file, run_dir / "config.toml"):
            notes.append(f"config {config_file} is this run directory's config.toml: kept as given (the "
                         "resolved config, --set overrides included, is stored in every checkpoint)")
        else:
            write_bytes(run_dir / "config.toml", config_toml.encode())  # replaces, never writes through a link
    except OSError as e:
        raise UserError(f"run directory {run_dir} cannot be written ({e.strerror}); "
                        "choose another with --run-dir") from None
    return lock, [n for n in notes if n]


def check_seen(run_dir: Path):
    """Raise on a rank that does not see the run directory rank 0 prepared (it is not on a shared file system)."""
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"run directory {run_dir}, written by rank 0, is missing here: every node must see it "
                        "(a resume reads the checkpoints on whichever node runs rank 0). HINT: choose a --run-dir "
                        "on a file system all nodes share")
