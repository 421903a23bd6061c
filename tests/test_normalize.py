"""Normalization statistics (exact, streamed, over ranks) and task metrics against NumPy and scikit-learn."""
import h5py
import numpy as np
import pytest
from sklearn import metrics as skm

from distbp.files import checkpoint as ckpt
from distbp.datasets import normalize
from distbp.parallel.comm import SerialComm
from distbp.datasets.dataset import Dataset, write_dataset
from distbp.datasets.normalize import Normalizer, fit
from distbp.datasets.task import task_named
from distbp.reporting.scores import RegressionSums, class_report, confusion, format_report, monitored
from distbp.errors import UserError


def shared_dataset(comm, path, splits, **kwargs):
    """Write splits on rank 0; every rank gets the path."""
    if comm.is_root:
        write_dataset(path, splits, **kwargs)
    comm.barrier()
    return path


def tabular(rows: int, seed: int = 0):
    """Features of very different scales: a large offset with a small spread, a constant, a plain one."""
    rng = np.random.default_rng(seed)
    x = np.stack([1e6 + rng.standard_normal(rows), np.full(rows, 7.0), 1e-3 * rng.uniform(0, 1, rows),
                  rng.standard_normal(rows) * 300], axis=1)
    y = np.stack([50 + 10 * rng.standard_normal(rows), np.full(rows, 2.0)], axis=1)
    return x, y


@pytest.fixture
def chunked(monkeypatch):
    """Passes read 64-byte chunks, so statistics are summed over many chunks as for a file larger than memory."""
    monkeypatch.setattr(normalize, "CHUNK_BYTES", 64)


@pytest.mark.parametrize("rows", [3, 101])
def test_standard_statistics_are_exact_over_chunks(comm, tmp_path, chunked, rows):
    check_standard(SerialComm(), comm, tmp_path, rows)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rows", [3, 101])  # 3: ranks without rows at 4
def test_standard_statistics_are_exact_over_ranks_and_chunks(comm, tmp_path, chunked, rows):
    check_standard(comm, comm, tmp_path, rows)


def check_standard(any_comm, comm, tmp_path, rows):
    """Standard statistics of tabular(rows) fitted on any_comm equal NumPy's over the whole array."""
    x, y = tabular(rows)
    path = shared_dataset(comm, comm.bcast_obj(str(tmp_path)) + "/t.h5",
                          {"train": (x, y), "val": (x[:2], y[:2])}, task="regression")
    with Dataset(path) as ds:
        norm = fit(ds.split("train"), any_comm, "standard", True, True)
    x64, y64 = x, y  # stored as float64
    std = x64.std(0)
    std[1] = 1.0  # a constant feature keeps scale 1
    assert np.allclose(norm.x_shift, x64.mean(0), rtol=1e-14, atol=0)
    assert np.allclose(norm.x_scale, std, rtol=1e-9, atol=0)
    assert np.allclose(norm.y_shift, y64.mean(0), rtol=1e-14) and np.array_equal(norm.y_mean, norm.y_shift)
    assert np.allclose(norm.y_scale, [y64[:, 0].std(), 1.0], rtol=1e-9)
    z = norm.x(x64)
    assert np.allclose(z[:, [0, 2, 3]].mean(0), 0, atol=1e-7) and np.allclose(z[:, [0, 2, 3]].std(0), 1, rtol=1e-6)
    assert np.all(np.isfinite(z)) and np.allclose(norm.y_original(norm.y(y64)), y64, rtol=1e-12)


def test_minmax_per_channel_of_images(comm, tmp_path, chunked):
    check_images(SerialComm(), comm, tmp_path)


@pytest.mark.mpi(min_size=2)
def test_minmax_per_channel_of_images_over_ranks(comm, tmp_path, chunked):
    check_images(comm, comm, tmp_path)


