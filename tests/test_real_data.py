"""scikit-learn's bundled CSVs, converted as shipped, trained with distbp's defaults, next to scikit-learn's MLP
on the same split (median of 3 seeds); and every task's metrics equal at 1 and 4 ranks in every place they show."""
import json
import warnings
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pandas
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import run_distbp
from distbp import cli
from distbp.datasets.dataset import synthetic, write_dataset

SKLEARN_DATA = Path(str(resources.files("sklearn.datasets") / "data"))
ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def splits(path) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_val, y_val) of a dataset file, as scikit-learn gets them."""
    with h5py.File(path, "r") as f:
        return tuple(f[k][()] for k in ("train/x", "train/y", "val/x", "val/y"))


def pandas_iris(folder) -> Path:
    """scikit-learn's iris written by pandas' to_csv(): its unnamed 0..N-1 index column included."""
    path = Path(folder) / "iris.csv"
    pandas.read_csv(SKLEARN_DATA / "iris.csv", skiprows=1, header=None).to_csv(path)
    return path


def digits_csv(folder) -> Path:
    """scikit-learn's digits.csv.gz unpacked: 64 pixel columns and the label, no header."""
    path = Path(folder) / "digits.csv"
    np.savetxt(path, np.loadtxt(SKLEARN_DATA / "digits.csv.gz", delimiter=","), delimiter=",", fmt="%g")
    return path


CSVS = {"wine": lambda d: [SKLEARN_DATA / "wine_data.csv", "--skip-rows", "1"],
        "breast-cancer": lambda d: [SKLEARN_DATA / "breast_cancer.csv", "--skip-rows", "1"],
        "breast-cancer-binary": lambda d: [SKLEARN_DATA / "breast_cancer.csv", "--skip-rows", "1", "--task", "binary"],
        "iris-pandas": lambda d: [pandas_iris(d)], "digits": lambda d: [digits_csv(d)]}


def train_seeds(folder, ranks: int, *args) -> list[dict]:
    """distbp train ARGS at train.seed 0, 1, 2 on `ranks` ranks; the summary records."""
    out = []
    for s in SEEDS:
        run = Path(folder) / f"run-{s}"
        done = run_distbp(["train", *args, "--set", f"train.seed={s}", "--run-dir", run, "--progress", "none"],
                          ranks if ranks > 1 else 0, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        out.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]))
    return out


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("name", list(CSVS))
def test_csv_as_shipped_reaches_scikit_learn_mlp_accuracy(serial, tmp_path, name, ranks):
    data = tmp_path / "data.h5"
    source, *options = CSVS[name](tmp_path)
    assert cli.main(["data", "convert", str(source), str(data), "--label", "-1", "--val-fraction", "0.25",
                     *options]) == 0
    x, y, xv, yv = (a.ravel() if a.ndim == 2 and a.shape[1] == 1 else a for a in splits(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = [make_pipeline(StandardScaler(), MLPClassifier(random_state=s)).fit(x, y).score(xv, yv)
                  for s in SEEDS]
    ours = [r["val_accuracy"] for r in train_seeds(tmp_path, ranks, "--set", f"data.path='{data}'")]  # defaults
    assert np.median(ours) >= np.median(theirs) - 0.01, (ours, theirs)


@pytest.mark.parametrize("ranks", [1, 2])
def test_diabetes_regression_example_reaches_scikit_learn_mlp_r2(serial, tmp_path, ranks):
    for name, what in (("x", "data_raw"), ("y", "target")):
        np.save(tmp_path / f"{name}.npy", np.loadtxt(SKLEARN_DATA / f"diabetes_{what}.csv.gz"))
    data = tmp_path / "diabetes.h5"
    assert cli.main(["data", "convert", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(data),
                     "--task", "regression", "--val-fraction", "0.25"]) == 0
    x, y, xv, yv = splits(data)
    # scikit-learn's default 200 iterations stop before convergence here (R^2 < 0); 2000 converge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = [r2_score(yv, make_pipeline(StandardScaler(), MLPRegressor(random_state=s, max_iter=2000))
                           .fit(x, y).predict(xv)) for s in SEEDS]
    ours = [r["val_r2"] for r in train_seeds(tmp_path, ranks, ROOT / "examples" / "regression.toml", "--set",
                                             f"data.path='{data}'")]
    assert np.median(ours) >= np.median(theirs) - 0.02, (ours, theirs)


def task_dataset(path, task: str) -> Path:
    """A small learnable dataset of the task: 3 classes, one 0/1 target, or two float targets."""
    x, c = synthetic(300, 6, 3, seed=4)
    x = x * np.array([1, 10, 100, 1, 0.1, 1000], np.float32)  # ranges apart, as real tables
    y = {"classification": c, "binary": (c == 1).astype(np.float32),
         "regression": np.stack([x[:, 0] * 3 + 200, np.tanh(x[:, 1] / 10)], 1).astype(np.float32)}[task]
    return write_dataset(path, {"train": (x[60:], y[60:]), "val": (x[:60], y[:60])}, task=task,
                         num_classes=3 if task == "classification" else None)


@pytest.mark.parametrize("task", ["classification", "binary", "regression"])
def test_task_metrics_agree_at_1_and_4_ranks_in_summary_jsonl_eval_and_plot(serial, tmp_path, task):
    data = task_dataset(tmp_path / "d.h5", task)
    want = {"classification": {"val_loss", "val_accuracy", "val_f1_macro"},
            "binary": {"val_loss", "val_accuracy", "val_roc_auc"},
            "regression": {"val_loss", "val_rmse", "val_mae", "val_r2", "val_baseline_rmse"}}[task]
    runs = {}
    for n in (1, 4):
        run = tmp_path / f"run{n}"
        done = run_distbp(["train", "--set", f"data.path='{data}'", "--set", "train.epochs=15", "--set",
                           "train.deterministic=true", "--set", "train.micro_batch=16", "--set",
                           "checkpoint.keep_best=true", "--run-dir", run], n if n > 1 else 0, timeout=90)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        evals, summary = [r for r in lines if "val_loss" in r and not r.get("summary")], lines[-1]
        assert len(evals) == 15 and all(want == {k for k in r if k.startswith("val_")} for r in evals)
        assert {k: summary[k] for k in want} == {k: evals[-1][k] for k in want}
        assert all(k in done.stdout for k in want)  # the summary table
        got = run_distbp(["eval", run, "--json"], n if n > 1 else 0, timeout=60)
        assert got.returncode == 0, got.stderr[-3000:]
        result = json.loads(got.stdout)
        assert all(result[k.replace("val_", "")] == pytest.approx(summary[k], rel=1e-6, abs=1e-9) for k in want)
        runs[n] = summary
    for k in want:
        assert runs[4][k] == pytest.approx(runs[1][k], rel=1e-6, abs=1e-9), k
    if task == "regression":
        assert runs[1]["val_r2"] > 0.3 and runs[1]["val_rmse"] < runs[1]["val_baseline_rmse"]
    else:
        assert runs[1]["val_accuracy"] > 0.7
    best = run_distbp(["eval", tmp_path / "run1", "--best", "--json"], timeout=60)
    assert json.loads(best.stdout)["checkpoint"].endswith("checkpoints/best.h5")
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(tmp_path / "run1"), str(tmp_path / "run4"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
