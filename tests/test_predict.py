"""distbp predict: outputs equal the model's, .npy and CSV inputs, CSV outputs, regression, errors that
name predict's own arguments, and n ranks equal 1 rank."""
import csv
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from distbp.parallel.comm import SerialComm
from distbp.config import load_config
from distbp.datasets.dataset import Dataset, DataError
from distbp.inference.evaluate import load_model
from distbp.datasets.task import softmax
from distbp.inference.predict import predict
from distbp.training.loop import run


def trained(comm, shared_tmp, data_path):
    """A checkpoint after a few steps of training on data_path (every rank calls it)."""
    cfg = load_config(None, ["train.max_steps=6", "train.batch_size=8", "model.hidden=[16]",
                             f"data.path={json.dumps(str(data_path))}"])
    assert run(cfg, comm, shared_tmp / "run", "never")["exit_code"] == 0
    comm.barrier()  # rank 0 may still be writing the final checkpoint when the others return
    return next((shared_tmp / "run" / "checkpoints").glob("step-*.h5"))


def read(path):
    """{name: array} and attributes of a predictions file."""
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_classification_predictions_match_the_model_and_npy_input(tmp_path, make_dataset):
    comm = SerialComm()
    data = make_dataset(train=48, val=30, features=5, classes=4)
    ck = trained(comm, tmp_path, data)
    out, attrs = read(predict(ck, data, tmp_path / "p.h5", comm, split="val", batch=7))
    model, _, _, norm = load_model(str(ck), comm)
    with Dataset(data) as ds:
        x, y = ds.split("val").read(np.arange(30))
    p = softmax(model.forward(norm.x(x)))
    assert attrs["distbp_format"] == "predictions" and attrs["num_classes"] == 4 and attrs["split"] == "val"
    assert np.allclose(out["probabilities"], p, atol=1e-6) and np.allclose(out["probabilities"].sum(1), 1)
    assert np.array_equal(out["class"], p.argmax(1)) and np.array_equal(out["y"], y)
    np.save(tmp_path / "x.npy", x.reshape(30, 5))
    from_npy, attrs = read(predict(ck, tmp_path / "x.npy", tmp_path / "q.h5", comm))
    assert np.array_equal(from_npy["class"], out["class"]) and "y" not in from_npy and "split" not in attrs


def test_regression_outputs_and_bad_npy_shape(tmp_path, make_dataset):
    comm = SerialComm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    splits = {"train": (x, x.sum(1)), "val": (x[:10], x[:10].sum(1))}
    data = make_dataset(splits=splits, task="regression", num_classes=None)
    ck = trained(comm, tmp_path, data)
    out, attrs = read(predict(ck, data, tmp_path / "p.h5", comm))
    model, _, _, norm = load_model(str(ck), comm)
    assert attrs["task"] == "regression" and out["output"].shape == (10,)
    assert norm.y_shift is not None  # targets standardized in training, outputs in the original units
    assert np.allclose(out["output"], norm.y_original(model.forward(norm.x(x[:10])))[:, 0], atol=1e-5)
    np.save(tmp_path / "bad.npy", x[:, :2])
    with pytest.raises(Exception, match=r"does not hold rows of the model's input \(3,\)"):
        predict(ck, tmp_path / "bad.npy", tmp_path / "b.h5", comm)


