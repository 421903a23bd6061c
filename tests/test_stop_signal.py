"""A stop signal at any moment of a run loses nothing: mid-run, before, during and after the final checkpoint."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.parallel import faults
from conftest import job_env, run_distbp

STEPS = 12
ARGS = ["--set", f"train.max_steps={STEPS}", "--set", "train.deterministic=true", "--set", "model.hidden=[16]",
        "--progress", "none"]  # the default checkpoint.every_steps = 0: the final checkpoint is the only one


def train(ranks: int, run_dir, fault: str = "", steps: int = STEPS):
    args = ["train", "--run-dir", run_dir, *ARGS, "--set", f"train.max_steps={steps}"]
    return run_distbp(args, ranks, env={faults.ENV: fault} if fault else {})


def params(run_dir, step: int = STEPS) -> dict:
    return ckpt.load(run_dir / "checkpoints" / ckpt.checkpoint_name(step)).params


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """{ranks: final parameters of an uninterrupted run}."""
    done = {}
    for ranks in (0, 2):
        run_dir = tmp_path_factory.mktemp("straight")
        assert train(ranks, run_dir).returncode == 0
        done[ranks] = params(run_dir)
    return done


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def plan(ranks: int, point: str) -> str:
    """SIGTERM on every rank at `point` (at the save: rank 0 writes it, the others wait for it)."""
    others = {"saving": "final"}.get(point, point)
    where = (lambda p: f"step={p[5:]}" if p.startswith("step=") else f"at={p}")
    return ";".join(f"rank={r},{where(point if r == 0 else others)},kind=term" for r in range(max(ranks, 1)))


@pytest.mark.parametrize("ranks", [0, 2])
@pytest.mark.parametrize("point, code", [("step=5", 75), ("final", 0), ("saving", 0), ("summary", 0)])
def test_sigterm_anywhere_leaves_a_checkpoint_that_resumes_to_the_same_parameters(tmp_path, straight, ranks,
                                                                                 point, code):
    job = train(ranks, tmp_path, plan(ranks, point))
    out = job.stdout + job.stderr
    assert job.returncode == code, out
    assert "Traceback" not in out and "BAD TERMINATION" not in out, out
    folder = tmp_path / "checkpoints"
    assert not [p for p in folder.iterdir() if ckpt.TMP_MARK in p.name], "a temp file was left"
    newest = ckpt.list_checkpoints(folder)[-1]
    ckpt.load(newest)  # sealed and valid
    if code == 0:
        assert newest.name == ckpt.checkpoint_name(STEPS)
        if point != "summary":  # the flag was seen before the summary, which says so
            assert "stop signal received after the last step" in job.stdout, job.stdout
    if code != 0:  # stopped mid-run: the stop line says how to continue, and --resume auto (the default) does
        assert f"(resumable): run the same command (same --run-dir {tmp_path}) to continue from it" in out, out
        resumed = train(ranks, tmp_path)
        assert resumed.returncode == 0, resumed.stderr
    assert_same(params(tmp_path), straight[ranks])  # bitwise (train.deterministic)


@pytest.mark.timing
def test_a_real_sigterm_during_the_final_save_completes_it(tmp_path):
    # A model whose checkpoint (about 25 MB) takes a while to write: the signal lands while its temp file exists.
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [sys.executable, "-m", "distbp", "train", "--run-dir", str(run_dir), "--set", "model.hidden=[2000, 1500]",
            "--set", "train.max_steps=3", "--progress", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env())
    caught = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not caught:
            if folder.is_dir() and any(ckpt.TMP_MARK in p.name for p in folder.iterdir()):
                proc.send_signal(signal.SIGTERM)
                caught = True
            time.sleep(0.001)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert caught, "the signal did not land during the save"
    assert proc.returncode == 0, err[-2000:]
    assert "stop signal received after the last step" in out, out[-2000:]
    assert [p.name for p in folder.iterdir()] == [ckpt.checkpoint_name(3)]
    assert ckpt.load(folder / ckpt.checkpoint_name(3)).attrs["step"] == 3
