"""`distbp data convert`: NumPy, CSV and MNIST IDX files to a dataset file, streamed in row blocks.

Nothing is read whole: .npy/.npz arrays and IDX files are read a block of rows at a
time from the (possibly gzipped) file, CSV files in two passes (layout and labels,
then values). The output's datasets are preallocated, contiguous and uncompressed,
and filled block by block; the validation split is drawn by a seeded, exact random
subset that is also generated block by block (SplitMask), per class for classification
(StratifiedMask: every class keeps its share in both splits). The result is written to a
temporary name, reopened with data.Dataset to validate it, then renamed into place.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..files.atomic import AtomicFile
from .dataset import FORMAT, MAX_CLASSES, VERSION, Dataset, DataError
from .task import TASKS, BadTarget, Classification, Task, TaskError
from ..files.safeio import check_output, check_space

BLOCK_BYTES = 16 << 20  # rows read and written per block
MASK_BLOCK = 1 << 16  # rows per block of the validation-split draw (fixed: the split depends on the seed only)
PROGRESS_BYTES = 64 << 20  # show a progress bar (on a terminal) for inputs larger than this
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
LABEL_NAMES = ("label", "labels", "target", "class", "y")
MAX_GUESSED_CLASSES = 100  # more classes than this from numeric labels needs an explicit --task
MAX_ROW_BYTES = 1 << 28  # one example of an .npy, .npz or IDX input; a larger claimed row is a damaged header
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class ConvertError(DataError):
    """An input file cannot be converted; the message names the file and the fix."""


@contextlib.contextmanager
def _reading(where: str, what: str):
    """Turn the errors of reading binary, cut-short or non-UTF-8 input into one ConvertError naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ConvertError(f"{where}: byte {e.start} is not UTF-8 text, so this is not a {what}; HINT: give "
                           "a text CSV file (or NumPy/IDX files for binary data)") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ConvertError(f"{where}: the gzip stream is cut short or damaged ({e}); HINT: download or "
                           "copy the file again") from None


def _open_binary(path: Path):
    """The file opened for binary reading, decompressed on the fly when it is gzipped."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_rows(f, where: str, dtype: np.dtype, row_shape: tuple, rows: int) -> np.ndarray:
    """Up to `rows` rows of a raw row-major array from f, in native byte order."""
    row_bytes = dtype.itemsize * math.prod(row_shape)
    buf = f.read(rows * row_bytes)
    if len(buf) != rows * row_bytes:
        raise ConvertError(f"{where}: the file ends early ({len(buf) // max(row_bytes, 1)} of {rows} rows "
                           f"left); HINT: it is truncated, download or copy it again")
    return np.frombuffer(buf, dtype).reshape(rows, *row_shape).astype(dtype.newbyteorder("="), copy=False)


class ArrayFile:
    """One array stored in a file (.npy, a member of an .npz, or IDX), read in row blocks."""

    def __init__(self, where: str, opener, dtype, shape, skip_header):
        self.where, self._opener, self._skip_header = where, opener, skip_header
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        if row_bytes > MAX_ROW_BYTES:  # checked before a block of rows is allocated
            raise ConvertError(f"{where}: shape {self.shape} ({self.dtype}) makes rows of {row_bytes:,} bytes, "
                               f"more than {MAX_ROW_BYTES:,}; the header is damaged or the array is not rows of "
                               "examples; HINT: store one example per row, e.g. x.reshape(len(x), -1)")

    def blocks(self, rows: int):
        """Arrays of up to `rows` consecutive rows, in order."""
        with _reading(self.where, "binary array file"), self._opener() as f:
            self._skip_header(f)
            for lo in range(0, self.shape[0], rows):
                yield _read_rows(f, self.where, self.dtype, self.shape[1:], min(rows, self.shape[0] - lo))


def _npy_header(f, where: str):
    """(shape, dtype) from an .npy header; refuses object arrays and Fortran order."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in NPY_HEADERS:
            raise ValueError(f"npy format version {version} is not supported")
        shape, fortran, dtype = NPY_HEADERS[version](f)
    except ValueError as e:
        raise ConvertError(f"{where}: not a readable .npy array ({e}); HINT: save it with numpy.save") from None
    if dtype.hasobject:
        raise ConvertError(f"{where}: holds Python objects, which would need pickle; HINT: save a numeric "
                           "array, e.g. numpy.save(path, a.astype(numpy.float32))")
    if fortran and len(shape) > 1:
        raise ConvertError(f"{where}: stored in Fortran order; HINT: re-save it with "
                           "numpy.save(path, numpy.ascontiguousarray(a))")
    return shape, dtype


