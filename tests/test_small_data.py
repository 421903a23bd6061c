"""A small table of one's own with the defaults: every row trained on each epoch, a warning when drop_last
discards many, a throughput with one step, and the same result at any rank count."""
from importlib import resources
from pathlib import Path

import pytest

from conftest import metrics, run_distbp
from distbp import cli
from distbp.parallel.sampler import dropped_rows
from distbp.reporting.metrics import StepTimer, format_summary
from distbp.training.loop import drop_warning

IRIS = Path(str(resources.files("sklearn.datasets") / "data" / "iris.csv"))


@pytest.fixture
def iris(serial, tmp_path):
    """scikit-learn's iris CSV converted as README says (112 train rows, 38 val)."""
    path = tmp_path / "iris.h5"
    assert cli.main(["data", "convert", str(IRIS), str(path), "--skip-rows", "1", "--label", "-1",
                     "--val-fraction", "0.25"]) == 0
    return path


def test_dropped_rows_and_the_warning_past_ten_percent():
    assert dropped_rows(112, 64, True) == 48 and dropped_rows(112, 64, False) == 0
    assert drop_warning(1437, 64, True) is None  # 29 rows: 2%
    warning = drop_warning(112, 64, True)
    assert "drops 48 of the 112 train rows (43%)" in warning and "train.drop_last=false" in warning
    assert drop_warning(112, 64, False) is None


def test_iris_with_the_defaults_trains_every_row_and_reaches_scikit_learn(iris, tmp_path, capsys):
    assert cli.main(["train", "--set", f"data.path='{iris}'", "--run-dir", str(tmp_path / "run"),
                     "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: train.drop_last" not in out
    lines = metrics(tmp_path / "run")
    summary = lines[-1]
    assert summary["steps"] == 60  # 112 rows: a batch of 64 and one of 48, 30 epochs
    assert summary["val_accuracy"] >= 0.93  # scikit-learn's MLP: 94.7% on this split
    # the example config's batch 128 is larger than the table: one step of all 112 rows per epoch
    assert cli.main(["train", "examples/classification.toml", "--set", f"data.path='{iris}'", "--set",
                     "train.epochs=3", "--set", "checkpoint.every_steps=0", "--run-dir",
                     str(tmp_path / "big"), "--progress", "none"]) == 0
    assert metrics(tmp_path / "big")[-1]["steps"] == 3


def test_drop_last_warns_and_one_step_has_a_throughput(iris, tmp_path, capsys):
    assert cli.main(["train", "--set", f"data.path='{iris}'", "--set", "train.drop_last=true", "--set",
                     "train.epochs=1", "--run-dir", str(tmp_path / "run"), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: train.drop_last=true drops 48 of the 112 train rows (43%) every epoch" in out
    summary = metrics(tmp_path / "run")[-1]
    assert summary["steps"] == 1 and summary["samples_per_s"] > 0 and summary["steady"] is False
    assert "(all 1 steps, warm-up included)" in out


def test_step_timer_counts_every_step_until_past_warm_up():
    timer = StepTimer(warmup_steps=2)
    timer.step_done(0.5, 10)
    assert timer.samples_per_s() == 20 and not timer.steady
    timer.step_done(0.5, 10)
    timer.step_done(0.25, 10)
    assert timer.samples_per_s() == 40 and timer.steady
    summary = {"steps": 3, "epochs": 1.0, "world_size": 1, "samples_per_s": 40.0, "wall_time_s": 1.0,
               "steady": True}
    assert any("40.0 (steady state)" in line for line in format_summary(summary))


def test_partial_last_batch_is_the_same_at_1_and_2_ranks(iris, tmp_path):
    crcs = []
    for n in (1, 2):
        proc = run_distbp(["train", "--set", f"data.path='{iris}'", "--set", "train.epochs=3", "--set",
                           "train.deterministic=true", "--set", "train.micro_batch=8", "--run-dir",
                           tmp_path / f"r{n}", "--progress", "none"], ranks=n)
        assert proc.returncode == 0, proc.stderr
        crcs.append(metrics(tmp_path / f"r{n}")[-1]["params_crc32"])
    assert crcs[0] == crcs[1]
