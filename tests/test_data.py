"""distbp.data: dataset validation messages, reads, the shipped digits."""
import h5py
import numpy as np
import pytest
from conftest import tiny_arrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbp.datasets import dataset as data
from distbp.datasets.dataset import DataError, Dataset, digits_path, synthetic, write_dataset

# --- writing and reading -----------------------------------------------------------------------


def test_write_dataset_is_contiguous_uncompressed_and_readable(tmp_path):
    x, y = tiny_arrays(30, 5, 3)
    path = write_dataset(tmp_path / "d.h5", {"train": (x, y), "val": (x[:6], y[:6])}, attrs={"source": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]
    with h5py.File(path) as f:
        assert f["train/x"].chunks is None and f["train/x"].compression is None
    with Dataset(path) as ds:
        assert (ds.task.name, ds.num_classes, ds.input_shape, ds.output_dim) == ("classification", 3, (5,), 3)
        assert ds.splits == ["train", "val"] and ds.attrs["source"] == "test"
        assert any("train" in line for line in ds.describe())


@pytest.mark.parametrize("memory", [False, True])
def test_read_unsorted_duplicate_and_contiguous_rows(tmp_path, memory):
    x, y = tiny_arrays(30, 4, 5)
    write_dataset(tmp_path / "d.h5", {"train": (x, y)})
    with Dataset(tmp_path / "d.h5") as ds:
        split = ds.split("train")
        assert split.load(max_bytes=1 << 20 if memory else 10) == memory == split.in_memory
        for idx in ([17, 3, 29, 0, 8], [5, 5, 2, 5], list(range(10, 20)), [12, 11, 10], []):
            xb, yb = split.read(idx)
            np.testing.assert_array_equal(xb, x[idx])
            np.testing.assert_array_equal(yb, y[idx])
            assert xb.dtype == np.float32 and yb.dtype == np.int64 and xb.shape == (len(idx), 4)
        assert split.read([1, 2], dtype=np.float64)[0].dtype == np.float64
        with pytest.raises(IndexError, match="30 rows"):
            split.read([0, 30])


def test_uint8_inputs_are_scaled(tmp_path):
    x = np.arange(40, dtype=np.uint8).reshape(10, 4)
    write_dataset(tmp_path / "u.h5", {"train": (x, np.arange(10) % 2)}, x_scale=1 / 255)
    with Dataset(tmp_path / "u.h5") as ds:
        xb, _ = ds.split("train").read([9, 0])
        np.testing.assert_allclose(xb, x[[9, 0]] / np.float32(255), rtol=1e-6)
        assert xb.dtype == np.float32
        np.testing.assert_allclose(ds.split("train").read([3], np.float64)[0], x[[3]] / 255.0, rtol=1e-15)


def test_regression_targets(tmp_path):
    x, _ = tiny_arrays(12, 3)
    y = np.linspace(0, 1, 24).reshape(12, 2)
    write_dataset(tmp_path / "r.h5", {"train": (x, y)}, task="regression")
    with Dataset(tmp_path / "r.h5") as ds:
        assert ds.output_dim == 2 and ds.num_classes is None
        _, yb = ds.split("train").read([4, 1])
        assert yb.dtype == np.float32
        np.testing.assert_allclose(yb, y[[4, 1]], rtol=1e-6)


def test_check_batch_size_names_the_fix(tmp_path):
    write_dataset(tmp_path / "d.h5", {"train": tiny_arrays(20)})
    with Dataset(tmp_path / "d.h5") as ds:
        ds.split("train").check_batch_size(20)
        ds.split("train").check_batch_size(64, drop_last=False)
        with pytest.raises(DataError, match=r"'train': 20 rows, fewer than one global batch of 64.*at most 20"):
            ds.split("train").check_batch_size(64)


def test_synthetic_is_deterministic_and_uses_every_class():
    x, y = synthetic(2000, 16, 5, seed=3)
    assert x.shape == (2000, 16) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y, minlength=5).min() > 100
    np.testing.assert_array_equal(y, synthetic(2000, 16, 5, seed=3)[1])


def test_shipped_digits():
    with Dataset(digits_path()) as ds:
        assert (ds.task.name, ds.num_classes, ds.input_shape, ds.output_dim) == ("classification", 10, (64,), 10)
        assert ds.splits == ["train", "val"]
        assert "CC BY 4.0" in ds.attrs["license"] and "Alpaydin" in ds.attrs["attribution"]
        train, val = ds.split("train"), ds.split("val")
        assert (train.n, val.n) == (1437, 360)
        x, y = val.read(np.arange(val.n))
        assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))


