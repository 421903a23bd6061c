"""Dataset files: read-only, validated, in memory once per node or streamed; the shipped digits."""
from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path
from typing import NoReturn

import h5py
import numpy as np

from ..files import bounded
from ..files.safeio import hdf5_bytes, memory_hdf5, unwritable, write_bytes
from ..parallel.comm import node_shared_array
from ..errors import UserError
from .task import TASKS, Task, TaskError, not_finite, task_named

FORMAT, VERSION = "dataset", 1
X_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint8))
SPLIT_ORDER = ("train", "val", "test")
DEFAULT_MEMORY_BYTES = 2 << 30  # per node, as data.memory_mb's default
BLOCK_BYTES = 64 << 20  # value checks read at most this much at a time
SYNTHETIC_MAX_BYTES = 4 << 30  # data synthetic builds its rows in memory
MAX_CLASSES = 1_000_000  # num_classes above this is damage or a mistake, refused before any allocation
DAMAGED = "the file is damaged: re-create or re-copy it"


class DataError(UserError):
    """A dataset file or array is unusable; the message names file, split, key, problem and fix."""


def _where(path, split: str | None = None, key: str | None = None) -> str:
    """'dataset FILE, split S, key K' for the start of an error message."""
    return f"dataset {path}" + (f", split '{split}'" if split else "") + (f", {key}" if key else "")


def _fail(where: str, problem: str, fix: str) -> NoReturn:
    """Raise DataError('where: problem; HINT: fix')."""
    raise DataError(f"{where}: {problem}; HINT: {fix}")


def _attr(attrs, name: str):
    """A root attribute as a plain Python value (str, int, float), None if absent or unreadable."""
    try:
        value = attrs.get(name)
    except (OSError, TypeError, ValueError, KeyError):
        return None
    if isinstance(value, np.ndarray):
        value = value[()] if value.shape == () else value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode(errors="replace")
    if isinstance(value, (bool, np.bool_)):
        return value  # never mistaken for an int below
    if isinstance(value, np.integer):
        return int(value)
    return float(value) if isinstance(value, np.floating) else value


