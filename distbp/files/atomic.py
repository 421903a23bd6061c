"""Atomic file writes: a temporary file beside the target that becomes it by one rename, or is removed."""
from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"  # in the name of every temporary file, so a killed writer's leftovers can be found


def fsync_path(path: Path, directory: bool = False):
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """Write to .tmp, then commit() renames it to path; leaving the `with` block uncommitted removes it."""

    def __init__(self, path: str | os.PathLike, tmp: Path | None = None):
        self.path = Path(path)
        self.tmp = tmp or self.path.with_name(f".{self.path.name}{TMP_MARK}{os.getpid()}")

    def commit(self, durable: bool = False) -> Path:
        """Rename tmp to path (atomic in one folder); durable: fsync the file before and the folder after."""
        if durable:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        if durable:
            fsync_path(self.path.parent, directory=True)
        return self.path

    def discard(self):
        """Remove tmp if it is still there."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc):
        self.discard()  # nothing left to remove after a commit
