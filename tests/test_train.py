"""distbp train end to end: identical ranks, n-rank vs 1-rank equivalence, exact global metrics,
one failing rank, the default digits run, metrics.jsonl and config.toml, and `distbp data`."""
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distbp import cli
from distbp.training.loop import Trainer, run
from distbp.files.checkpoint import checkpoint_name, load
from distbp.parallel.comm import SerialComm
from distbp.datasets.normalize import Normalizer
from distbp.config import load_config
from distbp.datasets.dataset import Dataset, synthetic, write_dataset
from distbp.inference.evaluate import evaluate
from distbp.inference.builders import build_model
from conftest import metrics, run_distbp


@pytest.fixture
def launch(serial):
    """Run `[mpirun -n N] python -m distbp ARGS` (serial sessions only); returns the CompletedProcess."""
    def run(args, n=None, cwd=None, env=None, timeout=55, script=None):
        return run_distbp(args, n or 0, cwd=cwd, env=env, timeout=timeout, script=script)
    return run


def synthetic_file(path, rows=250, features=8, classes=3, val=50, seed=0) -> Path:
    """A small learnable dataset with `val` validation rows."""
    x, y = synthetic(rows, features, classes, seed)
    return write_dataset(path, {"train": (x[val:], y[val:]), "val": (x[:val], y[:val])}, num_classes=classes)


def by_name(arrays: dict) -> np.ndarray:
    """Named arrays as one vector, in name order."""
    return np.concatenate([arrays[k].ravel() for k in sorted(arrays)])


def final_params(run_dir, step) -> tuple[np.ndarray, dict]:
    """(all parameters as one vector in name order, attributes) of the checkpoint at `step`."""
    ck = load(Path(run_dir) / "checkpoints" / checkpoint_name(step))
    return by_name(ck.params), ck.attrs


def summary_of(proc, run_dir) -> dict:
    """The summary line of a finished run (fails with the run's output otherwise)."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = metrics(run_dir)[-1]
    assert last.get("summary") is True
    return last


# --- invariant 2 and 3: every rank ends with the same parameters -------------------------------


@pytest.mark.mpi(min_size=2)
def test_parameters_bitwise_identical_on_every_rank(comm, make_dataset, shared_tmp, monkeypatch):
    path = make_dataset(train=70, val=13, features=6, classes=3)  # batch 16 over 3 ranks: 6/5/5
    cfg = load_config(None, [f'data.path="{path}"', "train.batch_size=16", "train.max_steps=9",
                             "model.hidden=[8, 8]", "model.dropout=0.25", 'optim.name="adam"'])
    kept = {}
    save = Trainer.save

    def keep_final(self, final: bool):
        if final:  # every rank calls it, rank 0 alone writes
            kept["params"] = by_name(self.model.views(self.model.params))
            kept["state"] = np.concatenate([self.model.params, *self.opt.state_arrays().values()])
        return save(self, final)

    monkeypatch.setattr(Trainer, "save", keep_final)
    assert run(cfg, comm, shared_tmp / "run", resume="never")["exit_code"] == 0
    states = comm.gather_obj(kept["state"])
    problems = None
    if comm.is_root:
        problems = [f"rank {r}" for r, s in enumerate(states) if s.tobytes() != states[0].tobytes()]
        written, attrs = final_params(shared_tmp / "run", 9)
        if written.tobytes() != kept["params"].tobytes() or attrs["world_size"] != comm.size:
            problems.append("checkpoint")
    assert comm.bcast_obj(problems) == []


# --- invariant 2: 1, 2, 3 and 4 ranks follow the same trajectory -------------------------------


@pytest.mark.parametrize("dtype, rtol, extra", [
    ("float32", 1e-5, ['optim.name="sgd"', "train.drop_last=true"]),
    ("float64", 1e-10, ['optim.name="adam"', "train.drop_last=false"]),  # partial batches of 8 rows
])
def test_same_parameters_on_1_2_3_and_4_ranks(launch, tmp_path, dtype, rtol, extra):
    data = synthetic_file(tmp_path / "data.h5")  # 200 train rows: 3 or 4 steps per epoch
    steps = 10
    sets = [f'data.path="{data}"', "train.batch_size=64", f"train.max_steps={steps}", "model.hidden=[16]",
            "model.dropout=0.2", f'train.dtype="{dtype}"', *extra]
    params = {}
    for n in (1, 2, 3, 4):  # 64 rows over 3 ranks: 22/21/21
        run_dir = tmp_path / f"run{n}"
        proc = launch(["train", *[a for s in sets for a in ("--set", s)], "--run-dir", run_dir], n=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        params[n], attrs = final_params(run_dir, steps)
        assert (attrs["world_size"], attrs["step"], params[n].dtype) == (n, steps, np.dtype(dtype))
    with Dataset(data) as ds:
        model = build_model(load_config(None, sets), ds)
        init = by_name(model.views(model.params))
    assert np.abs(params[1] - init).max() > 100 * rtol * np.abs(init).max()  # training moved them
    scale = np.abs(params[1]).max()
    for n in (2, 3, 4):
        np.testing.assert_allclose(params[n], params[1], rtol=rtol, atol=rtol * scale, err_msg=f"{n} ranks")


# --- exact global metrics on splits that do not divide by the rank count -----------------------


def reference_metrics(model, split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the whole split in one pass, in float64."""
    x, y = split.read(np.arange(split.n), model.params.dtype)
    out = model.eval().forward(x).astype(np.float64)  # (N, C)
    out -= out.max(axis=1, keepdims=True)
    log_p = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
    model.train()
    return -log_p[np.arange(split.n), y].mean(), (out.argmax(axis=1) == y).mean()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("val_rows", [13, 3])  # 13: 7/6 or 4/3/3/3; 3: a rank with no rows at 4
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("float64", 1e-13)])
def test_evaluate_is_exact_over_uneven_slices(comm, make_dataset, val_rows, dtype, rtol):
    path = make_dataset(train=40, val=val_rows, features=6, classes=3)
    cfg = load_config(None, [f'data.path="{path}"', "model.hidden=[8]", "model.dropout=0.5",
                             f'train.dtype="{dtype}"', "train.batch_size=8"])
    with Dataset(path) as ds:
        model, split = build_model(cfg, ds), ds.split("val")
        loss = ds.task.loss()
        world = evaluate(model, loss, split, comm, ds.task, Normalizer())
        alone = evaluate(model, loss, split, SerialComm(), ds.task, Normalizer())
        ref_loss, ref_acc = reference_metrics(model, split)
    assert world["val_accuracy"] == alone["val_accuracy"] == ref_acc  # counts, so exactly equal
    assert world["val_loss"] == pytest.approx(alone["val_loss"], rel=rtol)
    assert world["val_loss"] == pytest.approx(ref_loss, rel=rtol)


