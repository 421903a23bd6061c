"""Compiled element-wise kernels: one pass over memory where NumPy needs three to six.

Each kernel is plain Python over explicit loops, compiled by numba on its first call (nogil, so
the rank's threads run them in parallel; cached on disk, so a later process only loads it) and
working on a range of channels [lo, hi), the work items of nn/threads.py. An output element is
the same arithmetic whatever range or thread computes it: no fast-math (no reassociation, no
fused multiply-add), so a kernel gives the bits of the NumPy calls it replaces, one operation at a
time in the same order. Reductions stay in NumPy (pairwise sums, see norm.py).

Importing numba costs 0.15-0.2 s and ~100 MB of RSS (docs/PERFORMANCE.md); only a process that runs a kernel
pays it.
"""

import threading
import warnings

_lock = threading.Lock()
_kernels = {}  # fn -> numba's dispatcher for it
_uncached = set()  # the fns compiled in memory only, their cache on disk unreadable
_OPTIONS = {"nogil": True, "boundscheck": False}  # numba.njit's options for every kernel, cached or not


def compiled(fn):
    """fn, compiled by numba when first called."""

    def call(*args):
        try:
            return _kernel(fn)(*args)
        except Exception as error:  # a damaged cache file (numba checks no sum), a full disk: compile afresh once
            if fn in _uncached:
                raise
            _compile_in_memory(fn, error)
            return _kernel(fn)(*args)

    call.py_func = fn  # the uncompiled loops (tests run them against the compiled kernel)
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


def _kernel(fn):
    """numba's dispatcher for fn, cached on disk beside this file (or in numba's per-user cache folder)
    when one of them is writable; made once per process, under the lock."""
    kernel = _kernels.get(fn)
    if kernel is None:
        with _lock:
            if fn not in _kernels:
                import numba
                try:
                    _kernels[fn] = numba.njit(cache=True, **_OPTIONS)(fn)
                except RuntimeError:  # no writable cache folder: compile in every process
                    _uncached.add(fn)
                    _kernels[fn] = numba.njit(**_OPTIONS)(fn)
            kernel = _kernels[fn]
    return kernel


def _compile_in_memory(fn, error):
    """Replace fn's dispatcher by one that neither reads nor writes the cache, with one warning."""
    import numba
    with _lock:
        if fn not in _uncached:
            folder = getattr(_kernels[fn]._cache, "_cache_path", "numba's cache folder")
            warnings.warn(f"distbp: numba's cache of the {fn.__name__} kernel could not be loaded or saved "
                          f"({type(error).__name__}: {error}); compiling it in memory. Delete the kernels.*.nbi and "
                          f".nbc files in {folder} to rebuild the cache", stacklevel=3)
            _uncached.add(fn)
            _kernels[fn] = numba.njit(**_OPTIONS)(fn)


@compiled
def maxpool2_forward(x, y, code, lo, hi):
    """2x2 max pooling, stride 2, of channels lo..hi-1 of x (C, H, W, N) into y (C, Ho, Wo, N), and which
    of the window's (top left, top right, bottom left, bottom right) won into code (0..3; ties: the first).

    The window's max is a tournament, top pair, bottom pair, then the winners, each np.maximum's
    arithmetic (a NaN wins; of two equal values, as -0.0 and 0.0, the second).
    """
    for c in range(lo, hi):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                a, b = x[c, 2 * i, 2 * j], x[c, 2 * i, 2 * j + 1]
                d0, d1 = x[c, 2 * i + 1, 2 * j], x[c, 2 * i + 1, 2 * j + 1]
                out, won = y[c, i, j], code[c, i, j]
                for n in range(y.shape[3]):
                    right, right_low = b[n] > a[n], d1[n] > d0[n]
                    top = a[n] if a[n] > b[n] or a[n] != a[n] else b[n]  # np.maximum(a, b), bit for bit
                    bottom = d0[n] if d0[n] > d1[n] or d0[n] != d0[n] else d1[n]
                    first = top >= bottom
                    out[n] = top if top > bottom or top != top else bottom
                    won[n] = right if first else 2 + right_low


@compiled
def maxpool2_backward(dy, code, dx, lo, hi):
    """dx (C, H, W, N) of channels lo..hi-1: each window's dy (C, Ho, Wo, N) where code says it won, else 0;
    rows and columns no window covers (odd H or W) are 0."""
    Ho, Wo = dy.shape[1], dy.shape[2]
    for c in range(lo, hi):
        for i in range(Ho):
            for j in range(Wo):
                g, won = dy[c, i, j], code[c, i, j]
                for k in range(4):  # one output row per loop: its stores vectorize
                    out = dx[c, 2 * i + k // 2, 2 * j + k % 2]
                    for n in range(dy.shape[3]):
                        out[n] = g[n] if won[n] == k else 0
        for u in range(2 * Ho, dx.shape[1]):
            dx[c, u] = 0
        for u in range(2 * Ho):
            for w in range(2 * Wo, dx.shape[2]):
                dx[c, u, w] = 0


@compiled
def relu_mask(dy, y, out, lo, hi):
    """out = dy * (y > 0) (the ReLU's backward on its output y: 0 times dy, so -0.0 or NaN where dy is
    negative or NaN, as NumPy's product), rows lo..hi-1 of (C, M) arrays."""
    for c in range(lo, hi):
        g, h, o = dy[c], y[c], out[c]
        for m in range(g.shape[0]):
            o[m] = g[m] if h[m] > 0 else g[m] * 0


@compiled
def scale_shift(x, a, b, relu, y, lo, hi):
    """y = x * a + b per channel row (rounded after each operation), then np.maximum(., 0) if relu (NaN
    stays, -0.0 becomes 0.0); rows lo..hi-1 of (C, M) arrays."""
    for c in range(lo, hi):
        r, o, ac, bc = x[c], y[c], a[c], b[c]
        for m in range(r.shape[0]):
            v = r[m] * ac + bc
            o[m] = (v if v > 0 or v != v else 0) if relu else v


@compiled
def scale_add(dy, g, x, k, shift, out, lo, hi):
    """out = dy * g + x * k + shift per channel row, added in that order; rows lo..hi-1 of (C, M) arrays."""
    for c in range(lo, hi):
        r, s, o, gc, kc, cc = dy[c], x[c], out[c], g[c], k[c], shift[c]
        for m in range(r.shape[0]):
            o[m] = r[m] * gc + s[m] * kc + cc


@compiled
def finish_row(y, r, parts, b, bias, relu):
    """Output row r of a convolution, y[:, r] (y (F, Ho, M)), in one pass per channel: the sum of the partial
    products parts (P, F, M) in order (P = 0: y[:, r] holds the product already), then b[f] if bias, then
    np.maximum(., 0) if relu (NaN stays, -0.0 becomes 0.0); each step rounded, as the NumPy calls
    `y = part0`, `y += part` for the others, `y += b`, `np.maximum(y, 0)`."""
    for f in range(y.shape[0]):
        o = y[f, r]
        for k in range(parts.shape[0]):
            p = parts[k, f]
            if k == 0:
                for m in range(o.shape[0]):
                    o[m] = p[m]
            else:
                for m in range(o.shape[0]):
                    o[m] += p[m]
        if bias:
            bf = b[f]
            for m in range(o.shape[0]):
                o[m] += bf
        if relu:
            for m in range(o.shape[0]):
                v = o[m]
                o[m] = v if v > 0 or v != v else 0
