"""The thread budget: node CPUs shared by the ranks on the node, a user's setting kept; BLAS on one thread, the
products cut over the rank's own threads (kept whole in deterministic mode and for small models)."""
import numpy as np
from threadpoolctl import threadpool_info

from distbp.nn import threads as passes
from distbp.parallel import threads


def _blas_threads():
    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def test_thread_budget_gives_the_node_share_to_the_layers_and_one_thread_to_blas(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    logged = []
    with passes.using(1):
        n = threads.set_thread_budget(any_comm, log=logged.append)
        assert n == max(1, any_comm.node_cpus() // any_comm.local_size) == passes.threads()
        assert _blas_threads() == 1 and passes._split
    assert len(logged) == (1 if any_comm.is_root else 0)
    assert logged == [] or f"{n} thread{'s' * (n > 1)} per rank for the layers' products and passes" in logged[0]


def test_thread_budget_respects_the_users_choice(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    logged = []
    with passes.using(1):
        assert threads.set_thread_budget(any_comm, log=logged.append) == 3 == passes.threads()
    assert logged == [] or "set by OPENBLAS_NUM_THREADS=3" in logged[0]


def test_deterministic_mode_keeps_the_threads_and_each_product_whole(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    with passes.using(1):
        assert threads.set_thread_budget(any_comm, log=lambda line: None, deterministic=True) == passes.threads()
        assert passes.threads() == max(1, any_comm.node_cpus() // any_comm.local_size) and not passes._split
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        logged = []
        threads.set_thread_budget(any_comm, log=logged.append, deterministic=True)
        assert passes.threads() == 3 and not passes._split
        assert logged == [] or ("3 threads per rank for the layers' products and passes" in logged[0]
                                and "deterministic" in logged[0])


def test_a_small_model_keeps_each_product_whole(any_comm, monkeypatch):
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    assert threads.too_small_for_threads(9_610, []) and not threads.too_small_for_threads(1_863_690, [])
    assert not threads.too_small_for_threads(9_610, ["reshape", "conv2d", "linear"])
    logged = []
    with passes.using(1):
        threads.set_thread_budget(any_comm, log=logged.append, small_model=True)
        assert not passes._split and _blas_threads() == 1
    budget = any_comm.node_cpus() // any_comm.local_size
    assert logged == [] or ("too small to gain" in logged[0]) == (budget > 1)


def test_the_pool_holds_blas_at_one_thread_and_gives_it_back():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=2, user_api="blas"):
        with passes.using(2):
            assert _blas_threads() == 1
        assert _blas_threads() == 2


def test_matmul_cut_over_the_threads_equals_numpy():
    """A stack of products by its first axis (the same bits at any count), a 2-D product by columns."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 40, 50)).astype(np.float32), rng.standard_normal((6, 50, 30)).astype(np.float32)
    x, w = rng.standard_normal((300, 200)), rng.standard_normal((200, 170))
    stacks = []
    for n in (1, 2, 3, 4):
        with passes.using(n):
            passes_split = passes.SPLIT_BELOW
            passes.SPLIT_BELOW = 0
            try:
                stacks.append(passes.matmul(a, b).tobytes())
                np.testing.assert_allclose(passes.matmul(x, w), x @ w, rtol=1e-12)
                np.testing.assert_allclose(passes.matmul(x.T, x[:, :7]), x.T @ x[:, :7], rtol=1e-12)
                with passes.using(n, split_products=False):
                    assert passes.matmul(x, w).tobytes() == np.matmul(x, w).tobytes()
            finally:
                passes.SPLIT_BELOW = passes_split
    assert stacks == [stacks[0]] * 4 and stacks[0] == np.matmul(a, b).tobytes()


_SPIN = """
import numpy as np, resource, sys, time
from distbp.nn import threads
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
a = np.ones((1024, 1024), np.float32)
threads.set_threads(int(sys.argv[1]))
for _ in range(3):
    threads.matmul(a, a)
t0 = cpu()
time.sleep(0.3)
print(cpu() - t0)
"""


def test_no_blas_worker_spins_after_the_pools_products(tmp_path):
    """OpenBLAS's idle workers spin ~0.1 s of CPU after each threaded product (taking the pool threads' cores);
    with the pool's products on one BLAS thread each, none does, even when NumPy was imported first."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in (*threads.THREAD_ENV, "OPENBLAS_THREAD_TIMEOUT")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # BLAS's own two threads, unless the pool holds it at one
    spun = [float(subprocess.run([sys.executable, "-c", _SPIN, n], env=env, capture_output=True, text=True,
                                 check=True, cwd=tmp_path).stdout) for n in ("2", "1")]
    assert spun[0] < 0.03, spun  # BLAS's own two threads (the second run) spun 0.104-0.112 s here, unloaded