def test_distbp_eval_on_3_ranks_equals_1_rank(launch, tmp_path):
    data = synthetic_file(tmp_path / "data.h5", rows=250, val=50)  # 50 val rows: 17/17/16
    proc = launch(["train", "--set", f'data.path="{data}"', "--set", "train.max_steps=6",
                   "--run-dir", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / checkpoint_name(6)
    results = {}
    for n in (1, 3):
        proc = launch(["eval", ckpt], n=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (line,) = [s for s in proc.stdout.splitlines() if s.startswith("split=")]  # printed once
        results[n] = dict(kv.split("=", 1) for kv in line.split())
    assert results[1]["rows"] == results[3]["rows"] == "50"
    assert results[1]["accuracy"] == results[3]["accuracy"]
    assert float(results[3]["loss"]) == pytest.approx(float(results[1]["loss"]), rel=1e-5)
    summary = metrics(tmp_path / "run")[-1]  # the run's own final evaluation of the same parameters
    assert float(results[1]["loss"]) == pytest.approx(summary["val_loss"], rel=1e-5)


# --- invariant 4: one failing rank ends the whole job, fast ------------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("kind, what", [("raise", "failed: InjectedFault: injected fault on rank 1 at step 5"),
                                        ("exit", "exited with code 1")])
def test_one_failing_rank_ends_mpirun_of_4_within_seconds(launch, tmp_path, kind, what):
    data = synthetic_file(tmp_path / "data.h5")
    start = time.monotonic()
    proc = launch(["train", "--set", f'data.path="{data}"', "--set", "train.epochs=10000", "--set",
                   "train.batch_size=16", "--run-dir", tmp_path / "run"], n=4,
                  env={"DISTBP_FAULT": f"rank=1,step=5,kind={kind}"}, timeout=45)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("distbp: rank")]
    assert len(ranks) == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf"distbp: rank 1 on \S+ {re.escape(what)}", ranks[0]), ranks[0]
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*.h5"))  # it never got to the end


