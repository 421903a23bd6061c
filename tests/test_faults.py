"""Failures during training: one rank fails or stalls, non-finite values, disk faults while saving."""
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.parallel import faults
from distbp.errors import UserError
from conftest import run_distbp

DIGITS_FAST = ["--set", "train.epochs=3", "--set", "train.log_every=1000"]


class Job:
    """A distbp job run to completion, with the time from the first fault line to its exit."""

    def __init__(self, ranks: int, args: list[str], fault: str = "", cwd=None, timeout: float = 55):
        self.fault_at = None

        def stamp(line):  # the first fault line's time, as it arrives
            if self.fault_at is None and "fault injection" in line:
                self.fault_at = time.monotonic()
        start = time.monotonic()
        proc = run_distbp(args, ranks, cwd=cwd, timeout=timeout, env={faults.ENV: fault} if fault else {},
                          on_stderr_line=stamp)
        self.wall = time.monotonic() - start
        self.to_exit = time.monotonic() - self.fault_at if self.fault_at else None
        self.rc, self.stderr, self.stdout = proc.returncode, proc.stderr, proc.stdout
        print(f"\n[{' '.join(args[:1])} {fault or ''}] rc={self.rc} wall={self.wall:.1f}s "
              f"fault->exit={self.to_exit and round(self.to_exit, 1)}s")


def test_parse_accepts_the_documented_syntax():
    assert faults.parse("rank=1,step=5,kind=raise") == [faults.Fault(1, 5, "raise")]
    assert faults.parse(" rank=0,step=2,kind=nan ; rank=3,step=0,kind=stop;") == [
        faults.Fault(0, 2, "nan"), faults.Fault(3, 0, "stop")]
    assert faults.parse("") == []


@pytest.mark.parametrize("bad", ["rank=1,step=5", "rank=x,step=5,kind=raise", "rank=1,step=5,kind=melt",
                                 "rank=1,step=5,kind=raise,extra=1", "garbage"])
def test_parse_rejects_malformed_plans(bad):
    with pytest.raises(UserError, match="rank=1,step=5,kind=raise"):
        faults.parse(bad)


def test_inject_is_inert_unless_planned(monkeypatch):
    grads = np.ones(4, np.float32)
    monkeypatch.setattr(faults, "_PLAN", None)
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.inject(0, 0, grads)
    monkeypatch.setattr(faults, "_PLAN", [faults.Fault(1, 5, "nan"), faults.Fault(0, 3, "raise")])
    faults.inject(0, 5, grads)
    faults.inject(1, 4, grads)
    assert np.isfinite(grads).all()
    faults.inject(1, 5, grads)
    assert np.isnan(grads[0])
    with pytest.raises(faults.InjectedFault, match="rank 0 at step 3"):
        faults.inject(0, 3, grads)


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["raise", "exit", "kill", "oom"])
def test_one_failing_rank_ends_the_job_fast(tmp_path, kind):
    job = Job(4, ["train", *DIGITS_FAST, "--run-dir", str(tmp_path / "run")], f"rank=1,step=5,kind={kind}")
    assert job.rc != 0
    assert job.to_exit is not None and job.to_exit < 10, job.stderr
    if kind == "kill":  # the launcher names the host and a PID (not always the killed one's) of the table
        pid = re.search(r"PID (\d+) RUNNING AT (\S+)", job.stdout)
        assert pid, job.stdout
        assert re.search(rf"\b[0-3]={pid[1]}@{re.escape(pid[2])}\b", job.stdout), job.stdout
    else:
        named = [line for line in job.stderr.splitlines() if line.startswith("distbp: rank 1 on ")]
        assert len(named) == 1, job.stderr
        assert {"exit": "exited with code 1", "raise": "InjectedFault", "oom": "MemoryError"}[kind] in named[0]


@pytest.mark.timing
def test_frozen_rank_is_named_by_the_stall_watchdog(tmp_path):
    job = Job(4, ["train", *DIGITS_FAST, "--set", "train.stall_timeout=5", "--run-dir", str(tmp_path / "run")],
              "rank=2,step=5,kind=stop")
    assert job.rc != 0
    stall = [line for line in job.stderr.splitlines() if line.startswith("distbp: stall:")]
    assert len(stall) == 1, job.stderr
    host = re.search(r"rank\(s\) 2 on (\S+) did not arrive at the collective of step 5", stall[0])
    assert host, stall[0]
    assert f"ranks 0, 1, 3 on {host[1]} waited" in stall[0]
    assert 5 <= job.to_exit < 15


@pytest.mark.timing
def test_stall_watchdog_tolerates_a_late_rank(tmp_path):
    job = Job(2, ["train", *DIGITS_FAST, "--set", "train.stall_timeout=5", "--set", "train.max_steps=12",
                  "--run-dir", str(tmp_path / "run")], "rank=1,step=3,kind=slow;rank=0,step=8,kind=slow")
    assert job.rc == 0, job.stderr
    assert "stall" not in job.stderr


