"""Predictions of a checkpoint's model, data-parallel: each rank a contiguous slice, rank 0 writes.

Every rank predicts its slice in chunks of `batch` rows; chunk r of every rank is
gathered to rank 0 in one round, which writes the rows into preallocated datasets of
a file it holds in memory (the predictions of all rows) and writes to OUT at the end.

The output file (`distbp_format = "predictions"`, `version = 1`) holds, for
classification, `class` (N,) int64 and `probabilities` (N, K) float32; for binary,
`probability` and `class` (N, k); for regression, `output` (N, k) float32, or (N,)
when k = 1. A dataset input adds its labels `y` (N, ...) for scoring.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import faults
from .data import DataError, first_bad, not_finite
from .errors import agree, on_root
from .evaluate import load_model
from .safeio import check_output, hdf5_bytes, memory_hdf5, write_bytes
from .sampler import shard

FORMAT, VERSION = "predictions", 1


class NpyRows:
    """Rows of an .npy input array (memory-mapped), shaped and scaled as the model's inputs."""

    def __init__(self, path: str, input_shape: tuple, x_scale: float | None):
        try:
            self.x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"input {path}: not a readable .npy array ({e}); HINT: save it with "
                            "numpy.save(path, x)") from None
        if self.x.dtype.kind not in "fiu":
            raise DataError(f"input {path}: dtype {self.x.dtype} is not a real number type; HINT: give float32, "
                            "float64 or integer inputs (complex, boolean, text and record arrays are not inputs)")
        n = self.x.shape[0] if self.x.ndim else 0
        if self.x.ndim == 0 or math.prod(self.x.shape[1:]) != math.prod(input_shape) or n == 0:
            raise DataError(f"input {path}: shape {self.x.shape} does not hold rows of the model's input "
                            f"{input_shape}; HINT: give an array of shape (N, {', '.join(map(str, input_shape))})")
        if self.x.dtype.kind == "f":
            first_bad(f"input {path}", self.x, not_finite, "NaN or Inf inputs, first at row {row}",
                      "clean or impute the inputs, or drop those rows, before predicting")
        self.n, self.input_shape, self.y = n, input_shape, None
        self.scale = (x_scale or 1 / 255) if self.x.dtype == np.uint8 else None

    def read(self, lo: int, hi: int, dtype) -> tuple[np.ndarray, None]:
        """(x, None) of rows [lo, hi)."""
        x = np.asarray(self.x[lo:hi]).reshape(hi - lo, *self.input_shape)
        return (x * dtype.type(self.scale) if self.scale else x).astype(dtype, copy=False), None


class SplitRows:
    """Rows of a dataset split, with their labels."""

    def __init__(self, split):
        self.split, self.n = split, split.n

    def read(self, lo: int, hi: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of rows [lo, hi)."""
        return self.split.read(np.arange(lo, hi), dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 with the row max subtracted."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True), dtype=np.float64)
    return z / z.sum(axis=1, keepdims=True)


def outputs(task: str, logits: np.ndarray) -> dict:
    """{name: array} of one chunk's predictions for the task."""
    if task == "classification":
        p = softmax(logits)
        return {"class": p.argmax(axis=1).astype(np.int64), "probabilities": p.astype(np.float32)}
    if task == "binary":
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        return {"probability": p.astype(np.float32), "class": (p > 0.5).astype(np.int64)}
    out = logits.astype(np.float32)
    return {"output": out[:, 0] if out.shape[1] == 1 else out}


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
        """Write the file to out atomically (the old file stays whole if that fails)."""
        try:
            return write_bytes(out, hdf5_bytes(self.f))
        except OSError as e:
            raise DataError(f"cannot write {out} ({e.strerror}); the old file, if any, is intact; "
                            "HINT: free space or choose another OUT.h5") from None


def _attrs(checkpoint, source, split, data) -> dict:
    """Root attributes of the predictions file."""
    attrs = {"distbp_format": FORMAT, "version": VERSION, "task": data.task, "checkpoint": str(checkpoint),
             "input": str(source), "model_input_shape": list(data.input_shape)}
    if split:
        attrs["split"] = split
    if data.task == "classification":
        attrs["num_classes"] = data.num_classes
        if "class_names" in data.attrs:
            attrs["class_names"] = data.attrs["class_names"]
    return attrs


def predict(checkpoint, source, out, comm, split: str = "val", batch: int = 1024,
            force: bool = False) -> Path | None:
    """Write the model's predictions on a dataset split or an .npy array to `out`; returns its path on rank 0."""
    if batch < 1:
        raise DataError(f"--batch {batch} must be at least 1")
    npy = str(source).endswith(".npy")
    model, data, _, norm = load_model(checkpoint, comm, data_path=None if npy else source)
    on_root(comm, check_output, out, [checkpoint, source, data.path], force)
    rows = agree(comm, lambda: NpyRows(source, model.input_shape, data.x_scale) if npy
                 else SplitRows(data.split(split)))
    lo, hi = shard(rows.n, comm.rank, comm.size)
    rounds = math.ceil(math.ceil(rows.n / comm.size) / batch)  # chunks in the largest slice, the same on every rank
    template = outputs(data.task, np.zeros((1, *model.out_shape), model.params.dtype))
    if not npy:
        template["y"] = rows.read(0, 1, model.params.dtype)[1]
    attrs = _attrs(checkpoint, source, None if npy else split, data)
    writer = on_root(comm, Writer, rows.n, template, attrs)
    faults.inject_at(comm.rank, "predict")  # inert unless DISTBP_FAULT is set (tests)
    for r in range(rounds):
        a, b = min(lo + r * batch, hi), min(lo + (r + 1) * batch, hi)
        chunk = None
        if b > a:
            x, y = rows.read(a, b, model.params.dtype)
            logits = model.forward(norm.x(x))
            chunk = outputs(data.task, norm.y_original(logits) if data.task == "regression" else logits)
            if y is not None:
                chunk["y"] = y
        pieces = comm.gather_obj((a, chunk))
        for start, arrays in pieces or ():
            if arrays is not None:
                writer.write(start, arrays)
    return on_root(comm, lambda: writer.save(out))
