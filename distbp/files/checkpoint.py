"""HDF5 checkpoints: atomic save, checksummed load, the newest valid one, retention."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from . import bounded
from .atomic import TMP_MARK, AtomicFile
from ..errors import UserError
from .safeio import hdf5_bytes, memory_hdf5, write_bytes

FORMAT, VERSION = "checkpoint", 2
READABLE = (1, 2)  # version 1 has no normalization group: it means no normalization
NAME_RE = re.compile(r"^step-(\d{8,})\.h5$")
BEST = "best.h5"  # checkpoint.keep_best: the best checkpoint, beside the step-*.h5 files and never pruned
POSITION_KEYS = ("step", "epoch", "step_in_epoch", "samples_seen", "world_size")


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged or does not fit this run."""


@dataclass
class Checkpoint:
    """The arrays and attributes of one checkpoint file."""
    params: dict[str, np.ndarray]
    opt_name: str = ""
    opt_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    opt_scalars: dict[str, float] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    normalization: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""

    @property
    def config(self) -> dict:
        """The resolved config the run was started with."""
        return json.loads(self.attrs.get("config", "{}"))


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint written after `step` optimizer steps (8 digits, more from 10^8 on)."""
    return f"step-{step:08d}.h5"


def step_of(path: Path) -> int | None:
    """The step a checkpoint file name stands for, or None if it is not one checkpoint_name makes."""
    m = NAME_RE.match(Path(path).name)
    return int(m[1]) if m and Path(path).name == checkpoint_name(int(m[1])) else None


def _arrays_in_order(ck: Checkpoint):
    """Every stored array with its HDF5 path, in a fixed order."""
    for name in sorted(ck.params):
        yield f"params/{name}", ck.params[name]
    for state in sorted(ck.opt_arrays):
        for name in sorted(ck.opt_arrays[state]):
            yield f"optimizer/{state}/{name}", ck.opt_arrays[state][name]
    for name in sorted(ck.buffers):
        yield f"buffers/{name}", ck.buffers[name]
    for name in sorted(ck.normalization):
        yield f"normalization/{name}", ck.normalization[name]


def _jsonable(v):
    """An attribute value json.dumps does not know (an array) as a list."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


def checksum(ck: Checkpoint) -> str:
    """CRC-32 over every array's path, shape, dtype and bytes, the optimizer scalars and the root attributes."""
    # The attributes hold the data position, the config and the RNG states: a damaged
    # attribute would resume silently at the wrong place, so it fails the checksum too.
    crc = 0
    for path, a in _arrays_in_order(ck):
        crc = zlib.crc32(f"{path}{a.shape}{a.dtype.str}".encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8), crc)  # empty arrays too
    meta = {"attrs": {k: v for k, v in ck.attrs.items() if k != "checksum"},
            "optimizer": {"name": ck.opt_name, "scalars": ck.opt_scalars}}
    return f"crc32:{zlib.crc32(json.dumps(meta, sort_keys=True, default=_jsonable).encode(), crc):08x}"