def read_csv(path):
    """(header, rows as float64) of a CSV file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def write_features_csv(path, x, header=True):
    """x as a CSV file of feature columns, with a header row of names or without."""
    lines = ([",".join(f"f{j}" for j in range(x.shape[1]))] if header else []) + \
        [",".join(repr(float(v)) for v in row) for row in x]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", [True, False])
def test_csv_input_and_csv_output_equal_the_hdf5_predictions(tmp_path, make_dataset, header):
    comm = SerialComm()
    data = make_dataset(train=48, val=30, features=5, classes=4)
    ck = trained(comm, tmp_path, data)
    want, _ = read(predict(ck, data, tmp_path / "p.h5", comm, split="val"))
    with Dataset(data) as ds:
        x, _ = ds.split("val").read(np.arange(30))
    got, _ = read(predict(ck, write_features_csv(tmp_path / "x.csv", x, header), tmp_path / "q.h5", comm, batch=7))
    assert np.array_equal(got["class"], want["class"]) and np.allclose(got["probabilities"], want["probabilities"])
    names, rows = read_csv(predict(ck, data, tmp_path / "p.csv", comm, split="val"))
    assert names == ["class", "probabilities_0", "probabilities_1", "probabilities_2", "probabilities_3", "y"]
    assert np.array_equal(rows[:, 0], want["class"]) and np.allclose(rows[:, 1:5], want["probabilities"], atol=1e-7)
    assert np.array_equal(rows[:, 5], want["y"]) and sorted(p.name for p in tmp_path.glob("p.*")) == ["p.csv", "p.h5"]
    write_features_csv(tmp_path / "wide.csv", np.hstack([x, x[:, :1]]))
    with pytest.raises(DataError, match=r"input .*wide.csv: 6 columns but the model takes 5 features.*drop a label"):
        predict(ck, tmp_path / "wide.csv", tmp_path / "w.csv", comm)
    assert not (tmp_path / "w.csv").exists()


def test_errors_name_predicts_own_arguments(tmp_path, make_dataset):
    comm = SerialComm()
    data = make_dataset(train=48, val=30, features=5, classes=4)
    ck = trained(comm, tmp_path, data)
    with pytest.raises(DataError, match=r"input .*nope.h5: no such file; HINT: give INPUT"):
        predict(ck, tmp_path / "nope.h5", tmp_path / "o.h5", comm)
    with pytest.raises(DataError, match=r"this is a distbp checkpoint.*HINT: set INPUT to a dataset file"):
        predict(ck, ck, tmp_path / "o.h5", comm)
    with pytest.raises(DataError, match=r"--split test: input .* has no such split \(it has: train, val\)"):
        predict(ck, data, tmp_path / "o.h5", comm, split="test")
    with Dataset(data) as ds:
        x, _ = ds.split("val").read(np.arange(30))
    np.save(tmp_path / "x.npy", x)
    data.rename(tmp_path / "moved.h5")  # the run's dataset is gone: --data names another
    with pytest.raises(DataError, match=r"no such file; HINT: check --data \(default: the run's data.path"):
        predict(ck, tmp_path / "x.npy", tmp_path / "o.h5", comm)
    out, _ = read(predict(ck, tmp_path / "x.npy", tmp_path / "o.h5", comm, data_path=tmp_path / "moved.h5"))
    assert out["class"].shape == (30,) and not list(tmp_path.glob(".o.*"))


@pytest.mark.mpi(min_size=2)
def test_predictions_on_n_ranks_equal_one_rank(comm, shared_tmp, make_dataset):
    data = make_dataset(train=48, val=37, features=5, classes=3)
    ck = trained(comm, shared_tmp, data)
    out = predict(ck, data, shared_tmp / "n.h5", comm, split="val", batch=4)
    if comm.is_root:
        with Dataset(data) as ds:
            write_features_csv(shared_tmp / "x.csv", ds.split("val").read(np.arange(37))[0])
    comm.barrier()
    from_csv = predict(ck, shared_tmp / "x.csv", shared_tmp / "n.csv", comm, batch=4)  # each rank reads its rows
    if comm.is_root:
        assert out == shared_tmp / "n.h5"
        one = predict(ck, data, shared_tmp / "1.h5", SerialComm(), split="val")
        (got, _), (want, _) = read(out), read(one)
        assert np.array_equal(got["class"], want["class"]) and np.array_equal(got["y"], want["y"])
        assert np.allclose(got["probabilities"], want["probabilities"], atol=1e-6)
        assert np.array_equal(read_csv(from_csv)[1][:, 0], want["class"])
    else:
        assert out is None and from_csv is None


TRAINING_ONLY = ("distbp.training.loop", "distbp.training.state", "distbp.training.step", "distbp.optim",
                 "distbp.parallel.zero", "distbp.training.early_stop")
INFER = """
import sys, numpy as np, distbp
from distbp.cli import main
model = distbp.load(sys.argv[1])
model.predict(np.zeros((2, *model.input_shape)))
code = main(["predict", sys.argv[1], sys.argv[2], sys.argv[3], "--split", "val"])
code = code or main(["eval", sys.argv[1]])
loaded = [m for m in {names} if m in sys.modules]
print(loaded)
sys.exit(code or bool(loaded))
"""


def test_inference_imports_no_optimizer_sharding_or_early_stopping(tmp_path, make_dataset):
    """distbp.load(...).predict, `distbp predict` and `distbp eval` import no training-only module."""
    data = make_dataset("d.h5")
    ck = trained(SerialComm(), tmp_path, data)
    proc = subprocess.run([sys.executable, "-c", INFER.format(names=TRAINING_ONLY), str(ck), str(data), str(tmp_path / "p.h5")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "p.h5").is_file()