def run_with_checkpoints(tmp_path, ranks, fault, *sets, steps=10):
    """A digits run of `steps` steps with a checkpoint every 2 steps and one injected fault."""
    run = tmp_path / "run"
    args = ["train", "--set", f"train.max_steps={steps}", "--set", "checkpoint.every_steps=2",
            "--set", "checkpoint.keep=10", *[a for s in sets for a in ("--set", s)], "--run-dir", str(run)]
    return Job(ranks, args, fault), run / "checkpoints"


def assert_intact(folder: Path, *newest_steps: int, stale_ok: bool = False):
    """Every checkpoint in folder loads and verifies, the newest is at one of newest_steps; no temp files."""
    paths = ckpt.list_checkpoints(folder)
    assert paths and paths[-1].name in [ckpt.checkpoint_name(s) for s in newest_steps], paths
    for path in paths:
        ck = ckpt.load(path)
        assert all(np.isfinite(a).all() for a in ck.params.values())
    assert ck.attrs["step"] in newest_steps
    assert stale_ok or not [p for p in folder.iterdir() if ckpt.TMP_MARK in p.name]


def test_nonfinite_gradient_aborts_and_keeps_the_last_checkpoint(tmp_path):
    job, folder = run_with_checkpoints(tmp_path, 2, "rank=1,step=5,kind=nan")
    assert job.rc == 3, job.stderr
    errors = [line for line in job.stderr.splitlines() if line.startswith("distbp: error:")]
    assert len(errors) == 1, job.stderr
    assert re.search(r"non-finite gradient of 0\.\S+W at step 5", errors[0]), errors[0]
    assert_intact(folder, 4)


def test_nonfinite_gradient_skip_policy_skips_that_step(tmp_path):
    job, folder = run_with_checkpoints(tmp_path, 2, "rank=1,step=5,kind=nan", "train.nonfinite=skip",
                                       "train.log_every=1")
    assert job.rc == 0, job.stderr
    assert re.search(r"WARNING: non-finite gradient of 0\.\S+W at step 5 .*step skipped", job.stdout)
    assert_intact(folder, 10)
    skipped = [line for line in (folder.parent / "metrics.jsonl").read_text().splitlines() if "skipped" in line]
    assert len(skipped) == 1 and '"step": 6' in skipped[0]


def test_disk_full_while_saving_warns_then_fails_the_final_save(tmp_path):
    # a 1.2 MB checkpoint: from step 5 on, rank 0's files may not grow past 1 MiB (RLIMIT_FSIZE)
    job, folder = run_with_checkpoints(tmp_path, 2, "rank=0,step=5,kind=diskfull", "model.hidden=[512, 512]")
    assert job.rc != 0
    warnings = re.findall(r"WARNING: a checkpoint could not be written \(.*File too large", job.stdout)
    assert len(warnings) in (2, 3), job.stdout  # the saves at steps 6 and 8 (and 4 if still sealing)
    assert re.search(r"distbp: error: checkpoint \S+step-00000010.h5 could not be written .*File too large.*"
                     r"previous checkpoint is intact", job.stderr), job.stderr
    assert_intact(folder, 2, 4)  # step 4's may still be sealing in the background when the fault strikes


def test_lost_write_permission_while_saving_keeps_the_previous_checkpoint(tmp_path):
    if os.geteuid() == 0:  # root ignores file modes: from step 5 rank 0 acts as an unprivileged uid
        job, folder = run_with_checkpoints(tmp_path, 2, "rank=0,step=5,kind=readonly")
    else:  # resume a 4-step run with its checkpoint folder made read-only
        first, folder = run_with_checkpoints(tmp_path, 2, "", steps=4)
        assert first.rc == 0, first.stderr
        folder.chmod(0o555)
        job, _ = run_with_checkpoints(tmp_path, 2, "")
        folder.chmod(0o755)
    assert job.rc != 0
    assert re.search(r"WARNING: a checkpoint could not be written \(.*Permission denied", job.stdout), job.stdout
    assert re.search(r"step-00000010.h5 could not be written .*Permission denied", job.stderr), job.stderr
    # step 4's may still be sealing when the fault strikes; its temp file, no longer deletable, is
    # removed when the run next starts
    assert_intact(folder, 2, 4, stale_ok=True)


@pytest.mark.timing
@pytest.mark.mpi(min_size=2)
def test_watchdog_answers_queries_and_stays_quiet_on_late_ranks(comm):
    from distbp.parallel.watchdog import Watchdog
    step = [7]
    dog = Watchdog(comm, 4.0, lambda: step[0]).start()
    watched = dog.watched()
    assert watched.rank == comm.rank and watched.size == comm.size
    buf = np.ones(3)
    for _ in range(3):  # rank 0 arrives 1 s late: below the 4 s timeout
        if comm.rank == 0:
            time.sleep(1.0)
        watched.allreduce_sum(buf)
        assert dog.since is None
    if comm.rank == 0:  # ask every other rank, as the watchdog does on a timeout
        states, gone = dog._query()
        assert sorted(states) == list(range(1, comm.size)) and not gone
        assert all(state[0] == 7 and state[1] == 1 for state in states.values()), states  # waiting at step 7
    watched.barrier()
    dog.stop()
    np.testing.assert_array_equal(buf, comm.size ** 3)
