"""Output files: never the same file as an input, never over an existing file unless forced, HDF5 built in memory."""
from __future__ import annotations

import errno
import itertools
import os
import stat
import zipfile
from pathlib import Path

import h5py
import numpy as np

from .atomic import AtomicFile
from ..errors import UserError

_MEMORY_FILES = itertools.count()  # names of HDF5 files in memory, unique in this process


class OutputError(UserError):
    """An output path would overwrite an input, or an existing file without --force."""


def same_file(a, b) -> bool:
    """True if paths a and b name one file (symlinks followed, hard links by device and inode)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output(out, inputs, force: bool) -> Path:
    """out as a Path, after checking it is none of the inputs and, unless force, not an existing file."""
    out = Path(out)
    for source in inputs:
        if same_file(out, source):
            how = "" if str(out) == str(source) else " (the same file, through a link)"
            raise OutputError(f"output {out} is the input {source}{how}: writing it would destroy the input; "
                              "HINT: choose another output name")
    if out.is_dir():
        raise OutputError(f"output {out} is a directory; HINT: give a file name inside it")
    if not out.parent.is_dir():
        why = os.strerror(errno.ENOTDIR if out.parent.exists() else errno.ENOENT)
        raise OutputError(f"output {out}: its folder {out.parent} cannot be used ({why}); HINT: create the "
                          "folder first, or choose a writable output path")
    if os.path.exists(out) and not stat.S_ISREG(os.stat(out).st_mode):
        raise OutputError(f"output {out} exists and is not a regular file (a FIFO, device or socket), which "
                          "distbp never replaces, even with --force; HINT: choose a file name for the output")
    if os.path.lexists(out) and not force:
        raise OutputError(f"output {out} exists; HINT: add --force to replace it, or choose another name")
    return out


def unwritable(out, e: OSError) -> OutputError:
    """The error for an output that could not be written (a full or read-only disk): names the output, not
    the temporary file the writing went to."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = ("free space on its file system (or raise the quota), or write it elsewhere" if full
            else "its folder is not writable (a read-only file system, or no permission): choose an output in a "
                 "writable folder")
    return OutputError(f"cannot write {out} ({e.strerror or e}); the old file, if any, is intact; HINT: {hint}")


def check_space(out: Path, nbytes: int):
    """Raise unless out's file system has room for about nbytes more (for outputs too large to build in memory)."""
    try:
        st = os.statvfs(out.parent)
    except OSError as e:
        raise OutputError(f"output {out}: its folder cannot be used ({e.strerror}); HINT: create it first") from None
    free = st.f_bavail * st.f_frsize
    need = int(nbytes * 1.01) + (1 << 20)  # HDF5's own metadata and a margin
    if free < need:
        raise OutputError(f"output {out} needs about {need / 1e6:.1f} MB but its file system has "
                          f"{free / 1e6:.1f} MB free; HINT: free space or write it elsewhere")


def write_bytes(path, data: bytes) -> Path:
    """Replace path atomically and durably with data, written by plain os.write calls (ENOSPC is an OSError)."""
    with AtomicFile(path) as out:
        fd = os.open(out.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return out.commit(durable=True)


def save_npz(path, arrays: dict):
    """arrays as an .npz file numpy.load reads, one member per name (any name: np.savez's own argument
    names, such as 'file', cannot be keys of its **kwds)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)


# On a real full disk HDF5's own failing writes raised while objects were released and then
# segfaulted the process. So distbp's HDF5 outputs of bounded size (checkpoints, predictions)
# are built in memory and reach the disk through write_bytes' plain os.write, whose ENOSPC
# is an ordinary OSError.

def memory_hdf5(**options) -> h5py.File:
    """A new, empty HDF5 file held in memory only (h5py's core driver without a backing store); options go to
    h5py.File (track_order=True, ...)."""
    return h5py.File(f"distbp-memory-{os.getpid()}-{next(_MEMORY_FILES)}", "w", driver="core", backing_store=False,
                     **options)


def hdf5_bytes(f: h5py.File) -> bytes:
    """The bytes of the in-memory HDF5 file f, which is closed."""
    with f:
        f.flush()
        return f.id.get_file_image()
