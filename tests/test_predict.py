"""distbp predict: outputs equal the model's, .npy inputs, regression, and n ranks equal 1 rank."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from distbp.comm import SerialComm
from distbp.config import load_config
from distbp.data import Dataset
from distbp.evaluate import load_model
from distbp.predict import predict, softmax
from distbp.train import run


def trained(comm, shared_tmp, data_path):
    """A checkpoint after a few steps of training on data_path (every rank calls it)."""
    cfg = load_config(None, ["train.max_steps=6", "train.batch_size=8", "model.hidden=[16]",
                             f"data.path={json.dumps(str(data_path))}"])
    assert run(cfg, comm, shared_tmp / "run", "never") == 0
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


@pytest.mark.mpi(min_size=2)
def test_predictions_on_n_ranks_equal_one_rank(comm, shared_tmp, make_dataset):
    data = make_dataset(train=48, val=37, features=5, classes=3)
    ck = trained(comm, shared_tmp, data)
    out = predict(ck, data, shared_tmp / "n.h5", comm, split="val", batch=4)
    if comm.is_root:
        assert out == shared_tmp / "n.h5"
        one = predict(ck, data, shared_tmp / "1.h5", SerialComm(), split="val")
        (got, _), (want, _) = read(out), read(one)
        assert np.array_equal(got["class"], want["class"]) and np.array_equal(got["y"], want["y"])
        assert np.allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    else:
        assert out is None


def test_inference_does_not_import_the_training_loop():
    code = "import sys, distbp.predict, distbp.evaluate; sys.exit('distbp.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
