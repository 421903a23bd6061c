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
