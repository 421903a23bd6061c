"""The BLAS thread budget: node CPUs shared by the ranks on the node, a user's setting kept."""
from threadpoolctl import threadpool_info

from distbp.parallel import threads


def _blas_threads():
    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def test_thread_budget_caps_blas_per_rank(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    logged = []
    n = threads.set_thread_budget(any_comm, log=logged.append)
    assert n == max(1, any_comm.node_cpus() // any_comm.local_size) == _blas_threads()
    assert len(logged) == (1 if any_comm.is_root else 0)
    assert logged == [] or f"{n} BLAS threads per rank" in logged[0]


def test_thread_budget_respects_the_users_choice(any_comm, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    logged = []
    assert threads.set_thread_budget(any_comm, log=logged.append) == _blas_threads()
    assert logged == [] or "OPENBLAS_NUM_THREADS=1" in logged[0]


def test_the_layers_passes_get_the_budget_also_in_deterministic_mode(any_comm, monkeypatch):
    from distbp.nn import threads as passes
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    with passes.using(1):
        assert threads.set_thread_budget(any_comm, log=lambda line: None, deterministic=True) == 1
        assert passes.threads() == max(1, any_comm.node_cpus() // any_comm.local_size)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        logged = []
        threads.set_thread_budget(any_comm, log=logged.append, deterministic=True)
        assert passes.threads() == 3
        assert logged == [] or "3 threads per rank for the layers' own passes" in logged[0]


def test_a_small_model_gets_one_thread(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    assert threads.too_small_for_threads(9_610, []) and not threads.too_small_for_threads(1_863_690, [])
    assert not threads.too_small_for_threads(9_610, ["reshape", "conv2d", "linear"])
    logged = []
    assert threads.set_thread_budget(any_comm, log=logged.append, small_model=True) == 1 == _blas_threads()
    budget = any_comm.node_cpus() // any_comm.local_size
    assert logged == [] or ("too small to gain" in logged[0]) == (budget > 1)


_SPIN = """
import distbp, numpy as np, resource, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
a = np.ones((1024, 1024), np.float32)
for _ in range(3):
    a @ a  # on OpenBLAS's 2 threads
t0 = cpu()
time.sleep(0.3)
print(cpu() - t0, __import__("os").environ["OPENBLAS_THREAD_TIMEOUT"])
"""


def test_openblas_idle_threads_sleep_at_once_when_distbp_is_imported_first(tmp_path):
    """OpenBLAS's workers spin ~0.1 s of CPU after each threaded product by default, taking the cores of the rank's
    pass threads; distbp, imported before NumPy, sets their timeout to 2**4 cycles. A user's value stands."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    out = subprocess.run([sys.executable, "-c", _SPIN], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    spun, timeout = out.stdout.split()
    assert timeout == "4"
    assert float(spun) < 0.03  # the default spin measured 0.104-0.106 s here (a load only shortens it)
    env["OPENBLAS_THREAD_TIMEOUT"] = "20"
    out = subprocess.run([sys.executable, "-c", _SPIN], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split()[1] == "20"
