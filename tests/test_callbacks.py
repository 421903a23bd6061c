"""distbp.train's callbacks (hooks, a stop on every rank at the same step, custom metrics) and the epoch-mean
train loss and accuracy, exact over the epoch's rows."""
from pathlib import Path

import pytest

import distbp
from conftest import metrics, run_distbp


class Recorder(distbp.Callback):
    """Every hook call as (hook, step, epoch, argument)."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, run):
        self.calls.append(("on_train_start", run.step, None))

    def on_epoch_end(self, run, metrics):
        self.calls.append(("on_epoch_end", run.step, metrics))
        run.log(custom=run.epoch * 10.0)

    def on_evaluate(self, run, metrics):
        self.calls.append(("on_evaluate", run.step, metrics))

    def on_checkpoint(self, run, path):
        self.calls.append(("on_checkpoint", run.step, path))

    def on_train_end(self, run, summary):
        self.calls.append(("on_train_end", run.step, summary))


CONFIG = {"train": {"epochs": 2, "log_every": 1}, "checkpoint": {"every_steps": 30}}


def test_hooks_in_order_with_their_arguments_and_custom_metrics(serial, tmp_path):
    rec = Recorder()
    summary = distbp.train(CONFIG, run_dir=tmp_path / "run", callbacks=[rec], progress="none")
    hooks = [(h, step) for h, step, _ in rec.calls]
    assert hooks == [("on_train_start", 0), ("on_evaluate", 23), ("on_epoch_end", 23), ("on_checkpoint", 30),
                     ("on_evaluate", 46), ("on_epoch_end", 46), ("on_checkpoint", 46), ("on_train_end", 46)]
    end = rec.calls[5][2]
    assert set(end) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro"}
    assert rec.calls[6][2] == str(tmp_path / "run" / "checkpoints" / "step-00000046.h5")
    assert rec.calls[-1][2]["params_crc32"] == summary["params_crc32"]
    custom = [(r["step"], r["custom"]) for r in metrics(tmp_path / "run") if "custom" in r]
    assert custom == [(23, 10.0), (46, 20.0)]


def test_epoch_means_are_exact_over_the_epochs_rows(serial, tmp_path):
    distbp.train(CONFIG, run_dir=tmp_path / "run", progress="none")
    lines = metrics(tmp_path / "run")
    batches = [r for r in lines if "loss" in r and "step" in r and not r.get("summary")]
    rows = [64] * 22 + [29]  # 1437 train rows: 22 batches of 64, then 29
    for epoch in (1, 2):
        mine = [r for r in batches if r["epoch"] == epoch]
        loss = sum(r["loss"] * n for r, n in zip(mine, rows)) / 1437
        acc = sum(r["accuracy"] * n for r, n in zip(mine, rows)) / 1437
        (line,) = [r for r in lines if "train_loss" in r and r.get("epoch") == epoch]
        assert line["train_loss"] == pytest.approx(loss, rel=1e-12)
        assert line["train_accuracy"] == pytest.approx(acc, rel=1e-12)


class StopAt(distbp.Callback):
    """Asks to stop at the end of an epoch, on one rank only (or on every rank)."""

    def __init__(self, epoch, rank=None):
        self.epoch, self.rank = epoch, rank

    def on_epoch_end(self, run, metrics):
        if run.epoch == self.epoch and self.rank in (None, run.rank):
            run.stop(f"stopped by StopAt at epoch {self.epoch}")


def test_a_callback_stops_the_run_with_a_final_checkpoint(serial, tmp_path):
    summary = distbp.train({"train": {"epochs": 5}}, run_dir=tmp_path / "run", callbacks=[StopAt(2)],
                           progress="none")
    assert summary["steps"] == 46 and summary["stopped"] == "stopped by StopAt at epoch 2"
    assert (tmp_path / "run" / "checkpoints" / "step-00000046.h5").exists()


def test_callback_without_hooks_and_bad_progress_are_refused(serial, tmp_path):
    with pytest.raises(TypeError, match="none of the hooks"):
        distbp.train(CONFIG, run_dir=tmp_path / "a", callbacks=[object()], progress="none")
    with pytest.raises(distbp.UserError, match="progress='quiet' is not one of"):
        distbp.train(CONFIG, run_dir=tmp_path / "b", progress="quiet")


SCRIPT = """
import sys
import distbp
sys.path.insert(0, {tests!r})
from test_callbacks import StopAt
summary = distbp.train({{"train": {{"epochs": 5}}}}, run_dir=sys.argv[1], callbacks=[StopAt(2, rank=1)],
                       progress="none")
with open(f"{{sys.argv[1]}}.result.{{distbp.rank()}}", "w") as f:  # a file each: ranks' stdout lines interleave
    f.write(" ".join(map(str, [distbp.rank(), summary["steps"], summary["params_crc32"], summary["stopped"]])))
"""


def test_one_ranks_stop_ends_every_rank_at_the_same_step(serial, tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    proc = run_distbp([tmp_path / "run"], 2, script=script)
    assert proc.returncode == 0, proc.stderr
    results = [path.read_text().split(" ", 3) for path in sorted(tmp_path.glob("run.result.*"))]
    assert len(results) == 2 and results[0][1:] == results[1][1:], results
    assert results[0][1] == "46" and results[0][3] == "stopped by StopAt at epoch 2"


def test_epoch_means_stay_exact_across_a_resume_mid_epoch(serial, tmp_path):
    distbp.train(CONFIG, run_dir=tmp_path / "straight", progress="none")
    distbp.train({**CONFIG, "train": {**CONFIG["train"], "max_steps": 30}}, run_dir=tmp_path / "resumed",
                 progress="none")  # stops 7 steps into epoch 2, with a checkpoint
    distbp.train(CONFIG, run_dir=tmp_path / "resumed", progress="none")
    means = [[(r["epoch"], r["train_loss"], r["train_accuracy"]) for r in metrics(tmp_path / run)
              if "train_loss" in r and "epoch" in r] for run in ("straight", "resumed")]
    assert means[0] == means[1] and [e for e, *_ in means[0]] == [1, 2]
