"""Predictions of a checkpoint's model, data-parallel: each rank a contiguous slice, rank 0 writes.

Every rank predicts its slice in chunks of `batch` rows; chunk r of every rank is
gathered to rank 0 in one round, which writes the rows into preallocated datasets of
a file it holds in memory (the predictions of all rows) and writes to OUT at the end.

The output file (`distbp_format = "predictions"`, `version = 1`) holds, for
classification, `class` (N,) int64 and `probabilities` (N, K) float32; for binary,
`probability` and `class` (N, k); for regression, `output` (N, k) float32, or (N,)
when k = 1. A dataset input adds its labels `y` (N, ...) for scoring. An output name ending
in `.csv` gives a CSV file instead: one column per 1-D array, `name_j` per column of a 2-D
one, in that order, with a header row.

Inputs: a dataset split, an .npy array (memory-mapped) or a CSV file of feature columns
(read in order, in blocks, with convert.CsvTable: header and delimiter detected).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from ..parallel import faults
from ..datasets.convert import CsvTable
from ..datasets.dataset import DataError
from ..datasets.task import not_finite
from ..errors import agree, on_root
from .evaluate import load_model
from ..files.safeio import check_output, hdf5_bytes, memory_hdf5, unwritable, write_bytes
from ..parallel.sampler import shard

FORMAT, VERSION = "predictions", 1
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".txt")
CSV_BLOCK = 4096  # rows per block of a CSV input or output


class NpyRows:
    """Rows of an .npy input array (memory-mapped), shaped and scaled as the model's inputs."""

    def __init__(self, path: str, input_shape: tuple, x_scale: float | None):
        try:
            self.x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise DataError(f"input {path}: not a readable .npy array ({type(e).__name__}: {e}); HINT: save it with "
                            "numpy.save(path, x)") from None
        if self.x.dtype.kind not in "fiu":
            raise DataError(f"input {path}: dtype {self.x.dtype} is not a real number type; HINT: give float32, "
                            "float64 or integer inputs (complex, boolean, text and record arrays are not inputs)")
        n = self.x.shape[0] if self.x.ndim else 0
        if self.x.ndim == 0 or math.prod(self.x.shape[1:]) != math.prod(input_shape) or n == 0:
            raise DataError(f"input {path}: shape {self.x.shape} does not hold rows of the model's input "
                            f"{input_shape}; HINT: give an array of shape (N, {', '.join(map(str, input_shape))})")
        self.n, self.input_shape, self.y = n, input_shape, None
        self.scale = (x_scale or 1 / 255) if self.x.dtype == np.uint8 else None

    def read(self, lo: int, hi: int, dtype) -> tuple[np.ndarray, None]:
        """(x, None) of rows [lo, hi)."""
        return model_inputs(self.x[lo:hi], self.input_shape, self.scale, dtype), None


def normalized(norm, x: np.ndarray) -> tuple[np.ndarray, int | None]:
    """(norm.x(x), index of its first row holding NaN or Inf, or None)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as Inf, which is reported
        x = norm.x(x)
    bad = np.flatnonzero(not_finite(x.reshape(len(x), -1)))
    return x, (int(bad[0]) if bad.size else None)


def check_finite_inputs(where: str, row: int | None):
    """Raise naming the first row whose model inputs are not finite (row None: all are)."""
    if row is not None:
        raise DataError(f"{where}: NaN or Inf inputs, first at row {row} (NaN or Inf in the input, or a value "
                        "beyond the model's float range after x_scale and normalization); HINT: clean or impute "
                        "the inputs, or drop those rows, before predicting")


def model_inputs(x, input_shape: tuple, scale: float | None, dtype) -> np.ndarray:
    """Rows of x shaped as the model's inputs, times scale if given, in dtype."""
    x = np.asarray(x).reshape(len(x), *input_shape)
    with np.errstate(over="ignore"):  # a value beyond dtype's range becomes Inf, which normalized() reports
        return (x * dtype.type(scale) if scale else x).astype(dtype, copy=False)


