"""scikit-learn's bundled CSVs, converted as shipped, trained with distbp's defaults, next to scikit-learn's MLP
on the same split (median of 3 seeds); and every task's metrics equal at 1 and 4 ranks in every place they show.
The 1-rank runs train in this process and the 2-rank runs of all cases in one mpirun job (a launch costs
seconds of start-up on a loaded machine); scikit-learn's scores are computed once for both."""
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

import distbp
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


TRAIN_ALL = """# the runs of JOBS.json one after another in this one process, at the launcher's rank count
import json, sys
import distbp
jobs = json.loads(open(sys.argv[1]).read())
summaries = [distbp.train(distbp.load_config(source, sets), run_dir=run, progress="none") for source, sets, run in jobs]
if distbp.rank() == 0:
    open(sys.argv[2], "w").write(json.dumps(summaries))
"""


def cases(folder) -> dict:
    """{case: (x, y, x_val, y_val, config source, --set overrides)}: each CSV converted as README says, and the
    diabetes data with examples/regression.toml changed only in data.path; the defaults otherwise."""
    out = {}
    for name, make in CSVS.items():
        data = folder / f"{name}.h5"
        source, *options = make(folder)
        assert cli.main(["data", "convert", str(source), str(data), "--label", "-1", "--val-fraction", "0.25",
                         *options]) == 0
        x, y, xv, yv = (a.ravel() if a.ndim == 2 and a.shape[1] == 1 else a for a in splits(data))
        out[name] = (x, y, xv, yv, "digits", [f"data.path='{data}'"])  # what `distbp train` alone trains
    for name, what in (("x", "data_raw"), ("y", "target")):
        np.save(folder / f"{name}.npy", np.loadtxt(SKLEARN_DATA / f"diabetes_{what}.csv.gz"))
    data = folder / "diabetes.h5"
    assert cli.main(["data", "convert", str(folder / "x.npy"), str(folder / "y.npy"), str(data),
                     "--task", "regression", "--val-fraction", "0.25"]) == 0
    out["diabetes"] = (*splits(data), str(ROOT / "examples" / "regression.toml"), [f"data.path='{data}'"])
    return out


def scikit_learn(case) -> list[float]:
    """scikit-learn's MLP on standardized inputs at the 3 seeds: accuracy, or R^2 for the diabetes targets."""
    x, y, xv, yv, source, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if source == "digits":
            return [make_pipeline(StandardScaler(), MLPClassifier(random_state=s)).fit(x, y).score(xv, yv)
                    for s in SEEDS]
        # scikit-learn's default 200 iterations stop before convergence here (R^2 < 0); 2000 converge
        return [r2_score(yv, make_pipeline(StandardScaler(), MLPRegressor(random_state=s, max_iter=2000))
                         .fit(x, y).predict(xv)) for s in SEEDS]


@pytest.fixture(scope="module")
def real(comm, tmp_path_factory):
    """The converted cases, scikit-learn's scores (once for both rank counts), and distbp's summaries at
    1 rank (this process) and 2 ranks (one mpirun job), 3 seeds each: {"cases", "theirs", ranks: {case: [...]}}."""
    if comm.size > 1:
        pytest.skip("launches its own jobs or runs in-process: run in the serial session")
    folder = tmp_path_factory.mktemp("real")
    got = {"cases": cases(folder)}
    got["theirs"] = {name: scikit_learn(case) for name, case in got["cases"].items()}
    for ranks in (1, 2):
        jobs = [(case[4], [*case[5], f"train.seed={s}"], str(folder / f"{ranks}" / f"{name}-{s}"))
                for name, case in got["cases"].items() for s in SEEDS]
        (folder / "jobs.json").write_text(json.dumps(jobs))
        script = folder / "train_all.py"
        script.write_text(TRAIN_ALL)
        if ranks == 1:
            summaries = [distbp.train(distbp.load_config(source, sets), run_dir=run, progress="none")
                         for source, sets, run in jobs]
        else:
            done = run_distbp([folder / "jobs.json", folder / "summaries.json"], ranks, script=script, timeout=400)
            assert done.returncode == 0, done.stderr[-3000:]
            summaries = json.loads((folder / "summaries.json").read_text())
        assert [s["world_size"] for s in summaries] == [ranks] * len(jobs)
        names = list(got["cases"])
        got[ranks] = {name: summaries[3 * i:3 * i + 3] for i, name in enumerate(names)}
    return got


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("name", list(CSVS))
def test_csv_as_shipped_reaches_scikit_learn_mlp_accuracy(real, name, ranks):
    ours, theirs = [r["val_accuracy"] for r in real[ranks][name]], real["theirs"][name]
    assert np.median(ours) >= np.median(theirs) - 0.01, (ours, theirs)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks", [1, 2])
