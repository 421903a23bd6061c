"""The thread budget of a rank: the node's CPUs shared by its ranks, for the layers' products and passes
(nn.threads: BLAS on one thread per pool thread; the passes give the same bits at any count, so deterministic
mode keeps them, and keeps each product whole)."""
from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

from ..nn import threads as passes

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Below this many parameters (and without convolutions, whose window products are large at few parameters)
# a step's products are too small to split: the digits MLP (9,610 parameters) ran its README command in
# 0.4-0.9 s with one thread and 3.5-20.7 s with two on a busy 2-core machine (load 5-7).
SMALL_MODEL_PARAMS = 100_000
_LIMITER = None  # the threadpool_limits object must stay alive for the cap to hold


def too_small_for_threads(num_params: int, layer_types) -> bool:
    """Whether a model's products are too small to gain from being cut over threads."""
    return num_params < SMALL_MODEL_PARAMS and not any(str(t).startswith("conv") for t in layer_types)


def set_thread_budget(comm, log=print, deterministic: bool = False, small_model: bool = False) -> int:
    """Give the rank's layers (products and passes) the node's CPUs // ranks on the node, or the user's count;
    BLAS runs on one thread (the pool cuts the products). Products stay whole in deterministic mode (their bits
    depend on the cut) and for a small model. Returns the thread count.

    Warns once (rank 0) when its node has more ranks than CPUs."""
    # Collective over the node. More threads than CPUs is much slower; a user's OMP_NUM_THREADS /
    # OPENBLAS_NUM_THREADS / MKL_NUM_THREADS stands and is reported as is.
    global _LIMITER
    cpus = comm.node_cpus()
    user = [f"{k}={os.environ[k]}" for k in THREAD_ENV if os.environ.get(k)]
    n = _user_threads() or max(1, cpus // comm.local_size)
    _LIMITER = threadpool_limits(limits=1, user_api="blas")
    whole = deterministic or small_model
    passes.set_threads(n, split_products=not whole)
    why = f"set by {', '.join(user)}" if user else f"{cpus} CPUs / {comm.local_size} ranks on this node"
    msg = f"{n} thread{'s' * (n > 1)} per rank for the layers' products and passes ({why})"
    if n > 1 and deterministic:
        msg += "; each product on one of them (deterministic: a product's bits depend on how it is cut)"
    elif n > 1 and small_model:
        msg += (f"; each product on one of them (the model is too small to gain: fewer than {SMALL_MODEL_PARAMS:,} "
                "parameters and no convolution)")
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
