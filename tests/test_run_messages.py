"""What a run tells its user: oversubscribed ranks, a schedule moved by a resume, and one epoch numbering
in the log, metrics.jsonl, ckpt inspect and plot."""
import json
import os
import re
import subprocess
import sys

import pytest

from distbp.schedules import make_schedule
from distbp.reporting.plot import read_metrics
from conftest import MPIRUN, job_env


def distbp(*args, ranks: int = 0, cwd=None, cpus=None) -> str:
    """Output of `[mpirun -n ranks] distbp ARGS`, optionally pinned to a set of CPUs; fails on an error."""
    cmd = [*([MPIRUN, "-n", str(ranks)] if ranks else []), sys.executable, "-m", "distbp", *map(str, args)]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    p = subprocess.run(cmd, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=120, preexec_fn=pin)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout + p.stderr


def test_oversubscribed_ranks_are_warned_about_once(serial, tmp_path):
    quick = ["train", "--set", "train.max_steps=3", "--resume", "never", "--progress", "none"]
    out = distbp(*quick, "--run-dir", tmp_path / "a", ranks=3, cpus={0})
    warnings = [line for line in out.splitlines() if "oversubscribed ranks" in line]
    assert len(warnings) == 1, out
    assert "3 ranks share 1 core on this node" in warnings[0] and "HINT: mpirun -n 1" in warnings[0]
    assert "oversubscribed ranks" not in distbp(*quick, "--run-dir", tmp_path / "b", ranks=2, cpus={0, 1})


def test_raising_epochs_on_resume_warns_with_both_rates_and_schedule_steps_keeps_the_horizon(serial, tmp_path):
    cosine = ["--set", "optim.schedule=cosine", "--set", "optim.min_lr=0.0001", "--progress", "none"]
    for name in ("stretched", "kept"):
        distbp("train", *cosine, "--set", "train.epochs=2", "--run-dir", tmp_path / name)  # 46 steps
    out = distbp("train", *cosine, "--set", "train.epochs=4", "--run-dir", tmp_path / "stretched")
    old = make_schedule("cosine", 0.05, total_steps=46, min_lr=1e-4)(46)
    new = make_schedule("cosine", 0.05, total_steps=92, min_lr=1e-4)(46)
    assert (f"the cosine learning-rate schedule now spans 92 steps instead of 46, so the rate at the resumed "
            f"step 46 changes from {old:.3g} to {new:.3g}") in out
    assert "HINT: --set optim.schedule_steps=46 keeps the original horizon" in out
    out = distbp("train", *cosine, "--set", "train.epochs=4", "--set", "optim.schedule_steps=46",
                 "--run-dir", tmp_path / "kept")
    assert "schedule now spans" not in out
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "kept" / "metrics.jsonl").read_text().splitlines())
           if r.get("step", 0) > 46 and "lr" in r]
    assert lrs and all(lr == pytest.approx(1e-4) for lr in lrs)  # stays at min_lr past the horizon


def test_epochs_are_counted_from_one_everywhere(serial, tmp_path):
    out = distbp("train", "--set", "train.epochs=2", "--set", "checkpoint.every_steps=30", "--progress", "lines",
                 "--set", "train.log_every=11", "--run-dir", tmp_path / "run")
    assert "eval step 23 epoch 1:" in out and "eval step 46 epoch 2:" in out
    assert re.search(r"epoch 2/2 100% step 46/46", out)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["step"], r["epoch"]) for r in records if "loss" in r} == {(11, 1), (22, 1), (33, 2), (44, 2), (46, 2)}
    final = distbp("ckpt", "inspect", tmp_path / "run" / "checkpoints" / "step-00000046.h5")
    assert "epoch: 2 (23 steps into it; stored 0-based as epoch=1)" in final
    mid = distbp("ckpt", "inspect", tmp_path / "run" / "checkpoints" / "step-00000030.h5")
    assert "epoch: 2 (7 steps into it" in mid
    m = read_metrics(tmp_path / "run")
    assert m["steps_per_epoch"] == 23 and [e for _, e, _, _ in m["eval"]] == [1, 2]
