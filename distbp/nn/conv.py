"""The convolutional layer on NCHW arrays: Conv2D (implicit GEMM: BLAS on views, no im2col copy).

Shapes are NCHW, but the memory of a conv stack is N-innermost: Conv2D returns an
NCHW-shaped view of its (F, Ho, Wo, N) result, the pooling layers do the same, and the
element-wise layers keep the memory order they get, until Flatten copies to
(N, C*H*W). Conv2D pads its input into (H, C, W, N) order, where the kh*C input
values one kernel column sees for a whole output row form a (kh*C, Wo*N) matrix
view with evenly spaced rows: an output row is kw matmuls with those views (see
_correlate), small enough to stay in cache, with no im2col matrix in memory. When those
views are thin (kh*C below THIN_DEPTH rows: the first layer of an image network, C = 1
or 3), BLAS runs them slowly, so the row's kw views are copied into one (kw*kh*C, Wo*N)
buffer, an im2col of one output row, and multiplied at once.

The output rows are the work items of the rank's threads (nn/threads.py): each thread runs
its rows on its own single-thread sgemm (BLAS's own threads split these small products
poorly), and backward's dW keeps one partial per group of rows, added in row order, so the
bits do not depend on the thread count. The padding copies go row by row on the threads too.
"""

import numpy as np

from .layers import WeightLayer, check_spec, register
from . import threads, windows

THIN_DEPTH = 64  # kh*C below this: one matmul per output row over a copied row of windows (see _row_windows)
PARTS_BYTES = 1 << 23  # backward's partial dW per group of output rows, at most this many bytes in all


