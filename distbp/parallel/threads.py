"""The thread budget of a rank: the node's CPUs shared by its ranks, for BLAS (one thread in deterministic
mode) and for the layers' own passes (nn.threads: the same bits at any count, so deterministic mode too)."""
from __future__ import annotations

import os

from threadpoolctl import ThreadpoolController, threadpool_limits

from ..nn import threads as passes

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Below this many parameters (and without convolutions, whose window products are large at few parameters)
# a step's products are too small to split: the digits MLP (9,610 parameters) ran its README command in
# 0.4-0.9 s with one thread and 3.5-20.7 s with two on a busy 2-core machine (load 5-7).
SMALL_MODEL_PARAMS = 100_000
_LIMITER = None  # the threadpool_limits object must stay alive for the cap to hold


def too_small_for_threads(num_params: int, layer_types) -> bool:
    """Whether a model's products are too small to gain from a second BLAS thread."""
    return num_params < SMALL_MODEL_PARAMS and not any(str(t).startswith("conv") for t in layer_types)


def set_thread_budget(comm, log=print, deterministic: bool = False, small_model: bool = False) -> int:
    """Cap BLAS threads per rank (1 if deterministic or for a small model, else node CPUs // ranks on the node
    unless the user set them); the layers' passes get the node's share (or the user's count), also in
    deterministic mode and for a small model.

    Warns once (rank 0) when its node has more ranks than CPUs."""
    # Collective over the node. More BLAS threads than CPUs is much slower; a user's
    # OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS stands and is reported as is, except in deterministic mode: BLAS results depend on the
    # thread count (docs/DETERMINISM.md), and the default budget differs with the ranks per node.
    global _LIMITER
    cpus = comm.node_cpus()
    user = [f"{k}={os.environ[k]}" for k in THREAD_ENV if os.environ.get(k)]
    if deterministic:
        n = 1
        _LIMITER = threadpool_limits(limits=n, user_api="blas")
        msg = "1 BLAS thread per rank (deterministic: BLAS results depend on the thread count)"
    elif user:
        pools = ThreadpoolController().select(user_api="blas").info()
        n = max([p["num_threads"] for p in pools] or [1])
        msg = f"{n} BLAS threads per rank (set by {', '.join(user)})"
    elif small_model and cpus // comm.local_size > 1:
        n = 1
        _LIMITER = threadpool_limits(limits=n, user_api="blas")
        msg = (f"1 BLAS thread per rank (the model is too small to gain from {cpus // comm.local_size}: fewer than "
               f"{SMALL_MODEL_PARAMS:,} parameters and no convolution; OMP_NUM_THREADS sets another count)")
    else:
        n = max(1, cpus // comm.local_size)
        _LIMITER = threadpool_limits(limits=n, user_api="blas")
        msg = f"{n} BLAS threads per rank ({cpus} CPUs / {comm.local_size} ranks on this node)"
    passes.set_threads(_user_threads() or max(1, cpus // comm.local_size))
    msg += f"; {passes.threads()} thread{'s' * (passes.threads() > 1)} per rank for the layers' own passes"
    if comm.is_root:
        log(f"distbp: {msg}")
        if comm.local_size > cpus:
            log(f"WARNING: {comm.local_size} ranks share {cpus} core{'s' * (cpus > 1)} on this node: oversubscribed ranks "
                f"wait for each other and communication can take most of the step time; HINT: mpirun -n {cpus} "
                "(or spread the ranks over more nodes)")
    return n


def _user_threads() -> int:
    """The first thread count the user set in THREAD_ENV (0 when none is a positive int)."""
    for k in THREAD_ENV:
        v = os.environ.get(k, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 0