class CsvRows:
    """Rows of a CSV input of feature columns, read in order (each rank's reads move forward)."""

    def __init__(self, path: str, input_shape: tuple):
        self.table = CsvTable(Path(path), features_only=True)
        if self.table.x_shape[0] != math.prod(input_shape):
            raise DataError(f"input {path}: {self.table.x_shape[0]} columns but the model takes "
                            f"{math.prod(input_shape)} features {input_shape}; HINT: give only the feature "
                            "columns (drop a label column), in the order of training")
        self.n, self.input_shape = self.table.n, input_shape
        self._blocks, self._lo, self._x = None, 0, np.zeros((0, math.prod(input_shape)), np.float32)

    def read(self, lo: int, hi: int, dtype) -> tuple[np.ndarray, None]:
        """(x, None) of rows [lo, hi), lo at or past the previous read's."""
        if self._blocks is None or lo < self._lo:
            self._blocks, self._lo, self._x = self.table.blocks(CSV_BLOCK), 0, self._x[:0]
        while True:  # the buffer holds rows [self._lo, self._lo + len(self._x))
            cut = min(max(0, lo - self._lo), len(self._x))  # drop rows before lo
            self._lo, self._x = self._lo + cut, self._x[cut:]
            if self._lo + len(self._x) >= hi:
                break
            self._x = np.concatenate([self._x, next(self._blocks)[0]])
        x = self._x[lo - self._lo:hi - self._lo]
        return x.reshape(hi - lo, *self.input_shape).astype(dtype, copy=False), None