@register("conv2d")
class Conv2D(WeightLayer):
    """2-D convolution (cross-correlation, as torch) of (N, C, H, W) with W (F, C, kh, kw) plus b (F,)."""

    default_scheme = "he_normal"

    def __init__(self, in_shape, out_channels, kernel, stride, padding, bias, init, out_hw):
        self.in_shape, self.C, self.F = tuple(in_shape), in_shape[0], out_channels
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        self.bias, self.init = bias, init
        self.Ho, self.Wo = out_hw
        self.out_shape = (out_channels, self.Ho, self.Wo)
        area = self.kh * self.kw
        self.w_shape, self.n_out = (self.F, self.C, self.kh, self.kw), self.F
        self.fans = (self.C * area, self.F * area)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "conv2d", "out_channels": 16, "kernel": 3[, "stride": 1, "padding": 0,
        "bias": true, "init": "he_normal"]}; kernel, stride and padding take an int or [h, w]."""
        check_spec(spec, index, ("out_channels", "kernel", "stride", "padding", "bias", "init"))
        F = spec.get("out_channels")
        if not isinstance(F, int) or isinstance(F, bool) or F < 1:
            raise ValueError(f"layer {index} (conv2d) needs a positive int 'out_channels', got {F!r}")
        kernel, stride = windows.pair(spec, index, "kernel"), windows.pair(spec, index, "stride", 1)
        padding = windows.pair(spec, index, "padding", 0, low=0)
        out_hw = windows.out_hw(spec, index, in_shape, kernel, stride, padding)
        return cls(in_shape, F, kernel, stride, padding, *cls.read_options(spec, index), out_hw)

    def forward(self, x):
        """y = W * x + b, one output row at a time from views of the padded input (see _correlate)."""
        N = x.shape[0]
        self.xq = self._gather(x)  # (Hp, C, sw, Wq, N), kept for backward
        self.Wj = np.ascontiguousarray(self.W.transpose(3, 0, 2, 1)).reshape(self.kw, self.F, -1)  # W[:, :, :, j]
        y = _correlate(self.xq, self.Wj, self.kh, (self.sh, self.sw), (self.Ho, self.Wo), self.b)
        return y.reshape(self.F, self.Ho, self.Wo, N).transpose(3, 0, 1, 2)  # (N, F, Ho, Wo) view

    def backward(self, dy):
        """dW += dy x^T, one output row at a time, db += sum(dy); return dx (None if need_dx is off)."""
        N, kh, C, F = dy.shape[0], self.kh, self.C, self.F
        dy = _contiguous(dy.transpose(1, 2, 3, 0)).reshape(F, self.Ho, self.Wo * N)
        size = self.kw * kh * C * F
        per = -(-self.Ho // max(1, min(self.Ho, PARTS_BYTES // (size * dy.itemsize))))  # output rows per part
        parts = np.zeros((-(-self.Ho // per), self.kw, kh * C, F), dy.dtype)  # W[:, :, :, j]^T, rows (i, c)
        stride, thin = (self.sh, self.sw), kh * C < THIN_DEPTH

        def rows(lo, hi):  # parts lo..hi-1, each its rows' sum in row order; x dy^T runs faster than dy x^T
            windows = np.empty((self.kw, kh * C, dy.shape[-1]), dy.dtype) if thin else None
            tmp = np.empty_like(parts[0] if thin else parts[0, 0])
            for r in range(lo * per, min(hi * per, self.Ho)):
                part = parts[r // per]
                if thin:
                    np.matmul(_row_windows(self.xq, r, self.kw, kh, stride, self.Wo, windows), dy[:, r].T,
                              out=tmp.reshape(-1, F))
                    part += tmp
                else:
                    for j in range(self.kw):
                        np.matmul(_window(self.xq, r, j, kh, stride, self.Wo), dy[:, r].T, out=tmp)
                        part[j] += tmp

        with threads.single_blas():
            threads.run(rows, len(parts), self.xq.size)
        dWj = parts.sum(axis=0)  # the parts added in a fixed order whatever thread made them
        self.dW += dWj.reshape(self.kw, kh, C, F).transpose(3, 2, 1, 0)
        if self.b is not None:
            db = np.empty(F, dy.dtype)
            threads.run(lambda lo, hi: [db.__setitem__(f, dy[f].sum()) for f in range(lo, hi)], F, dy.size)
            self.db += db
        if self.after_grads:
            self.after_grads()
        if not self.need_dx:
            return None
        dx = self._dx_flipped(dy) if (self.sh, self.sw) == (1, 1) else self._dx_col2im(dy)  # (C, H, W, N)
        return dx.transpose(3, 0, 1, 2)

    def _dx_flipped(self, dy):
        """dx of a stride-1 convolution: dy, zero-padded, correlated with the kernel flipped and transposed."""
        (C, H, W), (kh, kw), N = self.in_shape, (self.kh, self.kw), dy.shape[-1] // self.Wo
        oh, ow = kh - 1 - self.ph, kw - 1 - self.pw
        rows, cols = range(max(0, -oh), min(self.Ho, H + self.ph)), range(max(0, -ow), min(self.Wo, W + self.pw))
        dyt = dy.reshape(self.F, self.Ho, self.Wo, N)[:, rows.start : rows.stop, cols.start : cols.stop].transpose(1, 0, 2, 3)
        dyq = _padded(dyt, H + kh - 1, W + kw - 1, oh + rows.start, ow + cols.start)  # dyq[u, :, v] = dy[:, u - oh, v - ow]
        dyq = dyq[:, :, None]
        Wt = np.ascontiguousarray(self.W[:, :, ::-1, ::-1].transpose(3, 1, 2, 0)).reshape(kw, C, kh * self.F)
        return _correlate(dyq, Wt, kh, (1, 1), (H, W)).reshape(C, H, W, N)

    def _dx_col2im(self, dy):
        """dx of a strided convolution: W^T dy for each window, added back where the window read x."""
        N, kh, C, s = dy.shape[-1] // self.Wo, self.kh, self.C, (self.sh, self.sw)
        dxq = np.zeros_like(self.xq)
        dcols = np.empty((self.kw, kh * C, self.Wo * N), dy.dtype)
        for r in range(self.Ho):
            np.matmul(self.Wj.transpose(0, 2, 1), dy[:, r], out=dcols)  # W[:, :, :, j]^T dy for every j
            for j in range(self.kw):
                _window(dxq, r, j, kh, s, self.Wo, flat=False)[...] += dcols[j].reshape(kh, C, self.Wo, N)
        return self._scatter(dxq)

    def _gather(self, x):
        """x (N, C, H, W) zero-padded into a (Hp, C, sw, Wq, N) array: [.., .., p, w, ..] is padded column sw*w + p."""
        N, (C, H, W), sw = x.shape[0], self.in_shape, self.sw
        Hp, Wp = H + 2 * self.ph, W + 2 * self.pw
        xp = _padded(x.transpose(2, 1, 3, 0), Hp, Wp, self.ph, self.pw)
        if sw == 1:
            return xp[:, :, None]
        xq = np.zeros((Hp, C, sw, -(-Wp // sw), N), x.dtype)
        for p in range(sw):
            xq[:, :, p, : len(range(p, Wp, sw))] = xp[:, :, p::sw]
        return xq

    def _scatter(self, dxq):
        """The inverse of _gather: dx as a C-contiguous (C, H, W, N) array."""
        (C, H, W), sw = self.in_shape, self.sw
        dxp = np.empty((dxq.shape[0], C, W + 2 * self.pw, dxq.shape[-1]), dxq.dtype)
        for p in range(sw):
            dxp[:, :, p::sw] = dxq[:, :, p, : len(range(p, dxp.shape[2], sw))]
        return np.ascontiguousarray(dxp[self.ph : self.ph + H, :, self.pw : self.pw + W].transpose(1, 0, 2, 3))


def _window(q, r: int, j: int, kh: int, stride: tuple, width: int, flat: bool = True):
    """What kernel column j sees for output row r: q[sh*r + i, c, j % sw, j // sw + w, n] over (i, c, w, n).

    q is a (rows, C, sw, cols, N) array as Conv2D._gather makes. A (kh*C, width*N) view when flat
    (the rows i*C + c are evenly spaced in q), else (kh, C, width, N).
    """
    (sh, sw), lo = stride, j // stride[1]
    win = q[sh * r : sh * r + kh, :, j % sw, lo : lo + width]
    return win.reshape(kh * q.shape[1], -1) if flat else win


def _row_windows(q, r: int, kw: int, kh: int, stride: tuple, width: int, out):
    """The kw windows of output row r (see _window) copied into out, returned as one (kw*kh*C, width*N) matrix."""
    for j in range(kw):
        out[j] = _window(q, r, j, kh, stride, width)
    return out.reshape(out.shape[0] * out.shape[1], out.shape[2])


def _correlate(q, Wj, kh: int, stride: tuple, out_hw: tuple, b=None):
    """y (F, Ho, Wo*N) = sum over windows of Wj[j] (F, kh*C) @ _window(q, r, j), plus b, one output row at a time.

    Each output row takes kw matmuls with views of q, so no im2col copy is made and the row's
    partial sums stay in cache; thin windows (kh*C < THIN_DEPTH) are copied into one buffer per
    row instead and take a single matmul.
    """
    (Ho, Wo), N, (kw, F, depth) = out_hw, q.shape[-1], Wj.shape
    y = np.empty((F, Ho, Wo * N), q.dtype)
    thin = depth < THIN_DEPTH
    Wk = Wj.transpose(1, 0, 2).reshape(F, kw * depth) if thin else None  # W[f, (j, i, c)], a copy

    def rows(lo, hi):
        tmp = np.empty((kw, depth, Wo * N) if thin else (F, Wo * N), q.dtype)  # a row's windows, or a partial sum
        for r in range(lo, hi):
            if thin:
                np.matmul(Wk, _row_windows(q, r, kw, kh, stride, Wo, tmp), out=y[:, r])
            else:
                for j in range(kw):
                    np.matmul(Wj[j], _window(q, r, j, kh, stride, Wo), out=tmp if j else y[:, r])
                    if j:
                        y[:, r] += tmp
            if b is not None:
                y[:, r] += b[:, None]

    with threads.single_blas():  # each thread's rows on its own single-thread sgemm: the same bits at any count
        threads.run(rows, Ho, y.size)
    return y


def _contiguous(a):
    """a as a C-contiguous array: itself when it is, else a copy made on the rank's threads."""
    if a.flags.c_contiguous:
        return a
    out = np.empty(a.shape, a.dtype)
    threads.run(lambda lo, hi: np.copyto(out[lo:hi], a[lo:hi]), len(a), a.size)
    return out


def _padded(a, rows: int, cols: int, top: int, left: int):
    """a (h, C, w, N) placed at [top, left] in zeros of (rows, C, cols, N), one row at a time on the rank's threads."""
    h, C, w, N = a.shape
    out = np.empty((rows, C, cols, N), a.dtype)

    def fill(lo, hi):
        for u in range(lo, hi):
            if top <= u < top + h:
                out[u, :, :left] = 0
                out[u, :, left : left + w] = a[u - top]
                out[u, :, left + w :] = 0
            else:
                out[u] = 0

    threads.run(fill, rows, out.size)
    return out
