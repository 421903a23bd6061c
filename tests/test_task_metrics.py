"""F1 (macro) and ROC-AUC as validation metrics: equal to scikit-learn's on the model's predictions, and usable
as train.best_metric and for early stopping."""
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

import distbp
from distbp import cli
from distbp.datasets.dataset import digits_path
from distbp.reporting.scores import AucSums

CANCER = Path(str(resources.files("sklearn.datasets") / "data" / "breast_cancer.csv"))


def val_split(path):
    with h5py.File(path, "r") as f:
        return f["val/x"][()], f["val/y"][()]


def test_f1_macro_equals_scikit_learns_and_drives_early_stopping(serial, tmp_path):
    summary = distbp.train({"train": {"epochs": 6, "best_metric": "val_f1_macro", "early_stop_patience": 1},
                            "optim": {"lr": 0.5}}, run_dir=tmp_path / "run", progress="none")
    assert summary["best_metric"] == "val_f1_macro" and "best_val_f1_macro" in summary
    x, y = val_split(digits_path())
    pred = distbp.load(tmp_path / "run").predict(x)
    assert summary["val_f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), rel=1e-12)
    assert summary["steps"] < 6 * 23 and "early stop: val_f1_macro did not improve" in summary["stopped"]


def test_roc_auc_equals_scikit_learns_on_a_binary_task(serial, tmp_path):
    data = tmp_path / "cancer.h5"
    assert cli.main(["data", "convert", str(CANCER), str(data), "--skip-rows", "1", "--label", "-1", "--task",
                     "binary", "--val-fraction", "0.25"]) == 0
    summary = distbp.train({"data": {"path": str(data)}, "train": {"epochs": 3, "best_metric": "val_roc_auc"}},
                           run_dir=tmp_path / "run", progress="none")
    x, y = val_split(data)
    proba = distbp.load(tmp_path / "run").predict_proba(x)
    assert summary["val_roc_auc"] == pytest.approx(roc_auc_score(y.ravel(), proba.ravel()), abs=1e-9)
    assert summary["best_metric"] == "val_roc_auc" and summary["best_val_roc_auc"] >= summary["val_roc_auc"]


def test_auc_counts_ties_half_and_averages_outputs():
    sums = AucSums(2)
    logits = np.array([[0.0, 2.0], [0.0, -1.0], [1.0, 0.5], [-1.0, 0.5]])
    y = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
    sums.add_chunk(logits, logits, y)
    want = np.mean([roc_auc_score(y[:, j], logits[:, j]) for j in range(2)])
    assert sums.metrics(4)["val_roc_auc"] == pytest.approx(want)
