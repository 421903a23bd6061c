"""One run per run directory (a lock naming its holder), --resume never on an earlier run's checkpoints,
and checkpoints ordered by step number."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.parallel import faults
from distbp.files import rundir
from distbp.parallel.comm import SerialComm
from distbp.files.rundir import LOCK_NAME
from conftest import job_env
from test_faults import Job

SHORT = ["--set", "train.max_steps=8", "--set", "checkpoint.every_steps=4", "--set", "train.log_every=1"]
SLOW = ";".join(f"rank=0,step={s},kind=slow" for s in range(2, 6))  # 4 x 2 s: a run that lasts a while


def start(run_dir, fault: str = SLOW) -> subprocess.Popen:
    """A serial distbp train in the background; returns once it is past set-up (its first fault line)."""
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *SHORT, "--run-dir", str(run_dir)],
                            env=job_env(**{faults.ENV: fault}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:
        if "fault injection" in line:
            return proc
    raise AssertionError(f"the first run ended early: {proc.wait()} {proc.stdout.read()}")


@pytest.mark.timing
def test_second_run_on_a_busy_directory_stops_at_once_and_the_first_is_unharmed(tmp_path):
    run = tmp_path / "run"
    startup = Job(0, ["--version"]).wall  # interpreter and import time, which no lock can shorten
    first = start(run)
    second = Job(0, ["train", *SHORT, "--run-dir", str(run)])
    assert second.rc == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("distbp: error:")]
    assert len(errors) == 1, second.stderr
    assert re.search(rf"run directory {re.escape(str(run))} is in use by another distbp train \(host \S+, "
                     rf"pid {first.pid}, SLURM job none, since .*\); HINT: wait for it", errors[0]), errors[0]
    assert second.wall < 5 + startup, (second.wall, startup)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert [ckpt.load(p).attrs["step"] for p in ckpt.list_checkpoints(run / "checkpoints")] == [4, 8]
    log = (run / "train.log").read_text()
    assert log.count("rank(s), run dir") == 1 and "resumed" not in log  # nothing from the second run


def test_lock_of_a_killed_run_is_stale(tmp_path):
    run = tmp_path / "run"
    first = start(run)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert f"pid {first.pid}," in (run / LOCK_NAME).read_text()  # the dead holder's name stays in the file
    again = Job(0, ["train", *SHORT, "--run-dir", str(run)])
    assert again.rc == 0, again.stderr
    assert f"pid {first.pid}," not in (run / LOCK_NAME).read_text()


def test_resume_never_refuses_an_earlier_runs_checkpoints_unless_forced(tmp_path):
    run = tmp_path / "run"
    assert Job(0, ["train", *SHORT, "--run-dir", str(run)]).rc == 0
    old = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run / "checkpoints")}
    refused = Job(0, ["train", *SHORT, "--set", "train.max_steps=4", "--run-dir", str(run), "--resume", "never"])
    assert refused.rc == 2
    assert re.search(r"distbp: error: --resume never, but run directory \S+ holds checkpoints of an earlier run "
                     r"\(newest step-00000008.h5\) .*HINT: --resume auto to continue that run, --force to move",
                     refused.stderr), refused.stderr
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run / "checkpoints")} == old
    forced = Job(0, ["train", *SHORT, "--set", "train.max_steps=4", "--run-dir", str(run), "--resume", "never",
                     "--force"])
    assert forced.rc == 0, forced.stderr
    moved = re.search(r"--resume never --force: moved the earlier run's checkpoints, metrics.jsonl, train.log, "
                      r"config.toml to (\S+)", forced.stdout)
    assert moved, forced.stdout
    archive = run / os.path.basename(moved[1])
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(archive / "checkpoints")} == old
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [ckpt.checkpoint_name(4)]
    assert '"resume"' not in (run / "metrics.jsonl").read_text()


def test_checkpoints_are_ordered_by_step_number_beyond_eight_digits(tmp_path):
    def write(step):
        ck = ckpt.Checkpoint({"w": np.full(3, step, np.float32)}, attrs={"step": step, "epoch": 0, "step_in_epoch": 0,
                                                                   "samples_seen": 0, "world_size": 1})
        return ckpt.save(tmp_path / ckpt.checkpoint_name(step), ck)
    assert ckpt.checkpoint_name(123_456_789) == "step-123456789.h5"
    paths = [write(s) for s in (100_000_000, 7, 99_999_999, 1_000_000_000)]
    (tmp_path / "step-000000007.h5").write_bytes(paths[1].read_bytes())  # not a name distbp writes
    (tmp_path / "step-123.h5").write_bytes(paths[1].read_bytes())
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [7, 99_999_999, 100_000_000, 1_000_000_000]
    assert ckpt.latest_valid(tmp_path).attrs["step"] == 1_000_000_000
    ckpt.prune(tmp_path, 2, paths[3])
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [100_000_000, 1_000_000_000]


def test_runs_started_in_the_same_second_get_their_own_default_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261201-120000")
    names = [rundir.default_path(SerialComm()) for _ in range(3)]
    assert names == ["runs/20261201-120000", "runs/20261201-120000-2", "runs/20261201-120000-3"]
    assert all((tmp_path / n).is_dir() for n in names)  # claimed when chosen: no other process gets them


@pytest.mark.parametrize("lock", ["symlink", "hard link", "fifo"])
def test_a_lock_that_is_not_a_plain_file_of_ours_is_refused_and_its_target_untouched(tmp_path, lock):
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / LOCK_NAME
    {"symlink": lambda: path.symlink_to(victim), "hard link": lambda: os.link(victim, path),
     "fifo": lambda: os.mkfifo(path)}[lock]()
    job = Job(0, ["train", *SHORT, "--run-dir", str(run_dir)])
    assert job.rc == 2, job.stderr
    what = {"symlink": "a symbolic link", "hard link": "a hard link to another file", "fifo": "not a regular file"}
    assert f"distbp: error: run directory lock {path}" in job.stderr and what[lock] in job.stderr, job.stderr
    assert victim.read_text() == "the user's data\n"
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("ranks", [0, 2])
def test_the_config_given_as_input_is_never_overwritten(tmp_path, ranks):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.toml"
    text = "# my notes on this run\n[train]\nmax_steps = 3  # short\nlog_every = 1\n"
    config.write_text(text)
    job = Job(ranks, ["train", str(config), "--run-dir", str(run_dir), "--set", "train.max_steps=4"])
    assert job.rc == 0, job.stderr
    assert config.read_text() == text
    assert f"config {config} is this run directory's config.toml: kept as given" in job.stdout
    assert ckpt.load(run_dir / "checkpoints" / ckpt.checkpoint_name(4)).config["train"]["max_steps"] == 4
    other = tmp_path / "other"  # another run directory still gets the resolved config
    assert Job(ranks, ["train", str(config), "--run-dir", str(other)]).rc == 0
    assert "max_steps = 3" in (other / "config.toml").read_text() and "#" not in (other / "config.toml").read_text()