def npy_array(path: Path, member: str | None = None) -> ArrayFile:
    """An .npy file, or the member `member` of an .npz archive, as an ArrayFile."""
    where = f"{path}" + (f" [{member}]" if member else "")

    def opener():
        if member is None:
            return open(path, "rb")
        archive = zipfile.ZipFile(path)
        f = archive.open(member + ".npy")
        f.close = lambda close=f.close: (close(), archive.close())  # closing the member closes the archive
        return f

    with opener() as f:
        shape, dtype = _npy_header(f, where)
    return ArrayFile(where, opener, dtype, shape, lambda f: _npy_header(f, where))


def _idx_header(f, where: str):
    """(shape, dtype) from an IDX header: 0, 0, type code, ndim, then ndim big-endian uint32 sizes."""
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_DTYPES or not 1 <= magic[3] <= 4:
        raise ConvertError(f"{where}: not an IDX file (magic {magic.hex()}; expected 00000803 for images, "
                           "00000801 for labels); HINT: give the MNIST-style image and label files")
    sizes = f.read(4 * magic[3])
    if len(sizes) != 4 * magic[3]:
        raise ConvertError(f"{where}: the IDX header ends early ({len(sizes)} of {4 * magic[3]} size bytes); "
                           "HINT: the file is truncated, download or copy it again")
    shape = tuple(int(d) for d in np.frombuffer(sizes, ">u4"))
    return shape, np.dtype(IDX_DTYPES[magic[2]])


def is_idx(path: Path) -> bool:
    """True if the (possibly gzipped) file starts with an IDX magic number."""
    try:
        with _open_binary(path) as f:
            magic = f.read(4)
    except (OSError, EOFError):
        return False
    return len(magic) == 4 and magic[:2] == b"\0\0" and magic[2] in IDX_DTYPES and 1 <= magic[3] <= 4


def idx_array(path: Path) -> ArrayFile:
    """An IDX file (MNIST, Fashion-MNIST; raw or gzipped) as an ArrayFile."""
    with _reading(str(path), "IDX file"), _open_binary(path) as f:
        shape, dtype = _idx_header(f, str(path))
    return ArrayFile(str(path), lambda: _open_binary(path), dtype, shape, lambda f: _idx_header(f, str(path)))


class ArrayPair:
    """x and y arrays of one split with the same number of rows, read together in row blocks."""

    def __init__(self, x: ArrayFile, y: ArrayFile):
        if not x.shape or not y.shape or x.shape[0] != y.shape[0]:
            raise ConvertError(f"x {x.where} has shape {x.shape} but y {y.where} has {y.shape}; HINT: "
                               "give x and y with one label row per input row")
        self.x, self.y, self.where = x, y, x.where
        self.n, self.x_shape, self.x_dtype = x.shape[0], x.shape[1:], x.dtype
        self.class_names = None

    def labels(self, rows: int):
        """Blocks of y alone."""
        return self.y.blocks(rows)

    def blocks(self, rows: int):
        """(x, y) blocks of up to `rows` rows, in order."""
        xs, ys = self.x.blocks(rows), self.y.blocks(rows)
        try:
            yield from zip(xs, ys)
        finally:  # close both files when the caller stops early
            xs.close()
            ys.close()


def _number(s: str) -> bool:
    """True if s parses as a float."""
    try:
        float(s)
    except ValueError:
        return False
    return True