class SplitRows:
    """Rows of a dataset split, with their labels."""

    def __init__(self, split):
        self.split, self.n = split, split.n

    def read(self, lo: int, hi: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of rows [lo, hi)."""
        return self.split.read(np.arange(lo, hi), dtype)


class Writer:
    """Rank 0's predictions file, built in memory: preallocated datasets filled by row ranges."""

    def __init__(self, n: int, template: dict, attrs: dict):
        self.f = memory_hdf5()
        self.f.attrs.update(attrs)
        for name, a in template.items():
            self.f.create_dataset(name, (n, *a.shape[1:]), a.dtype, track_times=False)

    def write(self, lo: int, arrays: dict):
        """Rows [lo, lo + len) of every array."""
        for name, a in arrays.items():
            self.f[name][lo:lo + len(a)] = a

    def save(self, out) -> Path:
        """Write the file to out atomically (the old file stays whole if that fails); CSV if out ends in .csv."""
        try:
            return write_bytes(out, csv_bytes(self.f) if str(out).lower().endswith(".csv") else hdf5_bytes(self.f))
        except OSError as e:
            raise unwritable(out, e) from None


def csv_bytes(f) -> bytes:
    """The arrays of the in-memory predictions file f as CSV columns (name, or name_j of a 2-D array) under a
    header row; f is closed."""
    with f:
        arrays = list(f.values())
        widths = [math.prod(a.shape[1:]) for a in arrays]
        names = [a.name[1:] if a.ndim == 1 else f"{a.name[1:]}_{j}" for a, w in zip(arrays, widths) for j in range(w)]
        formats = ["%d" if a.dtype.kind in "iu" else "%.9g" for a, w in zip(arrays, widths) for _ in range(w)]
        labels = json.loads(f.attrs.get("class_names", "null")) if "class" in names else None
        at = names.index("class") + 1 if labels else None  # a class_name column after class
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow(names[:at] + ["class_name"] + names[at:] if labels else names)
        for lo in range(0, len(arrays[0]), CSV_BLOCK):
            block = np.hstack([np.asarray(a[lo:lo + CSV_BLOCK], np.float64).reshape(-1, w)
                               for a, w in zip(arrays, widths)])
            if labels:
                rows = io.StringIO()
                np.savetxt(rows, block, fmt=formats, delimiter=",")
                out = csv.writer(text, lineterminator="\n")
                for line, c in zip(rows.getvalue().splitlines(), block[:, at - 1].astype(np.int64)):
                    cells = line.split(",")
                    out.writerow(cells[:at] + [labels[c]] + cells[at:])
            else:
                np.savetxt(text, block, fmt=formats, delimiter=",")
    return text.getvalue().encode()


def _attrs(checkpoint, source, split, data) -> dict:
    """Root attributes of the predictions file."""
    attrs = {"distbp_format": FORMAT, "version": VERSION, "task": data.task.name, "checkpoint": str(checkpoint),
             "input": str(source), "model_input_shape": list(data.input_shape), **data.task.header()}
    if split:
        attrs["split"] = split
    if data.task.labels and "class_names" in data.attrs:
        attrs["class_names"] = data.attrs["class_names"]
    if data.task.token_ids:  # the vocabulary that decodes the tokens
        attrs.update({k: data.attrs[k] for k in ("tokenizer", "vocabulary") if k in data.attrs})
    return attrs


def _input_rows(source, split: str, model, data):
    """The rows to predict: an .npy array, a CSV file, or a split of the dataset `data`."""
    name = str(source).lower()
    if name.endswith(".npy"):
        return NpyRows(source, model.input_shape, data.x_scale)
    if name.endswith(CSV_SUFFIXES):
        return CsvRows(source, model.input_shape)
    if split not in data.splits:
        raise DataError(f"--split {split}: input {source} has no such split (it has: {', '.join(data.splits)}); "
                        "HINT: pass --split with one of those")
    return SplitRows(data.split(split))


def predict(checkpoint, source, out, comm, split: str = "val", batch: int = 1024,
            data_path: str | None = None, force: bool = False) -> Path | None:
    """Write the model's predictions on a dataset split, an .npy array or a CSV file to `out`; returns its
    path on rank 0. data_path: the dataset giving task, classes and x_scale for array inputs (default: the
    run's)."""
    if batch < 1:
        raise DataError(f"--batch {batch} must be at least 1")
    array = str(source).lower().endswith((".npy", *CSV_SUFFIXES))
    if not agree(comm, os.path.isfile, source):
        raise DataError(f"input {source}: no such file; HINT: give INPUT as a dataset file (.h5 with --split), "
                        "an .npy array or a .csv file of inputs")
    if data_path and not array:
        raise DataError(f"--data {data_path} applies to .npy and .csv inputs; a dataset INPUT {source} is its "
                        "own; HINT: drop --data")
    arg = "--data (default: the run's data.path, stored in the checkpoint)" if array else "INPUT"
    model, data, _, norm = load_model(checkpoint, comm, data_path=data_path if array else source, data_arg=arg)
    on_root(comm, check_output, out, [checkpoint, source, data.path], force)
    rows = agree(comm, _input_rows, source, split, model, data)
    lo, hi = shard(rows.n, comm.rank, comm.size)
    rounds = math.ceil(math.ceil(rows.n / comm.size) / batch)  # chunks in the largest slice, the same on every rank
    template = data.task.outputs(np.zeros((1, *model.out_shape), model.params.dtype))
    if not array:
        template["y"] = rows.read(0, 1, model.params.dtype)[1]
    attrs = _attrs(checkpoint, source, None if array else split, data)
    writer = on_root(comm, Writer, rows.n, template, attrs)
    faults.inject_at(comm.rank, "predict")  # inert unless DISTBP_FAULT is set (tests)
    bad = None  # this slice's first row of non-finite model inputs: no further rows are computed
    for r in range(rounds):
        a, b = min(lo + r * batch, hi), min(lo + (r + 1) * batch, hi)
        chunk = None
        if b > a and bad is None:
            x, y = rows.read(a, b, model.params.dtype)
            x, k = normalized(norm, x)
            bad = None if k is None else a + k
        if b > a and bad is None:
            logits = model.forward(x)
            chunk = data.task.outputs(data.task.target_units(logits, norm))
            if y is not None:
                chunk["y"] = y
        pieces = comm.gather_obj((a, chunk))
        for start, arrays in pieces or ():
            if arrays is not None:
                writer.write(start, arrays)
    agree(comm, check_finite_inputs, f"input {source}", bad)  # slices in rank order: the lowest rank's is first
    return on_root(comm, lambda: writer.save(out))
