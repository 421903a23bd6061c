"""The end of a run: checkpoint.keep_best on with early stopping, train.restore_best, the per-class report of the
best weights, and the test split's metrics."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp import cli
from distbp.datasets.dataset import digits_path, write_dataset
from distbp.files import checkpoint as ckpt


@pytest.fixture
def alone(comm, tmp_path, monkeypatch):
    if comm.size > 1:
        pytest.skip("calls cli.main in-process: run in the serial session")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(run_dir, *sets) -> dict:
    args = ["train", "--run-dir", str(run_dir), "--progress", "none"]
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 0
    return json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])


def test_restore_best_ends_on_the_best_weights_with_their_report(alone, capsys):
    summary = train("rb", "train.epochs=4", "optim.lr=0.5", "train.restore_best=true")  # lr 0.5: a noisy run
    out = capsys.readouterr().out
    final = ckpt.load(alone / "rb" / "checkpoints" / ckpt.checkpoint_name(summary["steps"]))
    best = ckpt.load(alone / "rb" / "checkpoints" / "best.h5")  # keep_best "auto": on with restore_best
    assert all(np.array_equal(final.params[k], best.params[k]) for k in final.params)
    assert summary["val_accuracy"] == summary["best_val_accuracy"]
    assert f"validation split, the best weights (step {summary['best_step']}):" in out and "macro avg" in out
    if summary["best_step"] != summary["steps"]:
        assert "restored the weights of the best evaluation" in out


def test_keep_best_is_on_with_early_stopping_only(alone):
    train("plain", "train.epochs=1")
    assert not (alone / "plain" / "checkpoints" / "best.h5").exists()
    train("early", "train.epochs=2", "train.early_stop_patience=5")
    assert (alone / "early" / "checkpoints" / "best.h5").exists()


def test_the_test_split_is_evaluated_at_the_end(alone, capsys):
    with h5py.File(digits_path()) as f:
        (x, y), (xv, yv) = ((f[s]["x"][()], f[s]["y"][()]) for s in ("train", "val"))
    write_dataset("three.h5", {"train": (x[:1200], y[:1200]), "val": (xv, yv), "test": (x[1200:], y[1200:])},
                  "classification", 10, x_scale=1 / 16)
    summary = train("t", "data.path='three.h5'", "train.epochs=2")
    assert "test split (237 rows), the best weights" in capsys.readouterr().out
    assert cli.main(["eval", "t", "--split", "test", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert summary["test_accuracy"] == evaluated["accuracy"] and summary["test_loss"] == pytest.approx(
        evaluated["loss"], rel=1e-12)
    (line,) = [json.loads(s) for s in (alone / "t" / "metrics.jsonl").read_text().splitlines() if "test_loss" in s
               and "summary" not in s]
    assert line["weights_of_step"] == summary["best_step"]