class CsvTable:
    """A CSV file of numeric feature columns and one label column, read in row blocks."""

    def __init__(self, path: Path, label=None, header: bool | None = None, delimiter: str | None = None,
                 classification: bool = True, skip_rows: int = 0, features_only: bool = False, columns=None,
                 drop=()):
        self.path, self.where, self.skip_rows = path, str(path), skip_rows
        with _reading(self.where, "CSV file"), self._open() as f:
            sample = f.read(1 << 16)
        self.delimiter = delimiter or self._sniff(sample)
        first = [row for row in csv.reader(io.StringIO(sample), delimiter=self.delimiter) if row][:2]
        if not first:
            raise ConvertError(f"{path}: the CSV file is empty{f' after {skip_rows} skipped lines' * bool(skip_rows)}"
                               "; HINT: give a file with one row per sample")
        if len(first) == 2 and len(first[0]) != len(first[1]):
            raise ConvertError(f"{path}: the first line{f' after {skip_rows} skipped' * bool(skip_rows)} has "
                               f"{len(first[0])} cells, the next {len(first[1])}: it is not a header of this "
                               "table (some files start with a line such as 'n_samples,n_features,class names'); "
                               f"HINT: pass --skip-rows {skip_rows + 1} to skip it")
        if header is None:  # a header row has a text cell where the next row has a number
            header = len(first) < 2 or any(not _number(a) and _number(b) for a, b in zip(*first))
        self.names = [c.strip() for c in first[0]] if header else None
        width, self.notes = len(first[0]), []
        self.label = None if features_only else self._label_column(label, width)
        self.features = self._feature_columns(columns, drop, width)
        self.n, texts, counter = self._scan(header, width)
        if counter and columns is None and 0 in self.features:  # pandas' to_csv() writes its index so
            self.features.remove(0)
            self.notes.append(f"WARNING: {path}: the first column is unnamed and counts 0..{self.n - 1}: the row "
                              "index pandas' to_csv() writes (index=False leaves it out); it is not used as a "
                              "feature (HINT: --columns chooses the features yourself)")
        self.feature_names = [self.names[i] for i in self.features] if self.names else None
        self.x_shape, self.x_dtype = (len(self.features),), np.dtype(np.float32)
        self.class_names = sorted(texts) if texts else None
        if texts and not classification:
            raise ConvertError(f"{path}: label column {self._label_name()} holds text; HINT: regression "
                               "targets must be numbers (or use --task classification)")

    def _open(self):
        """The file as text (gzip-aware), past the first skip_rows lines."""
        f = io.TextIOWrapper(_open_binary(self.path), encoding="utf-8-sig", newline="")
        for _ in range(self.skip_rows):
            f.readline()
        return f

    @staticmethod
    def _sniff(sample: str) -> str:
        """The delimiter among , ; tab and | that splits the first lines evenly (comma if unclear)."""
        try:
            return csv.Sniffer().sniff("\n".join(sample.splitlines()[:8]), delimiters=",;\t|").delimiter
        except csv.Error:
            return ","

    def _label_column(self, label, width: int) -> int:
        """The 0-based label column from a name, an index (negative from the end) or the defaults."""
        names = self.names or []
        if label is None:
            found = [i for i, c in enumerate(names) if c.lower() in LABEL_NAMES]
            if not found:
                raise ConvertError(f"{self.path}: which column is the label? columns: "
                                   f"{names or f'{width} unnamed'}; HINT: pass --label NAME or --label INDEX "
                                   "(0-based, -1 = last)")
            return found[0]
        try:
            index = int(label)
        except ValueError:
            if label not in names:
                raise ConvertError(f"{self.path}: no column named {label!r} (columns: {names or 'no header row'});"
                                   " HINT: pass --label with a column name or a 0-based index") from None
            return names.index(label)
        if not -width <= index < width:
            raise ConvertError(f"{self.path}: --label {index} is outside the {width} columns; HINT: use 0.."
                               f"{width - 1}, or -1 for the last column")
        return index % width

    def _column(self, given, width: int, option: str) -> int:
        """A 0-based column from a name or an index (negative from the end), named in errors as option."""
        names = self.names or []
        if str(given) in names:
            return names.index(str(given))
        try:
            index = int(given)
        except ValueError:
            raise ConvertError(f"{self.path}: no column named {given!r} in {option} (columns: "
                               f"{names or 'no header row'}); HINT: give column names or 0-based indices") from None
        if not -width <= index < width:
            raise ConvertError(f"{self.path}: {option} {index} is outside the {width} columns; HINT: use 0.."
                               f"{width - 1}, or -1 for the last column")
        return index % width

    def _feature_columns(self, columns, drop, width: int) -> list[int]:
        """The feature columns in order: --columns as given, else every column but the label and --drop's."""
        if columns is not None:
            keep = [self._column(c, width, "--columns") for c in columns]
        else:
            gone = {self._column(c, width, "--drop") for c in drop}
            keep = [i for i in range(width) if i not in gone and i != self.label]
        if self.label in keep:
            raise ConvertError(f"{self.path}: --columns names the label column {self._label_name()}; HINT: list "
                               "only feature columns")
        if not keep or len(set(keep)) < len(keep):
            raise ConvertError(f"{self.path}: the feature columns {keep} are empty or repeat one; HINT: name each "
                               "feature column once in --columns, or drop fewer")
        return keep

    def _label_name(self) -> str:
        """The label column for messages."""
        return repr(self.names[self.label]) if self.names else f"{self.label}"

    def _rows(self, f, header: bool):
        """(line number, cells) of every data row, skipping blank lines."""
        reader = csv.reader(f, delimiter=self.delimiter)
        if header:
            next(reader, None)
        for row in reader:
            if row and any(c.strip() for c in row):
                yield reader.line_num + self.skip_rows, row

    def _scan(self, header: bool, width: int) -> tuple[int, set, bool]:
        """First pass: row count, every row's width, the label values if they are text (class names), and
        whether the first column is an unnamed row counter 0..N-1 (pandas' index)."""
        self._header, n, texts, numbers = header, 0, set(), 0
        counter = bool(header and (self.names[0] == "" or self.names[0].startswith("Unnamed: 0")))
        with _reading(self.where, "CSV file"), self._open() as f:
            for line, row in self._rows(f, header):
                if len(row) != width:
                    raise ConvertError(f"{self.path}: line {line} has {len(row)} columns, the first row {width};"
                                       " HINT: fix that line, or pass --delimiter if it was guessed wrong")
                counter = counter and row[0].strip() == str(n)
                n += 1
                if self.label is None:
                    continue
                value = row[self.label].strip()
                if _number(value):
                    numbers += 1
                else:
                    texts.add(value)
        if n == 0:
            raise ConvertError(f"{self.path}: no data rows; HINT: give a file with one row per sample")
        if texts and numbers:
            raise ConvertError(f"{self.path}: label column {self._label_name()} mixes numbers and text (e.g. "
                               f"{sorted(texts)[0]!r}); HINT: use one kind of label, or choose the column "
                               "with --label")
        return n, texts, counter

    def blocks(self, rows: int):
        """(x, y) blocks of up to `rows` rows; y as float64, or class indices for text labels."""
        index = {name: i for i, name in enumerate(self.class_names or [])}
        with _reading(self.where, "CSV file"), self._open() as f:
            block, lines = [], []
            for line, row in self._rows(f, self._header):
                block.append(row)
                lines.append(line)
                if len(block) == rows:
                    yield self._parse(block, lines, index)
                    block, lines = [], []
            if block:
                yield self._parse(block, lines, index)

    def labels(self, rows: int):
        """Blocks of the label column alone (parsed as blocks() does)."""
        for _, y in self.blocks(rows):
            yield y

    def _parse(self, block, lines, index) -> tuple[np.ndarray, np.ndarray | None]:
        """Numeric x and y (None for a features-only table) of a block of rows of cells."""
        labels = [] if self.label is None else [row[self.label].strip() for row in block]
        cells = [[row[i] for i in self.features] for row in block]
        try:
            x = np.array(cells, dtype=np.float32)
            y = np.array([index[v] for v in labels] if index else labels, dtype=np.float64)
        except ValueError:
            for line, row in zip(lines, block):
                for i in [*self.features, *([] if self.label is None else [self.label])]:
                    if not _number(row[i]):
                        text = sum(not _number(other[i]) for other in block) > len(block) / 2
                        raise ConvertError(self._not_a_number(line, row[i], i, text)) from None
            raise
        return x, None if self.label is None else y

    def _not_a_number(self, line: int, cell: str, column: int, text: bool) -> str:
        """The message for a cell that is not a number: a feature column of text (most of the block's cells)
        is named as one, a single bad cell as a row to fix."""
        name = f"{self.names[column]!r} (column {column})" if self.names else f"column {column}"
        if column != self.label and text:
            return (f"{self.path}: line {line}: feature {name} holds text ({cell!r}); HINT: if the whole column "
                    f"is text, leave it out (--drop {self.names[column] if self.names else column}) or make it "
                    "the label (--label); if only some cells are, fill or drop those rows")
        return (f"{self.path}: line {line} has {cell!r} in {name} where a number belongs; HINT: fill or drop that "
                "row, or choose the label column with --label")