def _is_int(v) -> bool:
    """True for an int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(where: str, attrs, arg: str = "data.path") -> tuple[str, int | None, float | None]:
    """Validate the root attributes; returns (task, num_classes, x_scale); hints name the argument `arg`."""
    fmt = _attr(attrs, "distbp_format")
    if fmt is None:
        _fail(where, "no distbp_format attribute, so this is not a distbp dataset",
              "write datasets with distbp.datasets.dataset.write_dataset or `distbp data convert`")
    if fmt == "checkpoint":
        _fail(where, "this is a distbp checkpoint, not a dataset",
              f"set {arg} to a dataset file; checkpoints go to --resume or `distbp eval`")
    if fmt != FORMAT:
        _fail(where, f"distbp_format={fmt!r}, expected {FORMAT!r}",
              "write the file with distbp.datasets.dataset.write_dataset")
    version = _attr(attrs, "version")
    if version != VERSION:
        _fail(where, f"format version {version!r} is not supported (this distbp reads version {VERSION})",
              "upgrade distbp, or rewrite the file with `distbp data convert`")
    try:
        task = task_named(_attr(attrs, "task"), _attr(attrs, "num_classes"), _attr(attrs, "vocab_size"))
    except TaskError:
        _fail(where, f"root attribute task={_attr(attrs, 'task')!r} is not one of {', '.join(TASKS)}",
              "set the root attribute task, e.g. task='classification'")
    num_classes = task.num_classes
    if task.check_header():
        _fail(where, *task.check_header())
    if task.labels and not (_is_int(num_classes) and 2 <= num_classes <= MAX_CLASSES):
        _fail(where, f"root attribute num_classes={num_classes!r} must be an integer from 2 to {MAX_CLASSES:,}",
              "set num_classes to the number of classes (labels are 0..num_classes-1)")
    x_scale = _attr(attrs, "x_scale")
    if x_scale is not None and not (isinstance(x_scale, (int, float)) and not isinstance(x_scale, bool)
                                    and math.isfinite(x_scale) and x_scale > 0):
        _fail(where, f"root attribute x_scale={x_scale!r} must be a positive number",
              "set x_scale so that inputs are x * x_scale, e.g. 1/255 for uint8 pixels")
    return task, num_classes, None if x_scale is None else float(x_scale)


def _check_shapes(path, split: str, x, y, task: Task, x_scale: float | None):
    """Shape and dtype checks of one split's x and y (metadata only, no reads)."""
    if task.token_ids:
        if x.ndim != 2 or x.dtype.kind not in "iu" or 0 in x.shape or y.shape != x.shape:
            _fail(_where(path, split, "x"), f"x {x.shape} {x.dtype} and y {y.shape} are not (N, T) integer token "
                  "ids of the same shape", "make token datasets with `distbp data text`")
        return _check_shapes_of_targets(path, split, y, task)
    if x.ndim < 2 or 0 in x.shape[1:]:
        _fail(_where(path, split, "x"), f"shape {x.shape} is not (rows, features...)",
              "store x as (N, D) or (N, C, H, W), e.g. x.reshape(len(x), -1)")
    if x.dtype not in X_DTYPES:
        _fail(_where(path, split, "x"), f"dtype {x.dtype} is not float32, float64 or uint8",
              "store x as float32, or as uint8 with a root attribute x_scale")
    if x.dtype == np.uint8 and x_scale is None:
        _fail(_where(path, split, "x"), "x is uint8 but the file has no root attribute x_scale",
              "set x_scale so that inputs are x * x_scale, e.g. 1/255 for 0..255 pixels")
    if x.shape[0] == 0:
        _fail(_where(path, split), "the split is empty (0 rows)", "write rows into it or remove the split")
    if y.shape[:1] != x.shape[:1]:
        _fail(_where(path, split, "y"), f"y has shape {y.shape} but x has {x.shape[0]} rows",
              "write exactly one y row per x row")
    _check_shapes_of_targets(path, split, y, task)


def _check_shapes_of_targets(path, split: str, y, task: Task):
    """The task's check of y's shape and dtype."""
    wrong = task.check_targets(y)
    if wrong:
        _fail(_where(path, split, "y"), *wrong)


def _has_source(path: Path, file_name: str, dset_name: str) -> bool:
    """True if a virtual dataset's source file (searched as HDF5 does) holds the source dataset."""
    if file_name == ".":
        return True  # the source is in the file itself
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    candidates = [Path(file_name)] if os.path.isabs(file_name) else [
        *([Path(prefix) / file_name] if prefix else []), path.parent / file_name, Path(file_name)]
    found = next((c for c in candidates if c.is_file()), None)
    try:
        with h5py.File(found, "r") as f:
            return isinstance(f.get(dset_name), h5py.Dataset)
    except (OSError, TypeError, ValueError):
        return False


def _check_virtual(path: Path, split: str, key: str, d: h5py.Dataset):
    """Fail if a virtual dataset maps rows to a missing source, or leaves rows unmapped: HDF5 would read
    those rows as fill values."""
    if not d.is_virtual:
        return
    sources = d.virtual_sources()
    for source in sources:
        if not _has_source(path, source.file_name, source.dset_name):
            _fail(_where(path, split, key), f"a virtual dataset whose source {source.file_name}:"
                  f"{source.dset_name} is missing, so its rows would read as fill values (zeros)",
                  "put the source file back where the virtual dataset points (or set HDF5_VDS_PREFIX), "
                  "or write the rows into the dataset file itself")
    if (row := _first_unmapped(d.shape, [s.vspace for s in sources])) is not None:
        _fail(_where(path, split, key), f"a virtual dataset that maps no source to row {row} (of {d.shape[0]}), "
              "so those rows would read as fill values (zeros)",
              "map every row to a source in the virtual layout, or write the rows into the dataset file itself")


