"""Shared fixtures: the world communicator, a tmp folder shared by all ranks, small datasets."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from distbp.parallel.comm import SerialComm, world
from distbp.datasets.dataset import write_dataset
from distbp.nn import check_gradients
from distbp.nn.gradcheck import numeric_grad, rel_err  # noqa: F401 (the tests' finite differences)


MPIRUN = str(Path(sys.executable).parent / "mpirun")  # the launcher of this venv's MPI
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "MPI_", "MPIR_", "OMPI_", "HYDRA_", "SLURM_")


def job_env(**extra) -> dict:
    """Environment for a job a test launches: none of this session's launcher variables or
    DISTBP_FAULT, one BLAS thread per rank (as scripts/test.sh: the cores are shared), plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k != "DISTBP_FAULT"}
    return {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **extra}


def run_distbp(args, ranks: int = 0, *, cwd=None, env=None, timeout: float = 55, script=None,
               on_stderr_line=None) -> subprocess.CompletedProcess:
    """`[mpirun -n ranks] python (-m distbp | script) ARGS` to its end, in job_env(**env); a job still
    running after timeout seconds is killed (mpirun and every rank) and fails the test."""
    prefix = [MPIRUN, "-n", str(ranks)] if ranks else []
    program = [str(script)] if script else ["-m", "distbp"]
    argv = [*prefix, sys.executable, *program, *map(str, args)]
    timed_out = threading.Event()
    with subprocess.Popen(argv, cwd=cwd, env=job_env(**(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        def kill():
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)
        timer, out = threading.Timer(timeout, kill), []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        timer.start()
        reader.start()
        err = []
        for line in proc.stderr:  # as lines arrive, so on_stderr_line can time them
            if on_stderr_line:
                on_stderr_line(line)
            err.append(line)
        proc.wait()
        timer.cancel()
        reader.join()
    stdout, stderr = "".join(out), "".join(err)
    if timed_out.is_set():
        pytest.fail(f"{' '.join(argv)} still running after {timeout} s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def bind_random(layer, rng, dtype=np.float64, around_one=False):
    """Bind random parameters (around 1 if asked) and zero gradients; return (params, grads)."""
    params = {n: (around_one + 0.5 * rng.standard_normal(s)).astype(dtype) for n, s in layer.param_shapes()}
    grads = {n: np.zeros(s, dtype) for n, s in layer.param_shapes()}
    layer.bind(params, grads)
    return params, grads


def check_grads(layer, x, params, grads, rng, tol=1e-6):
    """distbp.nn.check_gradients on a layer whose parameters the test bound."""
    check_gradients(layer, x, params=params, grads=grads, rng=rng, tol=tol)


def import_torch():
    """PyTorch, the optional reference: skip without it, unless DISTBP_TEST_TORCH=1 requires it."""
    if os.environ.get("DISTBP_TEST_TORCH") == "1":
        import torch
        return torch
    return pytest.importorskip("torch")


def check_model_gradients(model, x, R, tol: float = 1e-6):
    """A model's parameter and input gradients of sum(model(x) * R) against finite differences; the former."""
    model.zero_grad()
    model.forward(x)
    dx = model.backward(R)
    grads = model.grads.copy()
    loss = lambda: float(np.sum(model.forward(x) * R))  # noqa: E731
    assert rel_err(grads, numeric_grad(loss, model.params)) < tol
    assert rel_err(dx, numeric_grad(loss, x)) < tol
    return grads


@pytest.fixture(scope="session")
def comm():
    """The world Comm: size 1 under plain pytest, n under mpirun -n n."""
    return world()


@pytest.fixture
def serial(comm):
    """Skip in multi-rank sessions: the test launches its own jobs, or runs a world of its own in-process."""
    if comm.size > 1:
        pytest.skip("launches its own jobs or runs in-process: run in the serial session")


def metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(params=["serial", "world"])
def any_comm(request, comm):
    """Each test body once on a SerialComm and once on the world Comm."""
    return SerialComm() if request.param == "serial" else comm


@pytest.fixture
def shared_tmp(comm, tmp_path) -> Path:
    """A tmp folder every rank sees: rank 0's tmp_path, broadcast."""
    return Path(comm.bcast_obj(str(tmp_path)))


def tiny_arrays(rows=40, features=6, classes=3, seed=0, dtype=np.float32):
    """(x, y) small classification arrays with every class present."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features)).astype(dtype)
    y = np.arange(rows, dtype=np.int64) % classes
    return x, y


@pytest.fixture
def make_dataset(comm, shared_tmp):
    """Factory: write a small dataset on rank 0 into the shared folder; every rank gets its path."""
    def make(name="data.h5", train=40, val=12, features=6, classes=3, seed=0, **kwargs):
        path, error = shared_tmp / name, None
        if comm.is_root:
            splits = {"train": tiny_arrays(train, features, classes, seed),
                      "val": tiny_arrays(val, features, classes, seed + 1)}
            try:
                write_dataset(path, kwargs.pop("splits", splits), num_classes=kwargs.pop("num_classes", classes),
                              **kwargs)
            except Exception as e:  # every rank fails the test instead of waiting for rank 0
                error = repr(e)
        error = comm.bcast_obj(error)
        if error:
            pytest.fail(f"make_dataset failed on rank 0: {error}")
        return path
    return make