def _write(f: h5py.File, ck: Checkpoint):
    """Store ck's arrays, optimizer state and attributes (with format and provenance) in f."""
    attrs = dict(ck.attrs, distbp_format=FORMAT, version=VERSION, distbp_version=__version__,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for key, a in _arrays_in_order(ck):
        f.create_dataset(key, data=a)
    opt = f.require_group("optimizer")
    opt.attrs["name"] = ck.opt_name
    for k, v in ck.opt_scalars.items():
        opt.attrs[k] = v
    f.require_group("params")
    f.require_group("buffers")
    f.require_group("normalization")
    for k, v in attrs.items():
        f.attrs[k] = v


def _memory_file(ck: Checkpoint) -> h5py.File:
    """A new HDF5 file in memory holding a copy of ck, not yet checksummed."""
    f = memory_hdf5()
    _write(f, ck)
    return f


def _sealed_bytes(f: h5py.File) -> bytes:
    """Store the checksum of what f holds as a reader will find it; f's bytes (f is closed)."""
    f.attrs["checksum"] = checksum(_read(f, "(in memory)"))
    return hdf5_bytes(f)


def _write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write a checkpoint file's bytes to path atomically (its folder created if need be)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, data)


def save(path: str | os.PathLike, ck: Checkpoint) -> Path:
    """Write ck to path atomically: temp file in the same folder, fsync, rename."""
    return _write_file(path, _sealed_bytes(_memory_file(ck)))


class BackgroundSaver:
    """Copies a checkpoint into a file in memory at once, then checksums it and writes it to disk in a thread."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, path: str | os.PathLike, ck: Checkpoint, then=None) -> BaseException | None:
        """Wait for the previous save, copy ck into a file in memory, start writing it; return the previous error."""
        previous = self.wait()
        f = _memory_file(ck)
        self.thread = threading.Thread(target=self._write, args=(f, path, then), daemon=True)
        self.thread.start()
        return previous

    def _write(self, f, path, then):
        """Thread body: checksum the file in memory and write its bytes to path; then the follow-up (pruning)."""
        try:
            _write_file(path, _sealed_bytes(f))
            if then:
                then()
        except BaseException as e:
            self.error = e

    def wait(self) -> BaseException | None:
        """Block until the running save is durable; return (and clear) its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        return error


def _read_group(g: h5py.Group) -> dict[str, np.ndarray]:
    """Every dataset directly in group g, by name; one claiming more bytes than the file holds is damage."""
    arrays = {}
    for k, v in g.items():
        if isinstance(v, h5py.Dataset):
            if v.dtype.itemsize * v.size > g.file.id.get_filesize():  # checkpoints are uncompressed
                raise ValueError(f"{v.name} claims {v.shape} {v.dtype}, more bytes than the file holds")
            arrays[k] = v[()]
    return arrays


def _plain(v):
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _check_attrs(path: Path, attrs: dict):
    """Raise a CheckpointError unless the position is non-negative integers and the config a JSON table."""
    for key in POSITION_KEYS:
        value = attrs.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= (key == "world_size")):
            raise CheckpointError(f"checkpoint {path}: attribute {key}={value!r} is not a "
                                  f"{'positive' if key == 'world_size' else 'non-negative'} integer; "
                                  "the file is damaged or was not written by distbp")
    try:
        config = json.loads(attrs.get("config", "{}"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: attribute config is not JSON ({e}); "
                              "the file is damaged or was not written by distbp") from None
    if not (isinstance(config, dict) and all(isinstance(v, dict) for v in config.values())):
        raise CheckpointError(f"checkpoint {path}: attribute config is not a table of config sections; "
                              "the file is damaged or was not written by distbp")


def _read(f: h5py.File, path) -> Checkpoint:
    """The checkpoint stored in the open file f (read from path), unverified."""
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if attrs.get("distbp_format") != FORMAT:
        raise CheckpointError(f"{path} is not a distbp checkpoint (distbp_format={attrs.get('distbp_format')!r})")
    if attrs.get("version") not in READABLE:
        raise CheckpointError(f"{path} has checkpoint version {attrs.get('version')}; "
                              f"this distbp reads versions {', '.join(map(str, READABLE))}")
    opt = f.get("optimizer")
    return Checkpoint(params=_read_group(f["params"]),
                      opt_name=_plain(opt.attrs.get("name", "")) if opt else "",
                      opt_arrays={k: _read_group(g) for k, g in opt.items()} if opt else {},
                      opt_scalars={k: _plain(v) for k, v in opt.attrs.items() if k != "name"} if opt else {},
                      buffers=_read_group(f["buffers"]) if "buffers" in f else {},
                      normalization=_read_group(f["normalization"]) if "normalization" in f else {},
                      attrs=attrs, path=str(path))


def _load(path: Path, verify: bool) -> Checkpoint:
    """load() without the time bound: open, read every array and attribute, check."""
    try:
        with h5py.File(path, "r") as f:
            ck = _read(f, path)
            computed = checksum(ck) if verify else None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - damage makes h5py raise RuntimeError, AttributeError, RecursionError...
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {e}); "
                              "delete it or resume from an older one") from None
    if verify:
        if computed != ck.attrs.get("checksum"):
            raise CheckpointError(f"checkpoint {path} fails its checksum (stored {ck.attrs.get('checksum')!r}, "
                                  f"computed {computed}): the file is damaged")
        _check_attrs(path, ck.attrs)
    return ck


