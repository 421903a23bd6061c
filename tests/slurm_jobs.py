"""Helpers for tests that submit SLURM jobs: the cluster lock, submission, polling, checkpoints."""
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@contextlib.contextmanager
def cluster_lock():
    """One test cluster at a time on this machine: tests in other checkouts or shells wait their turn
    instead of cancelling each other's jobs or stopping the cluster under them."""
    state_dir = os.environ.get("DISTBP_SLURM_DIR", "/var/tmp/distbp-slurm")
    with open(f"{state_dir.rstrip('/')}.tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def require_root_and_apt(script):
    """Skip (or fail under DISTBP_REQUIRE_SLURM=1) unless this test can install and start a cluster."""
    if os.geteuid() != 0:
        unavailable(f"SLURM tests need root to install and start a cluster ({script})")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        unavailable("SLURM is not installed and apt-get is not available to install it")


def unavailable(reason):
    """Skip, or fail when the environment says SLURM must be tested."""
    if os.environ.get("DISTBP_REQUIRE_SLURM") == "1":
        pytest.fail(f"DISTBP_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def job_env(**extra):
    """The submitting environment: this Python first on PATH, distbp from this checkout."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def sbatch(*args, cwd, env=None):
    """Submit a job and return its id."""
    r = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or job_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_info(job):
    """The fields of `scontrol show job` as a dict (values without spaces only)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_for(predicate, timeout, what):
    """Poll predicate() until it returns a true value; fail after timeout seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_done(job, timeout, log):
    """Wait until the job ends; return its final scontrol fields."""
    def ended():
        info = job_info(job)
        return info if info["JobState"] in FINAL else None
    return wait_for(ended, timeout, f"job {job} to finish; log:\n{log_text(log)}")


def log_text(path):
    """A job's log, or a note that it is missing."""
    return Path(path).read_text() if Path(path).exists() else f"({path} missing)"


def start_requeued_now(job):
    """Start a requeued job now instead of after the ~2 min credential hold.

    The hold exists because the node rejects the job ("Job credential revoked") or
    the old step's slurmstepd, still exiting, tears down the new step of the same
    id, if it restarts at once: wait until the job's slurmstepd processes are gone
    (single-node cluster: they run here) and the revocation second has passed.
    """
    def steps_gone():
        ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
        return not any(line.split(None, 1)[0][0] != "Z" and f"slurmstepd: [{job}." in line
                       for line in ps.splitlines() if line.strip())
    wait_for(steps_gone, 30, f"the old steps of job {job} to exit")
    time.sleep(1.1)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)


def preempt_and_requeue(job, run_dir, log, wait_checkpoint):
    """Preempt a training job as SLURM would: SIGUSR1 to its batch shell once a first checkpoint is in
    run_dir (waiting up to wait_checkpoint s), wait until it is requeued, start it again now; return
    the step of the newest checkpoint at that point (the one written at the signal)."""
    wait_for(lambda: checkpoint_steps(run_dir), wait_checkpoint, f"a first checkpoint in {run_dir}; log:\n{log_text(log)}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)

    def requeued():
        info = job_info(job)
        assert info["JobState"] not in FINAL, f"job ended before it was requeued:\n{log_text(log)}"
        return info["Restarts"] == "1" and info["JobState"] == "PENDING"
    wait_for(requeued, 60, f"job {job} to be requeued; log:\n{log_text(log)}")
    stop_step = max(checkpoint_steps(run_dir))
    start_requeued_now(job)
    return stop_step


def checkpoint_steps(run_dir):
    """Steps of the checkpoint files in a run directory, ascending."""
    return sorted(int(p.stem.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("step-*.h5"))


def read_arrays(path):
    """Every dataset of a checkpoint's params and optimizer groups, by name."""
    arrays = {}
    with h5py.File(path, "r") as f:
        for group in ("params", "optimizer"):
            if group in f:
                f[group].visititems(lambda name, obj: arrays.__setitem__(f"{group}/{name}", obj[()])
                                    if isinstance(obj, h5py.Dataset) else None)
    return arrays
