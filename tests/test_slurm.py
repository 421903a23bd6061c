"""SLURM batch jobs on a real single-node cluster started by scripts/slurm_cluster.sh.

Needs root (the script installs Debian packages and starts munge, slurmctld and
slurmd). Without it the tests are skipped with the reason; DISTBP_REQUIRE_SLURM=1
(as in CI) turns the skip into a failure.
"""
import json
import shlex
import subprocess
import sys

import pytest

from slurm_jobs import (REPO, TRAIN_SBATCH, checkpoint_steps, cluster_lock, job_env, log_text, preempt_and_requeue,
                        read_arrays, require_root_and_apt, sbatch, unavailable, wait_done)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"

# The signal goes out once the first checkpoint exists and lands 5-60 steps later
# (measured), well before the end; epochs set high so that max_steps ends the run.
STEPS = 1500
EVERY = 50
RANKS = 2


@pytest.fixture(scope="module")
def cluster():
    """A running cluster for this module alone; stopped afterwards if this fixture started it."""
    require_root_and_apt("scripts/slurm_cluster.sh")
    with cluster_lock():
        was_running = subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode == 0
        r = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=600)
        if r.returncode:
            unavailable(f"scripts/slurm_cluster.sh start failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        yield
        if not was_running:
            subprocess.run(["bash", CLUSTER, "stop"], capture_output=True, timeout=120)


def test_srun_pmi2_gives_one_mpi_world(cluster, tmp_path):
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.rank, 'of', c.size)"
    out = tmp_path / "world.out"
    job = sbatch("-n", 2, "-o", out, "--wrap",
                 f"srun --mpi=pmi2 {shlex.quote(sys.executable)} -c {shlex.quote(code)}", cwd=tmp_path)
    info = wait_done(job, 60, out)
    assert info["JobState"] == "COMPLETED", log_text(out)
    lines = sorted(line for line in log_text(out).splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2", "rank 1 of 2"], log_text(out)


def test_train_sbatch_takes_run_dir_and_refuses_resume(cluster, tmp_path):
    out = tmp_path / "job.out"
    job = sbatch("-n", 1, "-o", out, TRAIN_SBATCH, "--run-dir", "mine", "--set", "train.max_steps=5", cwd=tmp_path,
                 env=job_env(DISTBP_RUN_DIR=str(tmp_path / "not-this")))  # the argument wins over the variable
    info = wait_done(job, 60, out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log_text(out)
    assert checkpoint_steps(tmp_path / "mine") == [5] and not (tmp_path / "not-this").exists()
    out = tmp_path / "resume.out"
    job = sbatch("-n", 1, "-o", out, TRAIN_SBATCH, "--resume", "never", cwd=tmp_path)
    info = wait_done(job, 60, out)
    assert info["ExitCode"] == "2:0" and "this script resumes by itself" in log_text(out), log_text(out)


def test_train_sbatch_runs_the_default_training_on_4_tasks(cluster, tmp_path):
    out = tmp_path / "default.out"
    job = sbatch("-n", 4, "-o", out, TRAIN_SBATCH, cwd=tmp_path)  # no arguments: `distbp train` as shipped
    info = wait_done(job, 240, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log_text(out)
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    assert max(checkpoint_steps(run_dir)) == 690  # 30 epochs of 23 steps (1437 rows, batches of 64)
    summary = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["world_size"] == 4 and summary["val_accuracy"] > 0.93, summary


def test_preempt_requeue_resume_matches_uninterrupted_run(cluster, tmp_path):
    args = ["digits", "--set", f"train.max_steps={STEPS}", "--set", "train.epochs=1000",
            "--set", f"checkpoint.every_steps={EVERY}"]
    # The uninterrupted reference runs alongside, at the same rank count.
    ref_dir, ref_out = tmp_path / "ref", tmp_path / "ref.out"
    ref = sbatch("-n", RANKS, "-o", ref_out, TRAIN_SBATCH, *args, cwd=tmp_path,
                 env=job_env(DISTBP_RUN_DIR=str(ref_dir)))
    out, run_dir = tmp_path / "preempted.out", tmp_path / "preempted"  # the requeue re-runs --run-dir preempted
    job = sbatch("-n", RANKS, "-o", out, TRAIN_SBATCH, *args, "--run-dir", run_dir, cwd=tmp_path)

    # Preempt: SIGUSR1 to the batch shell once the first checkpoint exists.
    stop_step = preempt_and_requeue(job, run_dir, out, 90)
    assert EVERY < stop_step < STEPS, f"no checkpoint at the signal ({checkpoint_steps(run_dir)})"

    info = wait_done(job, 120, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log_text(out)
    ref_info = wait_done(ref, 120, ref_out)
    assert (ref_info["JobState"], ref_info["ExitCode"]) == ("COMPLETED", "0:0"), log_text(ref_out)

    # Resumed once, from the checkpoint written at the signal: no logged step was lost.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [i for i, line in enumerate(lines) if "resume" in line]
    assert len(resumes) == 1, resumes
    logged_before = [line["step"] for line in lines[:resumes[0]] if "loss" in line]
    assert max(logged_before, default=0) <= stop_step

    # The interrupted run ends bitwise identical to the uninterrupted one.
    assert max(checkpoint_steps(run_dir)) == max(checkpoint_steps(ref_dir)) == STEPS
    final = f"checkpoints/step-{STEPS:08d}.h5"
    got, want = read_arrays(run_dir / final), read_arrays(ref_dir / final)
    assert got.keys() == want.keys() and got
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