def test_diabetes_regression_example_reaches_scikit_learn_mlp_r2(real, ranks):
    ours, theirs = [r["val_r2"] for r in real[ranks]["diabetes"]], real["theirs"]["diabetes"]
    assert np.median(ours) >= np.median(theirs) - 0.02, (ours, theirs)


def task_dataset(path, task: str) -> Path:
    """A small learnable dataset of the task: 3 classes, one 0/1 target, or two float targets."""
    x, c = synthetic(300, 6, 3, seed=4)
    x = x * np.array([1, 10, 100, 1, 0.1, 1000], np.float32)  # ranges apart, as real tables
    y = {"classification": c, "binary": (c == 1).astype(np.float32),
         "regression": np.stack([x[:, 0] * 3 + 200, np.tanh(x[:, 1] / 10)], 1).astype(np.float32)}[task]
    return write_dataset(path, {"train": (x[60:], y[60:]), "val": (x[:60], y[:60])}, task=task,
                         num_classes=3 if task == "classification" else None)


def distbp_command(args, ranks: int, capsys) -> tuple[int, str]:
    """(exit code, stdout) of `distbp ARGS`: in this process at 1 rank, else one mpirun job."""
    if ranks == 1:
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        return code, capsys.readouterr().out
    done = run_distbp(args, ranks, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode, done.stdout


@pytest.mark.parametrize("task", ["classification", "binary", "regression"])
def test_task_metrics_agree_at_1_and_4_ranks_in_summary_jsonl_eval_and_plot(serial, tmp_path, task, capsys):
    data = task_dataset(tmp_path / "d.h5", task)
    want = {"classification": {"val_loss", "val_accuracy", "val_f1_macro"},
            "binary": {"val_loss", "val_accuracy", "val_roc_auc"},
            "regression": {"val_loss", "val_rmse", "val_mae", "val_r2", "val_baseline_rmse"}}[task]
    runs = {}
    for n in (1, 4):
        run = tmp_path / f"run{n}"
        code, out = distbp_command(["train", "--set", f"data.path='{data}'", "--set", "train.epochs=15", "--set",
                                    "train.deterministic=true", "--set", "train.micro_batch=16", "--set",
                                    "checkpoint.keep_best=true", "--run-dir", run], n, capsys)
        assert code == 0
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        evals, summary = [r for r in lines if "val_loss" in r and not r.get("summary")], lines[-1]
        assert len(evals) == 15 and all(want == {k for k in r if k.startswith("val_")} for r in evals)
        assert {k: summary[k] for k in want} == {k: evals[-1][k] for k in want}
        assert all(k in out for k in want)  # the summary table
        code, out = distbp_command(["eval", run, "--json"], n, capsys)
        result = json.loads(out)
        assert all(result[k.replace("val_", "")] == pytest.approx(summary[k], rel=1e-6, abs=1e-9) for k in want)
        runs[n] = summary
    for k in want:
        assert runs[4][k] == pytest.approx(runs[1][k], rel=1e-6, abs=1e-9), k
    if task == "regression":
        assert runs[1]["val_r2"] > 0.3 and runs[1]["val_rmse"] < runs[1]["val_baseline_rmse"]
    else:
        assert runs[1]["val_accuracy"] > 0.7
    code, out = distbp_command(["eval", tmp_path / "run1", "--best", "--json"], 1, capsys)
    assert json.loads(out)["checkpoint"].endswith("checkpoints/best.h5")
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(tmp_path / "run1"), str(tmp_path / "run4"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