def _first_unmapped(shape: tuple, vspaces) -> int | None:
    """The first row of a virtual dataset of this shape that its mappings' selections (vspaces) leave out."""
    per_row = math.prod(shape[1:])
    covered = np.zeros(shape[0], bool)
    for space in vspaces:
        lo, hi = space.get_select_bounds()  # the selection's bounding box, inclusive
        box = math.prod(h - l + 1 for l, h in zip(lo, hi))
        if space.get_select_npoints() == box and box == (hi[0] - lo[0] + 1) * per_row:  # whole rows lo..hi
            covered[lo[0]:hi[0] + 1] = True
        elif space.get_select_npoints() == math.prod(shape):  # everything, in any pattern
            covered[:] = True
    missing = np.flatnonzero(~covered)
    return int(missing[0]) if missing.size else None


def _check_same_shapes(path, arrays: dict):
    """Every split's x and y have the first split's per-row shapes."""
    first, (x0, y0) = next(iter(arrays.items()))
    for name, (x, y) in arrays.items():
        if (x.shape[1:], y.shape[1:]) != (x0.shape[1:], y0.shape[1:]):
            _fail(_where(path, name), f"x {x.shape} and y {y.shape} do not match split '{first}' "
                  f"(x {x0.shape}, y {y0.shape})", "give every split the same per-row shapes")