# --- validation: every bad input is one DataError naming file, split, key, problem and fix -----


def write_raw(path, splits=None, **attrs):
    """An HDF5 file with these root attributes and {split: {key: array}} groups, unvalidated."""
    x, y = tiny_arrays(10, 3)
    header = {"distbp_format": "dataset", "version": 1, "task": "classification", "num_classes": 3}
    header.update(attrs)
    with h5py.File(path, "w") as f:
        f.attrs.update({k: v for k, v in header.items() if v is not None})
        for name, arrays in (splits if splits is not None else {"train": {"x": x, "y": y}}).items():
            group = f.create_group(name)
            for key, a in arrays.items():
                group.create_dataset(key, data=a)
    return path


X, Y = tiny_arrays(10, 3)
BAD_FILES = {
    "no_format": ({"distbp_format": None}, "no distbp_format attribute"),
    "checkpoint": ({"distbp_format": "checkpoint"}, "is a distbp checkpoint"),
    "version": ({"version": 2}, "format version 2 is not supported"),
    "task": ({"task": "ranking"}, "task='ranking' is not one of"),
    "num_classes": ({"num_classes": None}, "num_classes=None must be an integer"),
    "x_scale": ({"x_scale": -1.0}, "x_scale=-1.0 must be a positive number"),
    "no_splits": ({"splits": {}}, "no splits"),
    "missing_y": ({"splits": {"train": {"x": X}}}, "split 'train', y: no dataset 'train/y'"),
    "missing_x": ({"splits": {"train": {"y": Y}}}, "split 'train', x: no dataset 'train/x'"),
    "rows": ({"splits": {"train": {"x": X, "y": Y[:7]}}}, "y has shape (7,) but x has 10 rows"),
    "x_dtype": ({"splits": {"train": {"x": X.astype(np.int32), "y": Y}}}, "dtype int32 is not float32"),
    "x_1d": ({"splits": {"train": {"x": X[:, 0], "y": Y}}}, "is not (rows, features...)"),
    "uint8_no_scale": ({"splits": {"train": {"x": X.astype(np.uint8), "y": Y}}}, "no root attribute x_scale"),
    "y_float": ({"splits": {"train": {"x": X, "y": Y.astype(np.float32)}}}, "is not (N,) integer class labels"),
    "y_onehot": ({"splits": {"train": {"x": X, "y": np.eye(3, dtype=np.int64)[Y]}}}, "integer class labels"),
    "label_high": ({"splits": {"train": {"x": X, "y": np.where(np.arange(10) == 6, 3, Y)}}},
                   "label 3 at row 6 is outside [0, 3)"),
    "label_negative": ({"splits": {"train": {"x": X, "y": np.where(np.arange(10) == 2, -1, Y)}}},
                       "label -1 at row 2 is outside [0, 3)"),
    "nan": ({"splits": {"train": {"x": np.where(np.arange(10)[:, None] == 4, np.nan, X), "y": Y}}},
            "NaN or Inf features, first at row 4"),
    "empty": ({"splits": {"train": {"x": X[:0], "y": Y[:0]}}}, "the split is empty"),
    "not_group": ({"splits": {}, "_root_x": True}, "not a split group"),
    "shapes": ({"splits": {"train": {"x": X, "y": Y}, "val": {"x": X[:, :2], "y": Y}}},
               "do not match split 'train'"),
    "regression_int": ({"task": "regression", "splits": {"train": {"x": X, "y": Y}}}, "floats"),
    "regression_inf": ({"task": "regression", "splits": {"train": {"x": X, "y": np.where(Y == 2, np.inf, 0.5)}}},
                       "target inf at row 2 is NaN or Inf"),
    "binary_range": ({"task": "binary", "splits": {"train": {"x": X, "y": Y.astype(np.float32)}}},
                     "target 2.0 at row 2 is not in [0, 1]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_dataset_is_one_clear_error(tmp_path, case):
    attrs, problem = BAD_FILES[case]
    attrs = dict(attrs)
    root_x = attrs.pop("_root_x", False)
    path = write_raw(tmp_path / f"{case}.h5", **attrs)
    if root_x:
        with h5py.File(path, "a") as f:
            f["x"] = X
    with pytest.raises(DataError) as info:
        with Dataset(path) as ds:
            ds.split("train")
            ds.split("val") if "val" in ds.splits else None
    msg = str(info.value)
    assert msg.startswith(f"dataset {path}") and problem in msg and "; HINT: " in msg, msg


def test_missing_split_lists_the_ones_there(tmp_path):
    with Dataset(write_raw(tmp_path / "d.h5")) as ds, pytest.raises(DataError, match=r"split 'val'.*has: train"):
        ds.split("val")


def test_nan_found_in_a_later_block(tmp_path, monkeypatch):
    x = np.zeros((1000, 4), np.float32)
    x[777, 2] = np.inf
    path = write_raw(tmp_path / "d.h5", splits={"train": {"x": x, "y": np.zeros(1000, np.int64)}})
    monkeypatch.setattr(data, "BLOCK_BYTES", 100 * 16)  # 100 rows per block
    with Dataset(path) as ds, pytest.raises(DataError, match="first at row 777"):
        ds.split("train")
    with Dataset(path) as ds:
        assert ds.split("train", check_values=False).n == 1000


@pytest.mark.parametrize("kind, problem", [("missing", "no such file"), ("directory", "is a directory"),
                                           ("text", "not an HDF5 file"), ("truncated", "truncated or damaged")])
def test_unopenable_files(tmp_path, kind, problem):
    path = tmp_path / "d.h5"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("x,y\n1,2\n")
    elif kind == "truncated":
        write_dataset(path, {"train": tiny_arrays(2000, 8)})
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match=problem) as info:
        Dataset(path)
    assert str(info.value).startswith(f"dataset {path}: ") and "HINT" in str(info.value)


def test_write_dataset_validates_before_writing(tmp_path):
    x, y = tiny_arrays(10, 3)
    with pytest.raises(DataError, match="label 7 at row 0"):
        write_dataset(tmp_path / "d.h5", {"train": (x, np.full(10, 7))}, num_classes=3)
    with pytest.raises(DataError, match="NaN or Inf"):
        write_dataset(tmp_path / "d.h5", {"train": (x * np.nan, y)})
    assert list(tmp_path.iterdir()) == []


ATTR_VALUES = st.one_of(st.none(), st.integers(-3, 12), st.floats(allow_nan=True),
                        st.text("abc_xyz 1", max_size=12),
                        st.sampled_from(["dataset", "classification", "regression", "binary", "checkpoint"]),
                        st.lists(st.integers(0, 3), max_size=3).map(np.array))

def _filled(shape, dtype, fill):
    """An array of shape and dtype full of fill (NaN cast to ints gives whatever numpy gives)."""
    with np.errstate(invalid="ignore"):
        return np.full(shape, fill).astype(dtype)


ARRAYS = st.builds(_filled,
                   st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
                   st.sampled_from(["float32", "float64", "uint8", "int64", "int8", "bool", "S3"]),
                   st.sampled_from([0, 1, 2, 5, -1, np.nan, np.inf]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attrs=st.dictionaries(st.sampled_from(["distbp_format", "version", "task", "num_classes", "x_scale"]),
                             ATTR_VALUES, max_size=5),
       splits=st.dictionaries(st.sampled_from(["train", "val"]),
                              st.dictionaries(st.sampled_from(["x", "y"]), ARRAYS, max_size=2), max_size=2))
def test_random_malformed_files_raise_data_error_or_open(tmp_path, attrs, splits):
    path = write_raw(tmp_path / "h.h5", splits=splits, **attrs)
    try:
        with Dataset(path) as ds:
            for name in ds.splits:
                split = ds.split(name)
                split.read(np.arange(split.n)[::-1])
    except DataError as e:
        assert str(e).startswith(f"dataset {path}") and "HINT" in str(e)


def test_inspect_warns_when_feature_ranges_differ_over_100x(tmp_path):
    x, y = tiny_arrays(30, 3, 2, 0)
    close = write_dataset(tmp_path / "close.h5", {"train": (x, y)}, num_classes=2)
    x[:, 2] *= 1000
    apart = write_dataset(tmp_path / "apart.h5", {"train": (x, y)}, num_classes=2)
    with Dataset(close) as ds:
        assert not any("WARNING" in line for line in ds.describe(values=True))
    with Dataset(apart) as ds:
        (line,) = [line for line in ds.describe(values=True) if "WARNING" in line]
    assert "feature ranges differ by" in line and "feature 2" in line and 'data.normalize = "standard"' in line
