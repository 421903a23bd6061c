"""slurm/train.sbatch's arguments without a cluster: a stand-in srun runs the ranks' command on one rank.

The real preempt-requeue-resume cycle is in test_slurm.py (it needs root and a one-node cluster)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import job_env

TRAIN_SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


@pytest.fixture
def batch(serial, tmp_path):
    """Run train.sbatch as SLURM would start job 77 from tmp_path (srun: its command, one rank)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # drops --mpi=... --kill-on-bad-exit=1
    (bin_dir / "srun").chmod(0o755)

    def run(*args, restart=0, **env):
        environ = job_env(SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_RESTART_COUNT=str(restart),
                          DISTBP_PYTHON=sys.executable, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        return subprocess.run(["bash", str(TRAIN_SBATCH), *map(str, args)], cwd=tmp_path, env=environ,
                              capture_output=True, text=True, timeout=120)
    return run


def test_run_dir_argument_names_the_run_dir_and_a_rerun_resumes_there(batch, tmp_path):
    p = batch("--run-dir", "mine", "--set", "train.max_steps=3", DISTBP_RUN_DIR=str(tmp_path / "not-this"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run dir mine" in p.stdout and "--resume auto --run-dir mine" in p.stdout
    assert sorted(os.listdir(tmp_path / "mine" / "checkpoints")) == ["step-00000003.h5"]
    assert not (tmp_path / "not-this").exists()  # the argument wins over DISTBP_RUN_DIR
    again = batch("--set", "train.max_steps=5", "--run-dir=mine", restart=1)  # the other spelling, requeued
    assert again.returncode == 0 and "resumed from" in again.stdout and "at step 3" in again.stdout, again.stdout


def test_without_the_argument_distbp_run_dir_then_the_job_id(batch, tmp_path):
    assert batch("--set", "train.max_steps=2", DISTBP_RUN_DIR=str(tmp_path / "env")).returncode == 0
    assert (tmp_path / "env" / "checkpoints" / "step-00000002.h5").is_file()
    assert batch("--set", "train.max_steps=2").returncode == 0
    assert (tmp_path / "runs" / "slurm-77" / "checkpoints" / "step-00000002.h5").is_file()


@pytest.mark.parametrize("args, message", [(["--resume", "never"], "this script resumes by itself"),
                                           (["--run-dir"], "--run-dir needs a directory")])
def test_bad_arguments_exit_2_with_the_reason(batch, args, message):
    p = batch(*args)
    assert p.returncode == 2 and message in p.stdout, p.stdout + p.stderr