def _blocks(a):
    """(start row, rows) pieces of a row-major array of at most BLOCK_BYTES each."""
    row_bytes = max(1, a.dtype.itemsize * math.prod(a.shape[1:]))
    step = max(1, BLOCK_BYTES // row_bytes)
    for lo in range(0, a.shape[0], step):
        yield lo, a[lo:lo + step]


def first_bad(where: str, a, bad_rows, problem: str, fix: str):
    """Fail naming the first row of a for which bad_rows(block) is True."""
    for lo, block in _blocks(a):
        bad = np.flatnonzero(bad_rows(np.asarray(block).reshape(len(block), -1)))
        if bad.size:
            value = np.asarray(block[bad[0]]).ravel()
            value = value[0] if value.size == 1 else value[:4]
            _fail(where, problem.format(row=lo + int(bad[0]), value=value), fix)


def _check_ids(where: str, a, vocab: int):
    """Fail naming the first token id outside [0, vocab) and its row and position."""
    for lo, block in _blocks(a):
        block = np.asarray(block)
        bad = np.argwhere((block < 0) | (block >= vocab))
        if len(bad):
            r, t = (int(i) for i in bad[0])
            _fail(where, f"token id {block[r, t]} at row {lo + r}, position {t} is outside [0, {vocab}), the "
                  "vocabulary", "re-make the dataset with `distbp data text`, or fix its vocab_size")


def _check_values(path, split: str, x, y, task: Task):
    """Finite features, and labels or targets in range, read in blocks."""
    where_y = _where(path, split, "y")
    try:
        if task.token_ids:  # name the first id outside the vocabulary, and where it is
            for key, a in (("x", x), ("y", y)):
                _check_ids(_where(path, split, key), a, task.num_classes)
            return
        if x.dtype.kind == "f":
            first_bad(_where(path, split, "x"), x, not_finite, "NaN or Inf features, first at row {row}",
                       "clean or impute the features, or drop those rows, before writing the file")
        first_bad(where_y, y, task.bad_targets, *task.bad_message())
    except OSError as e:
        _fail(_where(path, split), f"cannot read the data ({e})", DAMAGED)


def _open(path: Path, arg: str = "data.path") -> h5py.File:
    """h5py.File(path, 'r') with a DataError for every way that fails; hints name the argument `arg`."""
    if not path.exists():
        _fail(_where(path), "no such file", f"check {arg}, or convert your data with `distbp data convert` (see "
              "distbp data convert --help)")
    if path.is_dir():
        _fail(_where(path), "is a directory, not a file", f"set {arg} to an .h5 dataset file")
    try:
        return h5py.File(path, "r")  # file locking as HDF5 decides (HDF5_USE_FILE_LOCKING)
    except PermissionError:
        _fail(_where(path), "permission denied", "make the file readable by this user (chmod a+r)")
    except OSError as e:
        if isinstance(e, BlockingIOError) or "unable to lock file" in str(e):
            _fail(_where(path), f"the file is locked by a process writing it ({e})", "wait for the writer "
                  "to finish, or set HDF5_USE_FILE_LOCKING=FALSE on file systems without locking")
        if not h5py.is_hdf5(path):
            _fail(_where(path), "not an HDF5 file",
                  f"give {arg} a distbp dataset; convert other data with `distbp data convert`")
        _fail(_where(path), f"cannot be opened, it is truncated or damaged ({e})", DAMAGED)


class Split:
    """One split of a Dataset: row count, shapes, and reads of any rows from memory or file."""

    def __init__(self, dataset: Dataset, name: str, x, y):
        self.name, self._ds = name, dataset
        self._x, self._y = x, y  # h5py datasets until load() replaces them with arrays
        self.n, self.x_shape, self.in_memory = int(x.shape[0]), tuple(x.shape[1:]), False

    def __repr__(self):
        return f"Split({self.name!r}, n={self.n}, x_shape={self.x_shape}, in_memory={self.in_memory})"

    @property
    def nbytes(self) -> int:
        """Bytes of x and y as stored."""
        return sum(a.dtype.itemsize * math.prod(a.shape) for a in (self._x, self._y))

    def check_batch_size(self, batch_size: int, drop_last: bool = True):
        """Raise DataError when the split has fewer rows than one global batch (and drop_last)."""
        if drop_last and self.n < batch_size:
            _fail(_where(self._ds.path, self.name), f"{self.n} rows, fewer than one global batch of {batch_size}",
                  f"set train.batch_size to at most {self.n}, or train.drop_last=false (one step of all "
                  f"{self.n} rows per epoch)")

    def read(self, indices, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) for these rows in this order; x as dtype (uint8 times x_scale), class labels as int64."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        # one pass for both bounds: as unsigned, a negative row is larger than any valid one
        if idx.size and idx.view(np.uint64).max() >= self.n:
            raise IndexError(f"split '{self.name}' has {self.n} rows; row {idx.min()}..{idx.max()} requested")
        if self.in_memory:  # take gathers rows faster than fancy indexing
            x, y = self._x.take(idx, axis=0), self._y.take(idx, axis=0)
        else:
            x, y = self._read_file(idx)
        if self._ds.task.token_ids:  # ids stay integers
            return x.astype(np.int64), y.astype(np.int64)
        if x.dtype == np.uint8:
            x = np.multiply(x, np.dtype(dtype).type(self._ds.x_scale), dtype=dtype)
        return x.astype(dtype, copy=False), y.astype(self._ds.task.read_dtype(dtype), copy=False)

    def labels(self, indices) -> np.ndarray:
        """Class labels (int64) of these rows in this order, without reading x."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.in_memory or idx.size == 0:
            return np.asarray(self._y[:0] if idx.size == 0 else self._y.take(idx), dtype=np.int64)
        rows, inverse = np.unique(idx, return_inverse=True)
        sel = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == rows.size else rows
        try:
            return np.asarray(self._y[sel], dtype=np.int64)[inverse]
        except OSError as e:
            _fail(_where(self._ds.path, self.name), f"cannot read labels ({e})", DAMAGED)

    def _read_file(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx from the file: sort, read once (one slice when contiguous), un-permute."""
        if idx.size == 0:
            return np.empty((0, *self.x_shape), self._x.dtype), np.empty((0, *self._y.shape[1:]), self._y.dtype)
        rows, inverse = np.unique(idx, return_inverse=True)
        sel = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == rows.size else rows
        try:
            x, y = self._x[sel], self._y[sel]
        except OSError as e:
            _fail(_where(self._ds.path, self.name), f"cannot read rows ({e})", DAMAGED)
        if rows.size == idx.size and np.array_equal(rows, idx):
            return x, y
        return x[inverse], y[inverse]

    def load(self, max_bytes: int = DEFAULT_MEMORY_BYTES, comm=None) -> bool:
        """Hold the split in memory if it fits max_bytes, once per node when comm is given; True if held."""
        # With comm every rank must call it (collective): local rank 0 reads into MPI shared
        # memory, the other ranks on the node map the same pages, read-only.
        if self.in_memory or self.nbytes > max_bytes:
            return self.in_memory
        if comm is None:
            x, y = self._read_file(np.arange(self.n))
        else:
            x = node_shared_array(comm, self._x.shape, self._x.dtype)
            y = node_shared_array(comm, self._y.shape, self._y.dtype)
            failed, error = np.zeros(1, np.int32), None
            if comm.local_rank == 0:
                try:
                    self._x.read_direct(x)
                    self._y.read_direct(y)
                except OSError as e:
                    failed[0], error = 1, DataError(f"{_where(self._ds.path, self.name)}: cannot read "
                                                    f"the data ({e}); HINT: {DAMAGED}")
            comm.allreduce_max(failed)  # the barrier after the fill, and every rank learns of a failure
            if failed[0]:
                raise error or DataError(f"{_where(self._ds.path, self.name)}: another rank failed to read "
                                         f"it; HINT: see that rank's message")
        x.flags.writeable = y.flags.writeable = False
        self._x, self._y, self.in_memory = x, y, True
        return True


class Dataset:
    """A dataset file opened read-only with its format, splits and shapes validated."""

    def __init__(self, path, arg: str = "data.path", bounded_read: bool = True):
        self.path = Path(path)
        if bounded_read:  # header, splits and attributes first read in a child with a time limit
            self._bounded(lambda: Dataset(self.path, arg, bounded_read=False).attrs)
        self._file = _open(self.path, arg)
        self._splits: dict[str, Split] = {}
        try:
            self.task, self.num_classes, self.x_scale = _check_header(_where(self.path), self._file.attrs, arg)
            self._arrays = self._scan_splits()
        except BaseException:
            self._file.close()
            raise
        x, y = next(iter(self._arrays.values()))
        self.input_shape = tuple(x.shape[1:])
        self.output_dim = self.task.output_dim(y)

    def _scan_splits(self) -> dict:
        """{split: (x, y)} h5py datasets of every root group, checked for shapes and dtypes."""
        names = sorted(self._file.keys(), key=lambda k: (SPLIT_ORDER.index(k) if k in SPLIT_ORDER else len(SPLIT_ORDER), k))
        if not names:
            _fail(_where(self.path), "no splits", "write groups train and val, each with datasets x and y")
        arrays = {}
        for name in names:
            group = self._file.get(name)
            if not isinstance(group, h5py.Group):
                _fail(_where(self.path, name), "a root object that is not a split group",
                      "store each split as a group holding datasets x and y (e.g. train/x, train/y)")
            x, y = group.get("x"), group.get("y")
            for key, obj in (("x", x), ("y", y)):
                if not isinstance(obj, h5py.Dataset):
                    _fail(_where(self.path, name, key), f"no dataset '{name}/{key}'",
                          "each split needs datasets x (N, features...) and y (N,) or (N, k)")
                _check_virtual(self.path, name, key, obj)
            _check_shapes(self.path, name, x, y, self.task, self.x_scale)
            arrays[name] = (x, y)
        _check_same_shapes(self.path, arrays)
        return arrays

    def _bounded(self, fn):
        """fn() run in a child with a time limit (files/bounded.py): a read that loops or crashes is a DataError."""
        return bounded.call(fn, "dataset", self.path, DataError, "re-create or re-copy it")

    @property
    def splits(self) -> list[str]:
        """Split names, train/val/test first."""
        return list(self._arrays)

    @property
    def attrs(self) -> dict:
        """Every root attribute as plain Python values (source, license, ...)."""
        return {k: _attr(self._file.attrs, k) for k in self._file.attrs}

    @property
    def class_names(self) -> list[str] | None:
        """Class names of a classification dataset: its class_names attribute (a JSON list), else '0'..'K-1'."""
        return self.task.class_names(self.attrs.get("class_names")) if self.task.labels else None

    def split(self, name: str, check_values: bool = True, option: str = "data.train_split / data.val_split") -> Split:
        """The named split; its values (finite x, labels in range) are checked on first access. option: what
        chooses the split, for the hint."""
        if name not in self._splits:
            if name not in self._arrays:
                _fail(_where(self.path, name), f"no such split (the file has: {', '.join(self.splits)})",
                      f"choose one of those ({option}), or add the split to the file")
            x, y = self._arrays[name]
            if check_values:  # every byte of the split, read in a child with a time limit
                self._bounded(lambda: _check_values(self.path, name, x, y, self.task))
            self._splits[name] = Split(self, name, x, y)
        return self._splits[name]

    def describe(self, values: bool = False) -> list[str]:
        """Human-readable lines: task, shapes, splits and attributes; with values, ranges and class balance."""
        if values:  # reads every byte: in a child with a time limit
            return self._bounded(lambda: self._describe(True))
        return self._describe(False)

    def _describe(self, values: bool) -> list[str]:
        """describe() without the time bound."""
        lines = [f"{self.path}: task {self.task}, input {self.input_shape}, output {self.output_dim}"]
        for name, (x, y) in self._arrays.items():
            lines.append(f"  {name:8s} x {x.shape} {x.dtype}  y {y.shape} {y.dtype}")
            if values:
                lines += [f"           {line}" for line in value_summary(x, y, self.task, self.x_scale)]
        lines += [f"  {k} = {v}" for k, v in self.attrs.items()]
        return lines

    def close(self):
        """Close the file (splits held in memory stay usable)."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


RANGE_RATIO_WARNING = 100  # feature ranges this many times apart slow or stall training on raw inputs


def range_warning(lo: np.ndarray, hi: np.ndarray) -> list[str]:
    """A warning line when the per-feature ranges of tabular x differ by more than RANGE_RATIO_WARNING."""
    ranges = hi - lo
    varied = np.flatnonzero(ranges > 0)
    if varied.size < 2:
        return []
    small, large = varied[ranges[varied].argmin()], varied[ranges[varied].argmax()]
    ratio = ranges[large] / ranges[small]
    if ratio <= RANGE_RATIO_WARNING:
        return []
    return [f"WARNING: feature ranges differ by {ratio:.3g}x (feature {small}: [{lo[small]:.4g}, {hi[small]:.4g}], "
            f"feature {large}: [{lo[large]:.4g}, {hi[large]:.4g}]); HINT: train with data.normalize = "
            "\"standard\" (the default) or \"minmax\", not \"none\""]


def value_summary(x, y, task: Task, x_scale: float | None) -> list[str]:
    """Lines with the range and mean of x (as the model sees it), a feature-range warning, and the class
    balance or target range of y."""
    lo = np.full(math.prod(x.shape[1:]), np.inf)
    hi, total = -lo, 0.0
    for _, block in _blocks(x):
        block = np.asarray(block, dtype=np.float64).reshape(len(block), -1)
        lo, hi, total = np.minimum(lo, block.min(0)), np.maximum(hi, block.max(0)), total + block.sum()
    scaled = x.dtype == np.uint8 and not task.token_ids  # token ids are read as stored
    scale = x_scale if scaled else 1.0
    lines = [f"x range [{lo.min() * scale:.4g}, {hi.max() * scale:.4g}], mean {total * scale / max(x.size, 1):.4g}"
             + (f" (stored uint8 [{lo.min():g}, {hi.max():g}] times x_scale {x_scale:.4g})" if scaled else "")]
    if x.ndim == 2 and not task.token_ids:  # tabular features; image pixels share one scale
        lines += range_warning(lo * scale, hi * scale)
    return lines + task.describe_targets(_blocks(y))


def write_dataset(path, splits: dict, task: str = "classification", num_classes: int | None = None,
                  x_scale: float | None = None, attrs: dict | None = None) -> Path:
    """Validate {split: (x, y)} and write it atomically as a dataset file (contiguous, uncompressed)."""
    path = Path(path)
    arrays = {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in splits.items()}
    if isinstance(task, str) and task in TASKS and TASKS[task].labels and num_classes is None:  # labels 0..K-1 name at least K classes
        num_classes = max([2] + [int(y.max()) + 1 for _, y in arrays.values() if y.size and y.dtype.kind in "iu"])
    header = {"distbp_format": FORMAT, "version": VERSION, "task": task, "num_classes": num_classes,
              "x_scale": x_scale, **(attrs or {})}
    header = {k: v for k, v in header.items() if v is not None}
    task = _check_header(_where(path), header)[0]
    if not arrays:
        _fail(_where(path), "no splits given", "pass splits={'train': (x, y), 'val': (x, y)}")
    for name, (x, y) in arrays.items():
        _check_shapes(path, name, x, y, task, x_scale)
        _check_values(path, name, x, y, task)
    _check_same_shapes(path, arrays)
    # built in memory, then written by plain os.write calls: a full or read-only disk is an OSError
    # naming the output (HDF5's own writes on a full disk name the temp file, or crash)
    f = memory_hdf5(track_order=True)
    f.attrs.update(header)
    for name, (x, y) in arrays.items():
        group = f.create_group(name)
        # contiguous and uncompressed: random rows read fast; no timestamps: same bytes each time
        group.create_dataset("x", data=x, track_times=False)
        group.create_dataset("y", data=y, track_times=False)
    try:
        return write_bytes(path, hdf5_bytes(f))
    except OSError as e:
        raise unwritable(path, e) from None


TEACHER_WIDTH = 32  # hidden units of the random MLP that labels synthetic data


def synthetic(rows: int, features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable classification problem: Gaussian inputs labelled by a random teacher MLP."""
    if not (rows >= 2 and features >= 1 and 2 <= classes <= MAX_CLASSES):
        raise DataError(f"--rows {rows}, --features {features}, --classes {classes}: give at least 2 rows, 1 feature "
                        f"and 2 to {MAX_CLASSES:,} classes")
    if rows * (features + classes) * 4 > SYNTHETIC_MAX_BYTES:
        raise DataError(f"--rows {rows} x --features {features} (and --classes {classes}) need about "
                        f"{rows * (features + classes) * 4 / 2**30:,.1f} GiB in memory, more than "
                        f"{SYNTHETIC_MAX_BYTES / 2**30:g} GiB; HINT: fewer rows or features")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)  # (N, D)
    W1 = rng.standard_normal((features, TEACHER_WIDTH), dtype=np.float32) / np.float32(np.sqrt(features))
    W2 = rng.standard_normal((TEACHER_WIDTH, classes), dtype=np.float32)
    logits = np.tanh(x @ W1) @ W2  # (N, K)
    logits -= logits.mean(axis=0)  # centred so every class gets a fair share of rows
    return x, logits.argmax(axis=1).astype(np.int64)


def synthetic_images(rows: int, shape: tuple, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable image problem (N, C, H, W): each class a random 5x5 pattern, stamped at a random place
    with a random strength onto Gaussian noise (a conv net with pooling learns it; a pixel lookup cannot)."""
    rng = np.random.default_rng(seed)
    C, H, W = shape
    k = min(5, H, W)
    patterns = rng.standard_normal((classes, C, k, k), dtype=np.float32)
    y = rng.integers(0, classes, rows)
    x = rng.standard_normal((rows, C, H, W), dtype=np.float32)
    top, left = rng.integers(0, H - k + 1, rows), rng.integers(0, W - k + 1, rows)
    strength = rng.uniform(1.0, 2.0, rows).astype(np.float32)
    for i in range(rows):
        x[i, :, top[i]:top[i] + k, left[i]:left[i] + k] += strength[i] * patterns[y[i]]
    return x, y.astype(np.int64)


def digits_path() -> Path:
    """The 8x8 digits dataset that ships with distbp (UCI optdigits test set, CC BY 4.0)."""
    return Path(str(resources.files("distbp") / "datasets" / "digits.h5"))
