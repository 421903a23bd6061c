"""The rank's worker threads for the layers' NumPy passes: fixed work items, the same bits at any thread count.

A pass is cut into work items that depend on the array's shape alone (channel rows, output
rows, blocks of BLOCK elements), never on the thread count; `run` hands each thread a
contiguous run of items, and an item's arithmetic is one NumPy call (or one single-thread
sgemm) on the same operands whichever thread runs it. Reductions keep one partial per item
and add the partials in item order. So a pass gives the same bits at 1, 2 or 64 threads and
may run in deterministic mode too. NumPy's ufuncs and OpenBLAS release the GIL, so the
threads run in parallel. The thread count is the rank's budget (parallel's set_thread_budget
calls `set_threads`); 1 means no pool at all.

The pool is the rank's only threads: while it has several, BLAS runs on one thread, and the
layers' products (`matmul`) are cut over the pool instead. OpenBLAS's own idle workers spin about
0.1 s after each threaded product before they sleep, and took the pool's cores: W5's step ran
1.3x slower at two threads than at one until they were gone.
"""
from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK = 1 << 15  # elements per item of a flat element-wise pass: 128 KB of float32, cache-sized
SERIAL_BELOW = 1 << 16  # elements under which a pass runs on the calling thread (the pool costs ~20 us)

SPLIT_BELOW = 1 << 22  # multiply-adds under which a product runs in one call (~0.1 ms; the pool costs ~20-50 us)

_threads = 1
_split = True  # whether a 2-D product may be cut over the threads (its bits then depend on the count)
_pool: ThreadPoolExecutor | None = None
_blas_cap = None  # threadpoolctl's limit holding BLAS at one thread while the pool has several
_lock = threading.Lock()
_NAME = "distbp-pass"  # the pool threads' name prefix


def set_threads(n: int, split_products: bool = True) -> None:
    """Use n threads per rank for the layers' passes and products (n >= 1), BLAS on one thread while n > 1;
    split_products=False keeps each 2-D product in one call (deterministic mode: its bits depend on the cut)."""
    global _threads, _pool, _split, _blas_cap
    n = max(1, int(n))
    with _lock:
        if n != _threads and _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _threads, _split = n, split_products
        if n > 1 and _blas_cap is None:
            from threadpoolctl import threadpool_limits
            _blas_cap = threadpool_limits(limits=1, user_api="blas")
        elif n == 1 and _blas_cap is not None:
            _blas_cap.restore_original_limits()
            _blas_cap = None


def threads() -> int:
    """Threads per rank the passes use."""
    return _threads


@contextlib.contextmanager
def using(n: int, split_products: bool = True):
    """Run the passes and products inside on n threads, then restore the settings (tests, benchmarks)."""
    old = _threads, _split
    set_threads(n, split_products)
    try:
        yield
    finally:
        set_threads(*old)


def _spans(items: int, parts: int) -> list[tuple[int, int]]:
    """items cut into `parts` contiguous near-equal runs (none empty)."""
    parts = max(1, min(parts, items))
    return [(p * items // parts, (p + 1) * items // parts) for p in range(parts)]


def run(fn, items: int, work: int = SERIAL_BELOW) -> None:
    """fn(lo, hi) over the items [0, items) in contiguous runs, one run per thread; work is the
    pass's size in elements (small passes run on this thread, in one call)."""
    if items <= 0:
        return
    nested = threading.current_thread().name.startswith(_NAME)  # a pool thread waiting on its own pool could hang
    if _threads == 1 or items == 1 or work < SERIAL_BELOW or nested:
        fn(0, items)
        return
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads, thread_name_prefix=_NAME)
        pool = _pool
    spans = _spans(items, _threads)
    futures = [pool.submit(fn, lo, hi) for lo, hi in spans[1:]]
    fn(*spans[0])  # the calling thread takes the first run
    for f in futures:
        f.result()


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b, cut over the rank's threads (each part one single-thread BLAS call): a stack of products by its
    first axis (each product whole, so the bits do not depend on the thread count), a 2-D product by columns of
    b, one span per thread, as BLAS's own threads would cut it (its bits depend on the count, so not when
    products are kept whole: deterministic mode). Small products take one call."""
    if out is None:
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        out = np.empty(shape, np.result_type(a, b))
    stack = out.ndim > 2 and a.shape[:-2] == b.shape[:-2] == out.shape[:-2]  # else broadcast: one call
    cut = stack or (out.ndim == 2 and _split)
    items = out.shape[0] if stack else out.shape[-1]
    if _threads == 1 or not cut or items < 2 or out.size * a.shape[-1] < SPLIT_BELOW:
        return np.matmul(a, b, out=out)
    if stack:
        run(lambda lo, hi: np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi]), items, out.size)
    else:
        run(lambda lo, hi: np.matmul(a, b[:, lo:hi], out=out[:, lo:hi]), items, out.size)
    return out


def _order(a: np.ndarray) -> tuple:
    """a's axes of length > 1, outermost in memory first."""
    axes = [i for i in range(a.ndim) if a.shape[i] > 1]
    return tuple(sorted(axes, key=lambda i: -abs(a.strides[i])))