def load(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read a checkpoint (arrays and attributes only), check its checksum and position, within a time bound."""
    # A file distbp did not just write is first read in a child with a time limit (files/bounded.py):
    # damage that makes HDF5 loop or crash rejects the file; then the same bytes are read here.
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is a directory, not a checkpoint file" if path.is_dir()
                                                       else "does not exist"))
    bounded.call(lambda: _check(path, verify), "checkpoint", path, CheckpointError,
                 "delete it or resume from an older one")
    return _load(path, verify)


def _check(path: Path, verify: bool):
    """Read and check a checkpoint, keeping nothing (the bounded child's work)."""
    _load(path, verify)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in a folder, oldest step first (by step number, not name)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if step_of(p) is not None), key=step_of)


def latest_valid(directory: str | os.PathLike, log=print) -> Checkpoint | None:
    """The newest checkpoint in a folder that loads and verifies, skipping damaged ones."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except CheckpointError as e:
            log(f"skipping damaged checkpoint: {e}")
    return None


def mark_best(path: Path) -> Path:
    """Make BEST in path's folder the same checkpoint as path (a hard link, else a copy), atomically."""
    with AtomicFile(path.parent / BEST) as out:
        try:
            os.link(path, out.tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, out.tmp)
        return out.commit(durable=True)


def find(path: str | os.PathLike, best: bool = False) -> Path:
    """A checkpoint file given as itself, or as a run directory: its newest valid one, or with best its BEST."""
    path = Path(path)
    if path.is_file() and not best:
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist" + (
            "; HINT: --best takes a run directory" if best and path.is_file() else ""))
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if best:
        if not (folder / BEST).is_file():
            raise CheckpointError(f"{folder} has no {BEST}; HINT: train with checkpoint.keep_best=true, "
                                  "or leave out --best for the newest checkpoint")
        return folder / BEST
    found = latest_valid(folder, log=lambda msg: None)
    if found is None:
        raise CheckpointError(f"{folder} holds no valid checkpoint (step-*.h5); HINT: give a checkpoint "
                              "file, or a run directory written by `distbp train`")
    return Path(found.path)


def clean_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by writers killed mid-save."""
    d = Path(directory)
    stale = [p for p in d.iterdir() if TMP_MARK in p.name] if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune(directory: str | os.PathLike, keep: int, newest_valid: Path) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never `newest_valid`."""
    paths = list_checkpoints(directory)
    doomed = [p for p in paths[:-keep] if p != newest_valid] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def describe(ck: Checkpoint) -> list[str]:
    """Human-readable lines: position, config, and each array's shape and size."""
    lines = [f"{k}: {ck.attrs.get(k)}" for k in (*POSITION_KEYS, "created", "distbp_version", "checksum")]
    a = ck.attrs  # the stored epoch is the 0-based index of the data position; people count epochs from 1
    lines[POSITION_KEYS.index("epoch")] = (f"epoch: {a.get('epoch', 0) + 1} ({a.get('step_in_epoch')} steps into "
                                           f"it; stored 0-based as epoch={a.get('epoch')})")
    lines.append(f"optimizer: {ck.opt_name} {ck.opt_scalars}")
    for key, a in _arrays_in_order(ck):
        lines.append(f"{key:40s} {str(a.shape):16s} {a.dtype} {a.nbytes / 1024:.1f} KiB")
    lines.append("config: " + json.dumps(ck.config, indent=1, sort_keys=True))
    return lines