FAILING_READ = """
import os, sys
from distbp import cli
from distbp.datasets import dataset as data
from distbp.parallel.comm import world

read, calls = data.Split.read, []

def read_failing_on_rank_1(split, idx, dtype):
    calls.append(idx)
    if world().rank == 1 and len(calls) == int(os.environ["FAIL_AT_READ"]):
        raise data.DataError("dataset D, split 'train': cannot read rows (test); HINT: re-copy it")
    return read(split, idx, dtype)

data.Split.read = read_failing_on_rank_1
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timing
@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_a_read_error_on_one_rank_ends_the_job(launch, tmp_path, command):
    (tmp_path / "job.py").write_text(FAILING_READ)
    data = synthetic_file(tmp_path / "data.h5")
    if command == "train":
        args, fail_at = ["train", "--set", f'data.path="{data}"', "--set", "train.epochs=10000", "--set",
                         "train.stall_timeout=0", "--run-dir", tmp_path / "run"], 4  # without the watchdog
    else:  # a checkpoint first, then the command reads its rows: rank 1 fails at its first read
        assert launch(["train", "--set", f'data.path="{data}"', "--set", "train.max_steps=2",
                       "--run-dir", tmp_path / "run"]).returncode == 0
        ck = tmp_path / "run" / "checkpoints" / checkpoint_name(2)
        args = ["eval", ck] if command == "eval" else ["predict", ck, data, tmp_path / "p.h5", "--split", "val"]
        fail_at = 1
    start = time.monotonic()
    proc = launch(args, n=3, script=tmp_path / "job.py", env={"FAIL_AT_READ": str(fail_at)}, timeout=45)
    assert proc.returncode == 2 and time.monotonic() - start < 30, proc.stderr[-3000:]
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("distbp: rank")]
    assert len(ranks) == 1 and re.fullmatch(r"distbp: rank 1 on \S+ failed: .*cannot read rows \(test\).*",
                                            ranks[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # the message names the file and the fix


# --- the default run: `distbp train` on the shipped digits -------------------------------------


def default_run_summary(proc, cwd) -> dict:
    """The summary of the one run a `distbp train` without arguments made under cwd/runs/."""
    run_dirs = list((cwd / "runs").iterdir())  # runs/<timestamp>, the same on every rank
    assert len(run_dirs) == 1, run_dirs
    # progress lines off a terminal: 690 steps of 23 per epoch (the last batch of 29 rows)
    assert re.search(r"^epoch 3/30 +7% step 50/690 loss=\S+ lr=0.05 [\d,]+ samples/s ETA \d\d:\d\d$", proc.stdout, re.M)
    return summary_of(proc, run_dirs[0])


def test_default_run_reaches_96_percent(launch, tmp_path):
    summary = default_run_summary(launch(["train"], cwd=tmp_path), tmp_path)
    assert summary["world_size"] == 1 and summary["epochs"] == 30
    assert summary["val_accuracy"] >= 0.96


def test_default_run_on_4_ranks_reaches_96_percent(launch, tmp_path):
    summary = default_run_summary(launch(["train"], n=4, cwd=tmp_path), tmp_path)
    assert summary["world_size"] == 4 and summary["epochs"] == 30
    assert summary["val_accuracy"] >= 0.96


# --- user errors: one message from rank 0, exit 2, no traceback --------------------------------


@pytest.mark.parametrize("args, message", [
    (["--set", 'data.path="no/such/file.h5"'], "dataset no/such/file.h5: no such file"),
    (["--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["--set", "train.epochs=abc"], "train.epochs='abc' has the wrong type: expected int"),
    (["--set", "model.hidden=64"], "model.hidden=64 must be a list"),
    (["no-such-config.toml"], "cannot read config file no-such-config.toml"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_user_error_is_one_message_under_mpirun_of_4(launch, tmp_path, args, message):
    proc = launch(["train", *args, "--run-dir", tmp_path / "run"], n=4, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.count(message) == 1 and output.count("error:") == 1, output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


# --- metrics.jsonl and config.toml -------------------------------------------------------------


def test_metrics_file_and_config_round_trip(serial, make_dataset, tmp_path, monkeypatch, capsys):
    path = make_dataset(train=40, val=12, features=6, classes=3)  # batch 8: 5 steps per epoch
    sets = [f'data.path="{path}"', "train.batch_size=8", "train.max_steps=12", "train.log_every=4",
            "train.eval_every=3", "model.hidden=[8]"]
    cfg = load_config(None, sets)
    assert run(cfg, SerialComm(), tmp_path / "a", resume="never")["exit_code"] == 0
    records = metrics(tmp_path / "a")
    trains = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r and "summary" not in r]
    assert [set(r) for r in trains] == [{"step", "epoch", "loss", "accuracy", "lr", "grad_norm", "samples_per_s"}] * 3
    assert all(0 <= r["accuracy"] <= 1 and (r["accuracy"] * 8).is_integer() for r in trains)  # of the batch of 8
    assert [(r["step"], r["epoch"], r["lr"]) for r in trains] == [(4, 1, 0.05), (8, 2, 0.05), (12, 3, 0.05)]
    assert trains[-1]["samples_per_s"] > 0 and trains[0]["samples_per_s"] > 0  # warm-up steps included until 10
    assert [(r["step"], r["epoch"]) for r in evals] == [(3, 1), (5, 1), (6, 2), (9, 2), (10, 2), (12, 3)]
    assert all({"val_loss", "val_accuracy"} <= set(r) for r in evals)
    summary = records[-1]
    assert records.count(summary) == 1 and summary["summary"] is True
    assert {"steps", "epochs", "samples_per_s", "val_loss", "val_accuracy", "world_size", "wall_time_s"} <= set(summary)
    assert (summary["steps"], summary["epochs"], summary["world_size"]) == (12, 12 / 5, 1)
    assert (summary["val_loss"], summary["val_accuracy"]) == (evals[-1]["val_loss"], evals[-1]["val_accuracy"])
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] > 0

    assert load_config(str(tmp_path / "a" / "config.toml")) == cfg
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs its abort hook
    assert cli.main(["train", str(tmp_path / "a" / "config.toml"), "--run-dir", str(tmp_path / "b")]) == 0
    a, _ = final_params(tmp_path / "a", 12)
    b, _ = final_params(tmp_path / "b", 12)
    np.testing.assert_array_equal(a, b)  # the written config reproduces the run


def test_adamw_alone_trains_with_its_own_weight_decay(serial, make_dataset, tmp_path):
    path = make_dataset(train=40, val=12, features=6, classes=3)
    base = [f'data.path="{path}"', "train.batch_size=8", "train.max_steps=6", "model.hidden=[8]",
            "optim.name=adamw", "optim.lr=0.1"]
    finals = {}
    for name, extra in [("unset", []), ("0.01", ["optim.weight_decay=0.01"]), ("0", ["optim.weight_decay=0"])]:
        assert run(load_config(None, base + extra), SerialComm(), tmp_path / name, resume="never")["exit_code"] == 0
        finals[name], _ = final_params(tmp_path / name, 6)
    assert load_config(str(tmp_path / "unset" / "config.toml")).optim.weight_decay == 0.01  # stored resolved
    np.testing.assert_array_equal(finals["unset"], finals["0.01"])
    assert not np.array_equal(finals["unset"], finals["0"])


# --- distbp data -------------------------------------------------------------------------------


def test_data_commands(serial, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    assert cli.main(["data", "digits", str(tmp_path / "d.h5")]) == 0
    with Dataset(tmp_path / "d.h5") as ds:
        assert (ds.task.name, ds.num_classes, ds.input_shape, ds.split("train").n, ds.split("val").n) == \
            ("classification", 10, (64,), 1437, 360)
    out = tmp_path / "s.h5"
    assert cli.main(["data", "synthetic", str(out), "--rows", "100", "--features", "5", "--classes", "4"]) == 0
    with Dataset(out) as ds:
        assert (ds.num_classes, ds.input_shape, ds.split("train").n, ds.split("val").n) == (4, (5,), 80, 20)
        assert set(np.unique(ds.split("train").read(np.arange(80))[1])) == {0, 1, 2, 3}
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task classification" in text and re.search(r"train\s+x \(80, 5\) float32\s+y \(80,\)", text), text
    assert re.search(r"val\s+x \(20, 5\) float32", text), text
    assert cli.main(["data", "inspect", str(tmp_path / "missing.h5")]) == 2
    assert capsys.readouterr().err.count("no such file") == 1


def test_data_commands_print_and_write_once_under_mpirun_of_4(launch, tmp_path):
    proc = launch(["data", "digits", "d.h5"], n=4, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "wrote d.h5\n", "")
    proc = launch(["data", "inspect", "d.h5"], n=4, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.count("task classification") == 1, proc.stdout + proc.stderr