def flat(a: np.ndarray) -> np.ndarray | None:
    """a's elements as a 1-D view in memory order, or None when a is not one dense block."""
    order = _order(a)
    t = a.transpose(order + tuple(i for i in range(a.ndim) if i not in order))
    return t.reshape(-1) if t.flags.c_contiguous else None


def elementwise(fn, out: np.ndarray, *ins: np.ndarray) -> np.ndarray:
    """fn(out_block, *in_blocks) on blocks of BLOCK elements of arrays of one shape and memory order; returns out.

    Small arrays, and arrays in different memory orders (rare: a transposed dy), take one call over the
    whole arrays: a choice made by the shapes alone, so the bits still do not depend on the thread count."""
    if out.size < SERIAL_BELOW:  # one call: blocks would only add Python overhead (W2's step is ~2 ms)
        fn(out, *ins)
        return out
    views = [flat(a) for a in (out, *ins)]
    if any(v is None for v in views) or any(_order(a) != _order(out) or a.shape != out.shape for a in ins):
        fn(out, *ins)
        return out

    def blocks(lo, hi):
        for k in range(lo, hi):
            s = slice(k * BLOCK, (k + 1) * BLOCK)
            fn(*(v[s] for v in views))

    run(blocks, math.ceil(out.size / BLOCK), out.size)
    return out


_ZEROS: dict = {}  # dtype -> a shared read-only array of zeros, grown as needed (see relu)


def relu(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = max(a, 0), the ReLU's arithmetic, taken against an array of zeros: with the scalar 0 NumPy 2.4 runs a
    loop 2.9x slower (82 against 28 us on 128 Ki float32), with the same bits (-0.0, NaN payloads, subnormals)."""
    z = _ZEROS.get(a.dtype)
    if z is None or z.size < a.size:
        z = np.zeros(max(a.size, BLOCK), a.dtype)
        z.flags.writeable = False
        _ZEROS[a.dtype] = z  # threads racing here each keep the array they made: all zeros alike
    return np.maximum(a, z[: a.size].reshape(a.shape), out=out)


def like(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out, or a new uninitialised array of a's shape, dtype and memory order."""
    return np.empty_like(a) if out is None else out


def relu_(a: np.ndarray) -> np.ndarray:
    """a = max(a, 0) in place (see relu)."""
    return relu(a, a)


def add_rows(y: np.ndarray, b: np.ndarray, relu: bool = False) -> np.ndarray:
    """y += b on every row of a C-contiguous y whose last axis is b's, then y = max(y, 0) if relu, in blocks of
    whole rows (the ReLU while the block is in cache: the same arithmetic as a ReLU pass after)."""
    if y.size < SERIAL_BELOW:
        y += b
        return relu_(y) if relu else y
    y2 = y.reshape(-1, b.size)
    rows = max(1, BLOCK // b.size)

    def blocks(lo, hi):
        for k in range(lo, hi):
            block = y2[k * rows : (k + 1) * rows]
            block += b
            if relu:
                relu_(block)

    run(blocks, math.ceil(len(y2) / rows), y.size)
    return y