def open_inputs(inputs, task: Task, label=None, header=None, delimiter=None, x_key="x", y_key="y",
                skip_rows=0, columns=None, drop=()) -> dict:
    """{split: table} from one .npz, an x/y pair of .npy files, a CSV file, or IDX images + labels."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise ConvertError(f"{p}: no such file; HINT: check the path")
    names = [p.name.lower() for p in paths]
    if len(paths) == 1 and names[0].endswith(".npz"):
        return _npz_splits(paths[0], x_key, y_key)
    if len(paths) == 2 and all(n.endswith(".npy") for n in names):
        return {"train": ArrayPair(npy_array(paths[0]), npy_array(paths[1]))}
    if len(paths) == 2 and all(is_idx(p) for p in paths):
        images, labels = sorted((idx_array(p) for p in paths), key=lambda a: -len(a.shape))
        return {"train": ArrayPair(images, labels)}
    if len(paths) == 1 and not is_idx(paths[0]) and not names[0].endswith(".npy"):
        return {"train": CsvTable(paths[0], label, header, delimiter, task.labels, skip_rows, columns=columns,
                                  drop=drop)}
    raise ConvertError(f"cannot tell the format of {', '.join(map(str, paths))}; HINT: give one .npz (arrays "
                       f"{x_key}, {y_key} or x_train, y_train, ...), two .npy files (x then y), one CSV file, "
                       "or two IDX files (images and labels, gzipped or not)")


def _npz_splits(path: Path, x_key: str, y_key: str) -> dict:
    """{split: ArrayPair} of an .npz: arrays x, y, or x_<split>, y_<split> (as keras' mnist.npz)."""
    try:
        with zipfile.ZipFile(path) as z:
            keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
        raise ConvertError(f"{path}: not a readable .npz archive; HINT: save it with numpy.savez") from None
    if {x_key, y_key} <= keys:
        return {"train": ArrayPair(npy_array(path, x_key), npy_array(path, y_key))}
    splits = sorted(k[2:] for k in keys if k.startswith("x_") and f"y_{k[2:]}" in keys)
    if not splits:
        raise ConvertError(f"{path}: holds arrays {sorted(keys)}, none named {x_key!r}/{y_key!r} or "
                           "x_train/y_train; HINT: pass --x-key and --y-key")
    return {s: ArrayPair(npy_array(path, f"x_{s}"), npy_array(path, f"y_{s}")) for s in splits}


class SplitMask:
    """Which rows go to the validation split: an exact, seeded random subset of n_val of n rows, made in blocks."""

    def __init__(self, n: int, n_val: int, seed: int, stream: tuple = ()):
        self.rng = np.random.default_rng([seed, n, *stream])
        self.rows_left, self.val_left = n, n_val
        self.buf = np.zeros(0, bool)

    def _next_block(self) -> np.ndarray:
        """The next MASK_BLOCK rows' flags: a hypergeometric share of the remaining val rows, placed at random."""
        b = min(MASK_BLOCK, self.rows_left)
        k = int(self.rng.hypergeometric(self.val_left, self.rows_left - self.val_left, b)) if b else 0
        mask = np.zeros(b, bool)
        mask[self.rng.choice(b, k, replace=False)] = True
        self.rows_left, self.val_left = self.rows_left - b, self.val_left - k
        return mask

    def take(self, rows: int) -> np.ndarray:
        """Flags (True = val) of the next `rows` rows."""
        while len(self.buf) < rows:
            self.buf = np.concatenate([self.buf, self._next_block()])
        out, self.buf = self.buf[:rows], self.buf[rows:]
        return out

    def flags(self, y: np.ndarray) -> np.ndarray:
        """Flags of the next len(y) rows (their labels do not matter here)."""
        return self.take(len(y))


def stratified_counts(counts: np.ndarray, n_val: int) -> np.ndarray:
    """Val rows per class: each class's share of n_val, remainders to the largest fractions (sum = n_val)."""
    exact = counts * (n_val / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(quota - exact, kind="stable")  # largest fractional part first
    quota[order[:n_val - quota.sum()]] += 1
    return quota


class StratifiedMask:
    """Which rows go to the validation split, drawn per class: an exact seeded subset of each class's rows."""

    def __init__(self, counts: np.ndarray, n_val: int, seed: int):
        self.masks = [SplitMask(int(c), int(q), seed, (k,))
                      for k, (c, q) in enumerate(zip(counts, stratified_counts(counts, n_val)))]

    def flags(self, y: np.ndarray) -> np.ndarray:
        """Flags (True = val) of the next rows, whose class labels are y."""
        out = np.zeros(len(y), bool)
        for k in np.unique(y):
            rows = y == k
            out[rows] = self.masks[k].take(int(rows.sum()))
        return out


def _x_rows(x: np.ndarray, where: str, row0: int) -> np.ndarray:
    """x as stored: uint8 kept, anything else float32; (N,) -> (N, 1), (N, H, W) -> (N, 1, H, W)."""
    if x.ndim in (1, 3):
        x = x[:, None]
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if bad.size:
            raise ConvertError(f"{where}: NaN or Inf features in row {row0 + bad[0]}; HINT: clean or drop "
                               "those rows first")
    return x


def _y_rows(y: np.ndarray, task: Task, where: str, row0: int) -> np.ndarray:
    """A block of labels or targets as the task stores them; ConvertError naming the first bad row."""
    try:
        return task.convert_targets(y)
    except BadTarget as e:
        raise ConvertError(f"{where}: {e.problem.format(row=row0 + e.row)}") from None
    except TaskError as e:
        raise ConvertError(f"{where}: {e}") from None


def _routes(tables: dict, n_val: int, seed: int, train_counts: np.ndarray | None) -> dict:
    """{source split: mask, or None to copy it whole}: the train source feeds train and val when n_val > 0;
    stratified when train_counts (rows per class) are given."""
    if n_val and "val" in tables:
        raise ConvertError("the input already has a val split; HINT: drop --val-fraction")
    mask = SplitMask(tables["train"].n, n_val, seed) if train_counts is None else \
        StratifiedMask(train_counts, n_val, seed)
    return {name: (mask if n_val and name == "train" else None) for name in tables}


def _block_rows(t) -> int:
    """Rows per block of a table: BLOCK_BYTES of x and y rows."""
    y_bytes = t.y.dtype.itemsize * math.prod(t.y.shape[1:]) if isinstance(t, ArrayPair) else 8
    return max(1, BLOCK_BYTES // (t.x_dtype.itemsize * math.prod(t.x_shape) + y_bytes))


def _class_counts(tables: dict, task_given: bool) -> dict:
    """{split: rows per class} from a pass over the labels; refuses numeric labels that would make
    more than MAX_GUESSED_CLASSES classes unless --task classification was given."""
    counts = {}
    for name, t in tables.items():
        total, row0 = np.zeros(0, np.int64), 0
        for y in t.labels(_block_rows(t)):
            numeric = y.dtype.kind == "f" and t.class_names is None and (y.ndim == 1 or y.shape[1] == 1)
            y = _y_rows(y, Classification(), t.where, row0)
            if len(y) and numeric and not task_given and y.max() >= MAX_GUESSED_CLASSES:
                raise ConvertError(f"{t.where}: the labels are numbers up to {int(y.max())}, which would make "
                                   f"{int(y.max()) + 1} classes; HINT: pass --task regression for numeric "
                                   "targets, or --task classification if they really are classes")
            if len(y) and y.max() >= MAX_CLASSES:  # before np.bincount allocates a count per label value
                raise _too_many_classes(int(y.max()) + 1, int(y.max()), t.y.where if isinstance(t, ArrayPair)
                                        else t.where)
            block = np.bincount(y)
            total = np.pad(total, (0, max(0, len(block) - len(total))))
            total[:len(block)] += block
            row0 += len(y)
        counts[name] = total
    return counts


def _too_many_classes(classes: int, top: int, where: str) -> ConvertError:
    """The error for labels (of the input `where`) or --num-classes beyond MAX_CLASSES."""
    return ConvertError(f"{where + ': ' if where else ''}{classes:,} classes (largest label {top}), more than "
                        f"{MAX_CLASSES:,}; HINT: labels must be class indices 0..K-1 (map them), or use --task "
                        "regression for numeric targets")


def _num_classes(counts: dict, names: list | None, given: int | None) -> int:
    """The dataset's class count: `given` (--num-classes) or what the labels and names need, at least 2;
    refused above MAX_CLASSES."""
    top = max((len(c) - 1 for c in counts.values()), default=-1)
    needed = max(top + 1, len(names or ()), 2)
    if max(needed, given or 0) > MAX_CLASSES:
        raise _too_many_classes(max(needed, given or 0), top, "--num-classes" if (given or 0) > needed else "")
    if given is not None and given < top + 1:
        raise ConvertError(f"--num-classes {given} but a label is {top}; HINT: use --num-classes "
                           f">= {top + 1} or leave it out")
    return given or needed


def _out_shapes(tables: dict, routes: dict, n_val: int, task: Task) -> dict:
    """{split: (rows, x row shape, x dtype, y row shape, y dtype)} of the output file."""
    y_dtype = task.stored_dtype()
    out = {}
    for name, t in tables.items():
        first = t.blocks(1)
        x, y = next(first)
        first.close()
        x_row, y_row = _x_rows(x, t.where, 0).shape[1:], _y_rows(y, task, t.where, 0).shape[1:]
        x_dtype = np.uint8 if t.x_dtype == np.uint8 else np.float32
        if routes[name] is not None:
            out["train"] = (t.n - n_val, x_row, x_dtype, y_row, y_dtype)
            out["val"] = (n_val, x_row, x_dtype, y_row, y_dtype)
        else:
            out[name] = (t.n, x_row, x_dtype, y_row, y_dtype)
    first = next(iter(out.values()))
    for name, shapes in out.items():
        if shapes[1:] != first[1:]:
            raise ConvertError(f"split {name!r} has x rows {shapes[1]} {np.dtype(shapes[2])}, another split "
                               f"{first[1]} {np.dtype(first[2])}; HINT: give every split the same layout")
    return out


def _fill(f: h5py.File, tables: dict, routes: dict, shapes: dict, task: Task, bar):
    """Stream every table into the preallocated splits."""
    pos = dict.fromkeys(shapes, 0)
    for name, t in tables.items():
        row0 = 0
        for x, y in t.blocks(_block_rows(t)):
            x, y = _x_rows(x, t.where, row0), _y_rows(y, task, t.where, row0)
            if routes[name] is None:
                parts = [(name, slice(None))]
            else:
                val = routes[name].flags(y)
                parts = [("val", val), ("train", ~val)]
            for split, sel in parts:
                xs, ys = x[sel], y[sel]
                f[split]["x"][pos[split]:pos[split] + len(xs)] = xs
                f[split]["y"][pos[split]:pos[split] + len(ys)] = ys
                pos[split] += len(xs)
            row0 += len(x)
            bar.update(len(x))


def check_draw_options(val_fraction: float | None, seed: int):
    """Raise unless --val-fraction is a number in [0, 1) (or unset) and --seed a non-negative integer."""
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ConvertError(f"--val-fraction {val_fraction} must be in [0, 1); HINT: e.g. 0.1, or 0 for no val split")
    if seed < 0:
        raise ConvertError(f"--seed {seed} must be 0 or more (it seeds numpy's generator); HINT: e.g. --seed 1")


def convert(inputs, out, *, test_inputs=(), label=None, task: str | None = None,
            val_fraction: float | None = None, seed: int = 0, num_classes: int | None = None,
            x_scale: float | None = None, header: bool | None = None, delimiter: str | None = None,
            x_key: str = "x", y_key: str = "y", skip_rows: int = 0, stratify: bool | None = None,
            attrs: dict | None = None, force: bool = False, columns=None, drop=(), log=print) -> Path:
    """Convert input files to the dataset file `out` (see the module docstring); returns its path.

    task None means classification, guessed (numeric labels making over MAX_GUESSED_CLASSES classes are
    refused); stratify None means stratified for classification; attrs are extra root attributes."""
    out = check_output(out, [*inputs, *test_inputs], force)
    task_given, name = task is not None, task or "classification"
    if name not in TASKS:
        raise ConvertError(f"--task {name!r} is not one of {', '.join(TASKS)}")
    task = TASKS[name]()
    if stratify and not task.labels:
        raise ConvertError(f"--stratify needs class labels, not --task {task}; HINT: drop --stratify")
    if skip_rows < 0:
        raise ConvertError(f"--skip-rows {skip_rows} must be 0 or more")
    check_draw_options(val_fraction, seed)
    if delimiter is not None and len(delimiter) != 1:
        raise ConvertError(f"--delimiter {delimiter!r} must be one character; HINT: e.g. --delimiter ';', or "
                           "--delimiter $'\\t' for tabs, or leave it out to detect it")
    kw = dict(label=label, header=header, delimiter=delimiter, task=task, x_key=x_key, y_key=y_key,
              skip_rows=skip_rows, columns=columns, drop=drop)
    tables = open_inputs(inputs, **kw)
    for option, given in (("--skip-rows", skip_rows), ("--columns", columns is not None), ("--drop", drop)):
        if given and not isinstance(tables["train"], CsvTable):
            raise ConvertError(f"{option} applies to CSV inputs, not {', '.join(map(str, inputs))}; HINT: drop it")
    if test_inputs:
        tables["test"] = open_inputs(test_inputs, **kw)["train"]
    for note in (n for t in tables.values() for n in getattr(t, "notes", ())):
        log(note)
    names = sorted(set().union(*(t.class_names or () for t in tables.values())))
    for t in tables.values():  # text labels map to one shared, sorted list of class names
        if t.class_names is not None:
            t.class_names = names
    if "train" not in tables:
        raise ConvertError(f"no train split among {sorted(tables)}; HINT: name the arrays x_train, y_train")
    if val_fraction is None:
        val_fraction = 0.0 if "val" in tables else 0.1
    n_val = int(round(tables["train"].n * val_fraction))
    if not 0 <= val_fraction < 1 or (val_fraction and not 0 < n_val < tables["train"].n):
        raise ConvertError(f"--val-fraction {val_fraction} of {tables['train'].n} rows leaves an empty split; "
                           "HINT: use a value in (0, 1) such as 0.1, or 0 for none")
    counts = _class_counts(tables, task_given) if task.labels else {}
    if task.labels:  # before anything is done per class
        task.num_classes = _num_classes(counts, tables["train"].class_names, num_classes)
    stratify = task.labels if stratify is None else stratify
    routes = _routes(tables, n_val, seed, counts["train"] if stratify else None)
    shapes = _out_shapes(tables, routes, n_val, task)
    # HDF5 writing to a full disk can crash the process: check the room first (another writer may still
    # fill the disk meanwhile; the old file stays whole in any case)
    check_space(out, sum(n * (math.prod(xr) * np.dtype(xd).itemsize + math.prod(yr) * np.dtype(yd).itemsize)
                         for n, xr, xd, yr, yd in shapes.values()))
    total = sum(t.n for t in tables.values())
    big = sum(t.n * t.x_dtype.itemsize * math.prod(t.x_shape) for t in tables.values()) > PROGRESS_BYTES
    with AtomicFile(out) as result:
        with h5py.File(result.tmp, "w", track_order=True) as f, \
                tqdm(total=total, unit="row", desc=f"converting to {out.name}", disable=None if big else True) as bar:
            for name in sorted(shapes, key=lambda s: ("train", "val", "test", s).index(s) if s in
                               ("train", "val", "test") else 3):
                n, x_row, x_dtype, y_row, y_dtype = shapes[name]
                group = f.create_group(name)
                group.create_dataset("x", (n, *x_row), x_dtype, track_times=False)
                group.create_dataset("y", (n, *y_row), y_dtype, track_times=False)
            _fill(f, tables, routes, shapes, task, bar)
            f.attrs.update(_header(tables, inputs, test_inputs, task, x_scale, shapes, n_val, val_fraction, seed,
                                   stratify))
            f.attrs.update(attrs or {})
        with Dataset(result.tmp) as ds:  # the result must read back as a valid dataset, values included
            for name in ds.splits:
                ds.split(name)
        return result.commit()


def _header(tables, inputs, test_inputs, task, x_scale, shapes, n_val, val_fraction, seed, stratify):
    """The root attributes of the converted file."""
    names = next(iter(tables.values())).class_names
    files = " ".join(Path(p).name for p in (*inputs, *test_inputs))
    attrs = {"distbp_format": FORMAT, "version": VERSION, "task": task.name,
             "source": f"distbp data convert {files}", **task.header()}
    if task.labels and names:
        attrs["class_names"] = json.dumps(names)
    features = getattr(tables["train"], "feature_names", None)
    if features:
        attrs["feature_names"] = json.dumps(features)
    if next(iter(shapes.values()))[2] == np.uint8:
        attrs["x_scale"] = x_scale if x_scale is not None else 1 / 255
    elif x_scale is not None:
        raise ConvertError("--x-scale applies only to uint8 inputs (stored as is and scaled when read); "
                           "HINT: scale float inputs before converting, or drop --x-scale")
    if n_val:
        attrs["split"] = (f"val: {n_val} rows ({val_fraction:g}) drawn from train by --seed {seed}"
                          + ", stratified by class" * stratify)
    return attrs
