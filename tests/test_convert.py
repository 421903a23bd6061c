"""distbp data convert: IDX, CSV, .npz and .npy inputs, streamed splits, validation, and data inspect."""
import gzip
import json
import struct

import numpy as np
import pytest

from distbp.datasets import convert as cv
from distbp.datasets.dataset import Dataset, DataError


def write_idx(path, a: np.ndarray, gz: bool = False):
    """Write a as an IDX file: magic 0x0000 08 ndim (ubyte), big-endian uint32 sizes, raw bytes."""
    data = struct.pack(">I", 0x0800 + a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def images(n=200, seed=0):
    """(n, 6, 5) uint8 images and (n,) labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 5), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def read_all(path):
    """{split: (x, y)} as stored."""
    with Dataset(path) as ds:
        return {s: (ds._arrays[s][0][()], ds._arrays[s][1][()]) for s in ds.splits}, ds.attrs


def rows_of(x):
    """Rows as a set of bytes, to compare splits with the source regardless of order."""
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels_convert_to_uint8_with_a_seeded_val_split(tmp_path, gz):
    x, y = images(300)
    img = write_idx(tmp_path / "train-images-idx3-ubyte", x, gz)
    lab = write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz)
    out = cv.convert([lab, img], tmp_path / "m.h5", val_fraction=0.2, seed=3)  # order of the files does not matter
    splits, attrs = read_all(out)
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    assert xt.dtype == np.uint8 and xt.shape == (240, 1, 6, 5) and xv.shape == (60, 1, 6, 5)
    assert attrs["x_scale"] == pytest.approx(1 / 255) and attrs["num_classes"] == 10
    assert rows_of(np.concatenate([xt, xv])) == rows_of(x[:, None])
    # each split keeps the file order, and every row keeps its label
    label_of = {r.tobytes(): lab for r, lab in zip(x, y)}
    assert all(label_of[r[0].tobytes()] == lab for r, lab in zip(np.concatenate([xt, xv]), np.concatenate([yt, yv])))
    again, _ = read_all(cv.convert([img, lab], tmp_path / "m2.h5", val_fraction=0.2, seed=3))
    other, _ = read_all(cv.convert([img, lab], tmp_path / "m3.h5", val_fraction=0.2, seed=4))
    assert np.array_equal(again["val"][0], xv) and not np.array_equal(other["val"][0], xv)


@pytest.mark.parametrize("stratify", [False, True])
def test_streaming_in_small_blocks_gives_the_same_file(tmp_path, monkeypatch, stratify):
    x, y = images(500, seed=1)
    img, lab = write_idx(tmp_path / "i", x), write_idx(tmp_path / "l", y)
    whole, _ = read_all(cv.convert([img, lab], tmp_path / "a.h5", val_fraction=0.3, stratify=stratify))
    monkeypatch.setattr(cv, "BLOCK_BYTES", 7 * 31)  # 7 rows per block (30 bytes of x, 1 of y)
    monkeypatch.setattr(cv, "MASK_BLOCK", 64 if not stratify else 16)  # classes have ~50 rows here
    streamed, _ = read_all(cv.convert([img, lab], tmp_path / "b.h5", val_fraction=0.3, stratify=stratify))
    monkeypatch.setattr(cv, "BLOCK_BYTES", 64 * 31)
    again, _ = read_all(cv.convert([img, lab], tmp_path / "c.h5", val_fraction=0.3, stratify=stratify))
    assert len(streamed["val"][0]) == 150
    assert rows_of(np.concatenate([streamed["train"][0], streamed["val"][0]])) == rows_of(x[:, None])
    assert all(np.array_equal(streamed[s][i], again[s][i]) for s in streamed for i in (0, 1))  # io blocks don't matter
    assert rows_of(whole["train"][0]) != rows_of(streamed["train"][0])  # the mask block is part of the draw


def test_split_mask_is_exact_and_independent_of_how_it_is_taken(monkeypatch):
    monkeypatch.setattr(cv, "MASK_BLOCK", 100)
    a = cv.SplitMask(1000, 137, seed=5)
    b = cv.SplitMask(1000, 137, seed=5)
    flags_a = np.concatenate([a.take(k) for k in (1, 999)])
    flags_b = np.concatenate([b.take(k) for k in [7] * 142 + [6]])
    assert flags_a.sum() == 137 and np.array_equal(flags_a, flags_b)


def test_truncated_or_foreign_idx_files_are_refused(tmp_path):
    x, y = images(50)
    img, lab = write_idx(tmp_path / "i", x), write_idx(tmp_path / "l", y)
    img.write_bytes(img.read_bytes()[:-10])
    with pytest.raises(DataError, match="ends early.*truncated"):
        cv.convert([img, lab], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob(".o.h5.tmp*"))
    bad = tmp_path / "j"
    bad.write_bytes(b"\0\0\x08")  # too short for a header: neither IDX nor a pair of anything
    with pytest.raises(DataError, match="cannot tell the format"):
        cv.convert([bad, lab], tmp_path / "o.h5")


def write_csv(path, header, rows, delimiter=","):
    """A CSV file from a header (or None) and rows of cells."""
    lines = ([delimiter.join(header)] if header else []) + [delimiter.join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_header_text_labels_by_name(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 3)).round(4)
    names = ["setosa", "virginica", "versicolor"]
    rows = [[x[i, 0], names[i % 3], x[i, 1], x[i, 2]] for i in range(90)]
    path = write_csv(tmp_path / "iris.csv", ["a", "species", "b", "c"], rows)
    splits, attrs = read_all(cv.convert([path], tmp_path / "o.h5", label="species", val_fraction=0.2))
    assert json.loads(attrs["class_names"]) == sorted(names) and attrs["num_classes"] == 3
    xt, yt = splits["train"]
    assert xt.dtype == np.float32 and xt.shape == (72, 3) and len(splits["val"][0]) == 18
    lookup = {tuple(np.float32(x[i])): sorted(names).index(names[i % 3]) for i in range(90)}
    assert all(lookup[tuple(r)] == lab for r, lab in zip(xt, yt))


@pytest.mark.parametrize("label,header,delimiter", [("-1", None, ";"), ("2", False, ","), (None, None, "\t")])
def test_csv_label_by_index_header_detection_and_delimiters(tmp_path, label, header, delimiter):
    rows = [[i * 0.5, -i, i % 4] for i in range(40)]
    head = None if header is False else (["u", "v", "label"])
    path = write_csv(tmp_path / "d.csv", head, rows, delimiter)
    splits, attrs = read_all(cv.convert([path], tmp_path / "o.h5", label=label, header=header, val_fraction=0))
    x, y = splits["train"]
    assert list(splits) == ["train"] and x.shape == (40, 2) and attrs["num_classes"] == 4
    assert np.array_equal(y, np.arange(40) % 4) and np.array_equal(x[:, 1], -np.arange(40))


def test_csv_regression_and_errors_name_the_line(tmp_path):
    rows = [[i, i * 0.25] for i in range(30)]
    path = write_csv(tmp_path / "r.csv", ["x", "target"], rows)
    splits, attrs = read_all(cv.convert([path], tmp_path / "r.h5", task="regression", val_fraction=0.1))
    assert attrs["task"] == "regression" and "num_classes" not in attrs
    assert splits["train"][1].dtype == np.float32 and len(splits["val"][1]) == 3
    rows[7][0] = "n/a"
    write_csv(path, ["x", "target"], rows)
    with pytest.raises(DataError, match="line 9 has 'n/a'"):
        cv.convert([path], tmp_path / "bad.h5", task="regression")
    write_csv(path, ["p", "q"], [[1, 2]])
    with pytest.raises(DataError, match="which column is the label.*--label"):
        cv.convert([path], tmp_path / "bad.h5")
    write_csv(path, ["x", "label"], [[1, 0], [2, -1]])
    with pytest.raises(DataError, match="label -1.0 in row 1 is not a class index"):
        cv.convert([path], tmp_path / "bad.h5", val_fraction=0)


def test_npz_with_keras_style_splits_and_npy_pairs(tmp_path):
    x, y = images(120)
    np.savez(tmp_path / "k.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    splits, attrs = read_all(cv.convert([tmp_path / "k.npz"], tmp_path / "k.h5"))
    assert {s: len(v[0]) for s, v in splits.items()} == {"train": 90, "val": 10, "test": 20}
    assert np.array_equal(splits["test"][0][:, 0], x[100:]) and splits["test"][1].dtype == np.int64
    onehot = np.eye(3, dtype=np.float32)[np.arange(60) % 3]
    np.save(tmp_path / "x.npy", np.arange(60.0))
    np.save(tmp_path / "y.npy", onehot)
    splits, attrs = read_all(cv.convert([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "p.h5",
                                        val_fraction=0, test_inputs=[tmp_path / "x.npy", tmp_path / "y.npy"]))
    assert splits["train"][0].shape == (60, 1) and np.array_equal(splits["train"][1], np.arange(60) % 3)
    np.save(tmp_path / "y.npy", (np.arange(60) % 3)[:, None])  # a label column (N, 1), as keras' CIFAR
    splits, _ = read_all(cv.convert([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "c.h5", val_fraction=0))
    assert np.array_equal(splits["train"][1], np.arange(60) % 3)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * 60, dtype=object))
    with pytest.raises(DataError, match="pickle"):
        cv.convert([tmp_path / "o.npy", tmp_path / "y.npy"], tmp_path / "q.h5")


def test_options_are_checked(tmp_path):
    x, y = images(40)
    img, lab = write_idx(tmp_path / "i", x), write_idx(tmp_path / "l", y)
    with pytest.raises(DataError, match="--num-classes 5 but a label is 9"):
        cv.convert([img, lab], tmp_path / "o.h5", num_classes=5)
    with pytest.raises(DataError, match="--val-fraction 1.0"):
        cv.convert([img, lab], tmp_path / "o.h5", val_fraction=1.0)
    np.savez(tmp_path / "k.npz", x_train=x, y_train=y, x_val=x, y_val=y)
    with pytest.raises(DataError, match="already has a val split"):
        cv.convert([tmp_path / "k.npz"], tmp_path / "o.h5", val_fraction=0.2)
    _, attrs = read_all(cv.convert([img, lab], tmp_path / "o.h5", num_classes=12, x_scale=0.5))
    assert attrs["num_classes"] == 12 and attrs["x_scale"] == 0.5


def test_inspect_shows_class_balance_and_value_ranges(tmp_path):
    x, y = images(100)
    out = cv.convert([write_idx(tmp_path / "i", x), write_idx(tmp_path / "l", y)], tmp_path / "o.h5")
    with Dataset(out) as ds:
        text = "\n".join(ds.describe(values=True))
    train_y = read_all(out)[0]["train"][1]
    assert f"0: {np.sum(train_y == 0)} (" in text and "classes" in text
    assert f"stored uint8 [{x.min()}, {x.max()}]" in text and "x range [0, 1]" in text


def test_inspect_summarizes_many_classes_in_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((90, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(90) % 30)
    out = cv.convert([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "o.h5", val_fraction=0)
    with Dataset(out) as ds:
        text = "\n".join(ds.describe(values=True))
    assert "classes: 30, rows per class 3 (class 0) to 3 (class 0), empty classes 0" in text


def sklearn_csv(name):
    """A CSV file that ships with scikit-learn (real data nobody in this project wrote), found without importing it."""
    import importlib.util
    from pathlib import Path
    return Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.mark.parametrize("name,rows,features,classes", [("wine_data.csv", 178, 13, 3),
                                                        ("breast_cancer.csv", 569, 30, 2)])
def test_real_csv_with_a_count_line_first_converts_with_skip_rows(tmp_path, name, rows, features, classes):
    path = sklearn_csv(name)
    with pytest.raises(DataError, match=r"first line has \d+ cells, the next \d+.*HINT: pass --skip-rows 1"):
        cv.convert([path], tmp_path / "o.h5", label="-1")
    assert not list(tmp_path.iterdir())
    splits, attrs = read_all(cv.convert([path], tmp_path / "o.h5", label="-1", skip_rows=1, val_fraction=0.2))
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    assert len(xt) + len(xv) == rows and xt.shape[1] == features and attrs["num_classes"] == classes
    first = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=1)
    assert any(np.array_equal(r, first[:-1].astype(np.float32)) for r in np.concatenate([xt, xv]))
    assert "stratified" in attrs["split"]
    # every class keeps its share in val to within one row (the largest-remainder rounding)
    counts = np.bincount(np.concatenate([yt, yv]), minlength=classes)
    assert np.all(np.abs(np.bincount(yv, minlength=classes) - counts * len(yv) / rows) < 1)


def test_stratified_split_keeps_class_shares_and_plain_split_does_not_need_to(tmp_path):
    y = np.repeat(np.arange(3), [700, 250, 50]).astype(np.int64)
    np.random.default_rng(0).shuffle(y)
    np.save(tmp_path / "x.npy", np.arange(1000.0)[:, None])
    np.save(tmp_path / "y.npy", y)
    inputs = [tmp_path / "x.npy", tmp_path / "y.npy"]
    for seed in range(3):
        splits, _ = read_all(cv.convert(inputs, tmp_path / f"s{seed}.h5", val_fraction=0.1, seed=seed))
        assert np.bincount(splits["val"][1]).tolist() == [70, 25, 5]
        assert np.bincount(splits["train"][1]).tolist() == [630, 225, 45]
    shares = [np.bincount(read_all(cv.convert(inputs, tmp_path / f"p{seed}.h5", val_fraction=0.1, seed=seed,
                                              stratify=False))[0]["val"][1], minlength=3).tolist()
              for seed in range(5)]
    assert all(sum(s) == 100 for s in shares) and any(s != [70, 25, 5] for s in shares)
    assert cv.stratified_counts(np.array([5, 3, 3]), 4).tolist() == [2, 1, 1]
    with pytest.raises(DataError, match="--skip-rows applies to CSV inputs"):
        cv.convert(inputs, tmp_path / "r.h5", skip_rows=1)
    with pytest.raises(DataError, match="--stratify needs class labels"):
        cv.convert(inputs, tmp_path / "r.h5", task="regression", stratify=True)


def test_numeric_targets_that_would_make_hundreds_of_classes_need_an_explicit_task(tmp_path):
    data = sklearn_csv("diabetes_data_raw.csv.gz")
    target = sklearn_csv("diabetes_target.csv.gz")
    x = np.loadtxt(gzip.open(data, "rt"))
    y = np.loadtxt(gzip.open(target, "rt"))
    path = write_csv(tmp_path / "diabetes.csv", [f"f{i}" for i in range(x.shape[1])] + ["target"],
                     [[*row, t] for row, t in zip(x, y)])
    with pytest.raises(DataError, match=r"numbers up to 346, which would make 347 classes; HINT: pass --task "
                                        r"regression.*or --task classification"):
        cv.convert([path], tmp_path / "d.h5")
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".d.h5*"))
    splits, attrs = read_all(cv.convert([path], tmp_path / "d.h5", task="regression"))
    assert attrs["task"] == "regression" and sorted(np.concatenate([splits["train"][1], splits["val"][1]])) \
        == sorted(y.astype(np.float32))
    _, attrs = read_all(cv.convert([path], tmp_path / "c.h5", task="classification", stratify=False))
    assert attrs["num_classes"] == 347