def check_images(any_comm, comm, tmp_path):
    """Min-max and standard statistics per channel of (N, 3, 4, 5) uint8 images equal NumPy's."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 3, 4, 5)).astype(np.uint8)
    x[:, 2] = 9  # a constant channel
    path = shared_dataset(comm, comm.bcast_obj(str(tmp_path)) + "/img.h5",
                          {"train": (x, rng.integers(0, 2, 20)), "val": (x[:4], np.zeros(4, np.int64))},
                          num_classes=2, x_scale=1 / 255)
    with Dataset(path) as ds:
        mm = fit(ds.split("train"), any_comm, "minmax", False, False)
        st = fit(ds.split("train"), any_comm, "standard", False, False)
    xs = x * (1 / 255)  # as the passes read uint8: in float64
    assert mm.x_shift.shape == (3, 1, 1) and "y_mean" not in mm.arrays
    assert np.allclose(mm.x_shift.ravel(), xs.min(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(mm.x_scale.ravel(), [np.ptp(xs[:, 0]), np.ptp(xs[:, 1]), 1.0], rtol=1e-12)
    assert np.allclose(st.x_shift.ravel(), xs.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(st.x_scale.ravel()[:2], xs.astype(np.float64)[:, :2].std(axis=(0, 2, 3)), rtol=1e-9)

    out = mm.x(xs.astype(np.float32))
    assert out.dtype == np.float32 and out[:, :2].min() == 0 and np.isclose(out[:, :2].max(), 1)


def test_none_for_classification_is_the_identity():
    norm = Normalizer()
    x = np.arange(6.0).reshape(2, 3)
    assert norm.x(x) is x and norm.y(x) is x and norm.y_original(x) is x and norm.arrays == {}


def test_version_1_checkpoint_reads_as_no_normalization(tmp_path):
    path = tmp_path / "old.h5"
    ckpt.save(path, ckpt.Checkpoint({"0.linear.W": np.ones((2, 2))}, attrs={"step": 1, "epoch": 0, "step_in_epoch": 1,
                                                                              "samples_seen": 8, "world_size": 1,
                                                                              "config": "{}"},
                                    normalization={"x_shift": np.zeros(2), "x_scale": np.ones(2)}))
    with h5py.File(path, "r+") as f:  # what distbp wrote before version 2
        f.attrs["version"] = 1
        del f["normalization"]
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = ckpt.checksum(ckpt.load(path, verify=False))
    old = ckpt.load(path)
    assert old.normalization == {} and Normalizer(old.normalization).x_shift is None


def test_class_report_and_confusion_match_scikit_learn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.uniform(size=300) < 0.7, y, rng.integers(0, 4, 300))
    pred[pred == 3] = 2  # class 3 never predicted: precision 0 by zero_division
    cm = sum(confusion(pred[i:i + 64], y[i:i + 64], 4) for i in range(0, 300, 64))
    report = class_report(cm)
    want = skm.classification_report(y, pred, output_dict=True, zero_division=0)
    assert np.array_equal(report["confusion_matrix"], skm.confusion_matrix(y, pred))
    assert report["accuracy"] == pytest.approx(want["accuracy"], abs=1e-15)
    for name in ["0", "1", "2", "3", "macro avg", "weighted avg"]:
        for k in ("precision", "recall", "f1-score", "support"):
            assert report[name][k] == pytest.approx(want[name][k], abs=1e-12), (name, k)
    text = skm.classification_report(y, pred, zero_division=0).rstrip("\n")
    assert "\n".join(format_report(report)[:len(text.splitlines())]) == text


@pytest.mark.parametrize("k", [1, 3])
def test_regression_metrics_match_scikit_learn(k):
    rng = np.random.default_rng(3)
    y = rng.standard_normal((200, k)) * 20 + 100
    pred = y + rng.standard_normal((200, k)) * 5
    train_mean = y[:50].mean(0) + 1.0  # the baseline predicts the train mean, not the val mean
    sums = RegressionSums(k, train_mean)
    for i in range(0, 200, 32):
        sums.add(pred[i:i + 32], y[i:i + 32])
    m = sums.metrics(200)
    assert m["val_rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)), rel=1e-12)
    assert m["val_mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-12)
    assert m["val_r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-10)
    baseline = np.broadcast_to(train_mean, y.shape)
    assert m["val_baseline_rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, baseline)), rel=1e-12)


def test_best_metric_by_task_and_bad_choices():
    assert monitored("auto", task_named("classification", 3)) == ("val_accuracy", "max")
    assert monitored("auto", task_named("binary")) == ("val_accuracy", "max")
    assert monitored("auto", task_named("regression")) == ("val_loss", "min")
    assert monitored("val_r2", task_named("regression")) == ("val_r2", "max")
    assert monitored("val_rmse", task_named("regression")) == ("val_rmse", "min")
    with pytest.raises(UserError, match="train.best_metric='val_accuracy' is not reported for a regression"):
        monitored("val_accuracy", task_named("regression"))


@pytest.mark.mpi(min_size=2)
def test_serial_and_world_agree_bitwise(comm, tmp_path, chunked):
    x, y = tabular(37, seed=5)
    path = shared_dataset(comm, comm.bcast_obj(str(tmp_path)) + "/w.h5", {"train": (x, y)}, task="regression")
    with Dataset(path) as ds:
        world = fit(ds.split("train"), comm, "standard", True, True)
        alone = fit(ds.split("train"), SerialComm(), "standard", True, True)
    for name, a in alone.arrays.items():  # the same bits: deterministic mode's inputs do not depend on ranks
        assert world.arrays[name].tobytes() == a.tobytes(), name
