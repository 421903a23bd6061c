"""The convolutional layer on NCHW arrays: Conv2D (implicit GEMM: BLAS on views, no im2col copy).

Shapes are NCHW, but the memory of a conv stack is N-innermost: Conv2D returns an
NCHW-shaped view of its (F, Ho, Wo, N) result, the pooling layers do the same, and the
element-wise layers keep the memory order they get, until Flatten copies to
(N, C*H*W). Conv2D pads its input into (H, C, W, N) order, where the kh*C input
values one kernel column sees for a whole output row form a (kh*C, Wo*N) matrix
view with evenly spaced rows: an output row is kw matmuls with those views (see
_correlate), small enough to stay in cache, with no im2col matrix in memory (and cut into blocks of columns
that OpenBLAS multiplies without packing, see SMALL_PRODUCT). When those
views are thin against the product (see THIN_RATIO: the first layer of an image network,
C = 1 or 3), BLAS runs them slowly, so the row's kw views are copied into one
(kw*kh*C, Wo*N) buffer, an im2col of one output row, and multiplied at once. A 3x3 or 5x5, stride-1
product with enough channels takes Winograd's F(4x4, 3x3) or F(4x4, 5x5) instead (nn/winograd.py, WINOGRAD_CHANNELS):
4x or 6.25x fewer multiply-adds, on tiles read from the unpadded input (its padding read as zeros, no copy).

The output rows are the work items of the rank's threads (nn/threads.py): each thread runs
its rows on its own single-thread sgemm (BLAS's own threads split these small products
poorly), and backward's dW keeps one partial per group of rows, added in row order, so the
bits do not depend on the thread count. The padding copies go row by row on the threads too,
a strided convolution's col2im by blocks of output rows (see _dx_col2im). A ReLU after
the convolution runs inside it (Chain.fuse_relu): on each output row in forward, on each
channel of dy with db in backward.
"""

import numpy as np

from .layers import WeightLayer, check_spec, register
from . import kernels, threads, windows, winograd

# The copied-row path (one matmul per output row over a copy of its windows, _row_windows) for a product whose
# window depth (kh*C; kh*F for dx) is at most THIN_RATIO times its output rows (F; C for dx), else kw matmuls on
# views. Fitted to paired timings of both paths by scripts/conv_paths.py (docs/PERFORMANCE.md): a rule of the
# shapes alone, so every rank and run takes the same path (the two add in different orders).
THIN_RATIO = {"forward": 0.375, "dW": 0.375, "dx": 0.0}
# OpenBLAS's SkylakeX (AVX-512) build multiplies a product of at most 100^3 multiply-adds in its small-matrix kernel,
# without packing (sgemm_small_kernel_permit): 1.1-2x faster on a convolution's shapes. So forward's and dx's products
# are cut by columns to that size (_products: each element the same sum), a dW product of at most SMALL_ROWS rows
# by K (_dW_product: its chunks added in order). Rules of the shapes alone: the same bits on every rank.
SMALL_PRODUCT, SMALL_ROWS, MIN_COLUMNS = 100**3, 32, 128
# A float32 3x3 or 5x5, stride-1 product with at least WINOGRAD_CHANNELS input and output channels (C and F for forward
# and dW, F and C for dx) takes Winograd's F(4x4, 3x3) or F(4x4, 5x5) (nn/winograd.py: 4x or 6.25x fewer multiply-adds,
# a larger rounding error); fewer channels, other kernels and float64 (the precision of checks against references)
# the direct path. The threshold is the fit of scripts/conv_paths.py --winograd (docs/PERFORMANCE.md).
WINOGRAD_CHANNELS, WINOGRAD_DTYPES = 16, (np.dtype(np.float32),)
PARTS_BYTES = 1 << 23  # backward's partial dW per group of output rows, at most this many bytes in all
COLS_BYTES = 1 << 22  # a strided dx's W^T dy products per block of output rows (see _dx_col2im), at most


@register("conv2d")
class Conv2D(WeightLayer):
    """2-D convolution (cross-correlation, as torch) of (N, C, H, W) with W (F, C, kh, kw) plus b (F,)."""

    default_scheme = "he_normal"
    relu = False  # set by Chain.link when a ReLU follows: each output row is rectified while in cache
    masks_dy = True  # ... and backward masks dy per channel in its db pass (the ReLU passes dy on)

    def __init__(self, in_shape, out_channels, kernel, stride, padding, bias, init, out_hw):
        self.in_shape, self.C, self.F = tuple(in_shape), in_shape[0], out_channels
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        self.bias, self.init = bias, init
        self.Ho, self.Wo = out_hw
        self.out_shape = (out_channels, self.Ho, self.Wo)
        area = self.kh * self.kw
        self.w_shape, self.n_out = (self.F, self.C, self.kh, self.kw), self.F
        self.fans = (self.C * area, self.F * area)
        self.winograd = self.winograd_dx = False  # Winograd's path for forward and dW, for dx: set by bind

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

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of W, b and their gradients; choose the paths for their type (see WINOGRAD_CHANNELS)."""
        super().bind(params, grads)
        kernel, stride, typed = (self.kh, self.kw), (self.sh, self.sw), self.W.dtype in WINOGRAD_DTYPES
        self.winograd = typed and winograd_path(kernel, stride, self.C, self.F)
        self.winograd_dx = typed and winograd_path(kernel, stride, self.F, self.C)

    def forward(self, x):
        """y = W * x + b, one output row at a time from views of the padded input (see _correlate), or by tiles
        of the unpadded input (Winograd's path)."""
        N = x.shape[0]
        if self.winograd:  # the tiles read x where it is, its padding as zeros (no padded copy)
            self.xq = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # (C, H, W, N): a conv stack's x as it is, kept
            U = winograd.kernel_transform(self.W)
            y = winograd.correlate(self.xq, U, self.kh, self.Ho, self.Wo, self.ph, self.pw, self.b, self.relu)
            self.y = y if self.relu else None
            return y.reshape(self.F, self.Ho, self.Wo, N).transpose(3, 0, 1, 2)
        self.xq = self._gather(x)  # (Hp, C, sw, Wq, N), kept for backward
        self.Wj = np.ascontiguousarray(self.W.transpose(3, 0, 2, 1)).reshape(self.kw, self.F, -1)  # W[:, :, :, j]
        thin = thin_path("forward", self.kh * self.C, self.F)
        y = _correlate(self.xq, self.Wj, self.kh, (self.sh, self.sw), (self.Ho, self.Wo), thin, self.b, self.relu)
        self.y = y if self.relu else None  # (F, Ho, Wo*N), the ReLU's output: backward's mask (no copy)
        return y.reshape(self.F, self.Ho, self.Wo, N).transpose(3, 0, 1, 2)  # (N, F, Ho, Wo) view

    def fuses_relu(self) -> bool:
        """Whether a following ReLU can run inside forward's row pass (always)."""
        return True

    def backward(self, dy):
        """dW += dy x^T (see _dW, or winograd's), db += sum(dy); return dx (None if need_dx is off)."""
        dy, db = self._channels(dy)
        if self.winograd:
            self.dW += winograd.kernel_gradient(self.xq, dy, self.kh, self.Ho, self.Wo, self.ph, self.pw)
        else:
            self._dW(dy)
        if self.b is not None:
            self.db += db
        if self.after_grads:
            self.after_grads()
        if not self.need_dx:
            return None
        dx = self._dx_flipped(dy) if (self.sh, self.sw) == (1, 1) else self._dx_col2im(dy)  # (C, H, W, N)
        return dx.transpose(3, 0, 1, 2)

    def _dW(self, dy):
        """dW += dy x^T on the direct path, one output row at a time."""
        kh, C, F = self.kh, self.C, self.F
        size = self.kw * kh * C * F
        per = -(-self.Ho // max(1, min(self.Ho, PARTS_BYTES // (size * dy.itemsize))))  # output rows per part
        parts = np.zeros((-(-self.Ho // per), self.kw, kh * C, F), dy.dtype)  # W[:, :, :, j]^T, rows (i, c)
        stride, thin = (self.sh, self.sw), thin_path("dW", kh * C, F)

        def rows(lo, hi):  # parts lo..hi-1, each its rows' sum in row order; x dy^T runs faster than dy x^T
            windows = np.empty((self.kw, kh * C, dy.shape[-1]), dy.dtype) if thin else None
            tmp = np.empty_like(parts[0] if thin else parts[0, 0])
            scratch = np.empty_like(tmp)
            for r in range(lo * per, min(hi * per, self.Ho)):
                part = parts[r // per]
                if thin:
                    _dW_product(_row_windows(self.xq, r, self.kw, kh, stride, self.Wo, windows), dy[:, r],
                                tmp.reshape(-1, F), scratch.reshape(-1, F))
                    part += tmp
                else:
                    for j in range(self.kw):
                        _dW_product(_window(self.xq, r, j, kh, stride, self.Wo), dy[:, r], tmp, scratch)
                        part[j] += tmp

        threads.run(rows, len(parts), self.xq.size)
        dWj = parts.sum(axis=0)  # the parts added in a fixed order whatever thread made them
        self.dW += dWj.reshape(self.kw, kh, C, F).transpose(3, 2, 1, 0)

    def _channels(self, dy):
        """dy (N, F, Ho, Wo) as a C-contiguous (F, Ho, Wo*N) array, times (y > 0) for a fused ReLU (in dy's memory
        when allowed), and db, its sum per channel (None without a bias): one pass per channel on the threads."""
        F, N = self.F, dy.shape[0]
        dyt = dy.transpose(1, 2, 3, 0)  # (F, Ho, Wo, N), contiguous when dy came from a conv stack
        contiguous = dyt.flags.c_contiguous
        out = dyt if contiguous and (not self.relu or self.overwrite_dy) else np.empty(dyt.shape, dy.dtype)
        src = dyt if contiguous else out  # a flatten's dy is copied into out first
        y = self.y.reshape(F, -1) if self.relu else None
        db = np.empty(F, dy.dtype) if self.b is not None else None

        def channels(lo, hi):
            if not contiguous:
                np.copyto(out[lo:hi], dyt[lo:hi])
            if y is not None:  # the ReLU layer's dy * (y > 0), compiled (kernels.py)
                kernels.relu_mask(src.reshape(F, -1), y, out.reshape(F, -1), lo, hi)
            if db is not None:
                for f in range(lo, hi):  # NumPy's pairwise sum, the channel still in cache
                    db[f] = out[f].sum()

        threads.run(channels, F, dy.size)
        return out.reshape(F, self.Ho, self.Wo * N), db

    def _dx_flipped(self, dy):
        """dx of a stride-1 convolution: dy, zero-padded, correlated with the kernel flipped and transposed."""
        (C, H, W), (kh, kw), N = self.in_shape, (self.kh, self.kw), dy.shape[-1] // self.Wo
        oh, ow = kh - 1 - self.ph, kw - 1 - self.pw
        g = dy.reshape(self.F, self.Ho, self.Wo, N)
        if self.winograd_dx:  # the tiles read dy's padding as zeros (oh, ow < 0: dy's edges cut off)
            U = winograd.kernel_transform(self.W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            return winograd.correlate(g, U, kh, H, W, oh, ow).reshape(C, H, W, N)
        rows, cols = range(max(0, -oh), min(self.Ho, H + self.ph)), range(max(0, -ow), min(self.Wo, W + self.pw))
        dyt = g[:, rows.start : rows.stop, cols.start : cols.stop].transpose(1, 0, 2, 3)
        top, left = oh + rows.start, ow + cols.start
        dyq = _padded(dyt, H + kh - 1, W + kw - 1, top, left)[:, :, None]  # dyq[u, :, 0, v] = dy[:, u - oh, v - ow]
        Wt = np.ascontiguousarray(self.W[:, :, ::-1, ::-1].transpose(3, 1, 2, 0)).reshape(kw, C, kh * self.F)
        return _correlate(dyq, Wt, kh, (1, 1), (H, W), thin_path("dx", kh * self.F, C)).reshape(C, H, W, N)

    def _dx_col2im(self, dy):
        """dx of a strided convolution: W^T dy for each window, added back where the window read x.

        In blocks of output rows: the block's products on the threads (an output row each), then its adds on the
        threads by padded input row, each row's windows added in (output row, kernel column) order, the order of
        one serial loop over the rows, so the bits do not depend on the thread count."""
        N, kh, kw, C, (sh, sw), Wo = dy.shape[-1] // self.Wo, self.kh, self.kw, self.C, (self.sh, self.sw), self.Wo
        dxq = np.zeros_like(self.xq)
        per_row = kw * kh * C * Wo * N
        block = max(1, min(self.Ho, COLS_BYTES // (per_row * dy.itemsize)))  # output rows per block
        dcols = np.empty((block, kw, kh, C, Wo, N), dy.dtype)
        WjT = np.ascontiguousarray(self.Wj.transpose(0, 2, 1))  # W[:, :, :, j]^T, (kh*C, F) each

        for r0 in range(0, self.Ho, block):
            r1 = min(self.Ho, r0 + block)

            def products(lo, hi):
                for r in range(r0 + lo, r0 + hi):
                    _products(WjT, dy[:, r], dcols[r - r0].reshape(kw, kh * C, Wo * N))

            def adds(lo, hi):  # padded input rows sh*r0 + lo .. hi - 1
                for u in range(sh * r0 + lo, sh * r0 + hi):
                    for r in range(max(r0, -(-(u - kh + 1) // sh)), min(r1, u // sh + 1)):
                        for j in range(kw):
                            dxq[u, :, j % sw, j // sw : j // sw + Wo] += dcols[r - r0, j, u - sh * r]

            threads.run(products, r1 - r0, (r1 - r0) * per_row)
            threads.run(adds, sh * (r1 - 1 - r0) + kh, (r1 - r0) * per_row)
        return self._scatter(dxq)

    def _gather(self, x):
        """x (N, C, H, W) zero-padded into a (Hp, C, sw, Wq, N) array: [.., .., p, w, ..] is padded column sw*w + p."""
        N, (C, H, W), sw = x.shape[0], self.in_shape, self.sw
        Hp, Wp = H + 2 * self.ph, W + 2 * self.pw
        xp = _padded(x.transpose(2, 1, 3, 0), Hp, Wp, self.ph, self.pw)
        if sw == 1:
            return xp[:, :, None]
        xq = np.zeros((Hp, C, sw, -(-Wp // sw), N), x.dtype)

        def fill(lo, hi):
            for p in range(sw):
                xq[lo:hi, :, p, : len(range(p, Wp, sw))] = xp[lo:hi, :, p::sw]

        threads.run(fill, Hp, xq.size)
        return xq

    def _scatter(self, dxq):
        """The inverse of _gather: dx as a C-contiguous (C, H, W, N) array, copied by rows of H on the threads."""
        (C, H, W), sw, (ph, pw) = self.in_shape, self.sw, (self.ph, self.pw)
        dx = np.empty((C, H, W, dxq.shape[-1]), dxq.dtype)

        def fill(lo, hi):
            for p in range(sw):  # padded columns p, p + sw, ... inside [pw, pw + W): input columns w = column - pw
                first = p + sw * -(-(pw - p) // sw)
                count = len(range(first, pw + W, sw))
                if count:
                    src = dxq[ph + lo : ph + hi, :, p, first // sw : first // sw + count]  # (rows, C, count, N)
                    dx[:, lo:hi, first - pw :: sw] = src.transpose(1, 0, 2, 3)

        threads.run(fill, H, dx.size)
        return dx


def winograd_path(kernel: tuple, stride: tuple, inputs: int, outputs: int) -> bool:
    """Whether a float32 product of this kernel and stride from `inputs` to `outputs` channels takes Winograd's
    F(4x4, r x r), r = 3 or 5 (see WINOGRAD_CHANNELS)."""
    formed = kernel[0] == kernel[1] and kernel[0] in winograd.FORMS  # a square kernel of a size FORMS holds
    return formed and tuple(stride) == (1, 1) and min(inputs, outputs) >= WINOGRAD_CHANNELS


def thin_path(product: str, depth: int, rows: int) -> bool:
    """Whether a product ("forward", "dW", "dx") of windows of this depth onto this many output rows takes the
    copied-row path (see THIN_RATIO)."""
    return depth <= THIN_RATIO[product] * rows


def _small_extent(other: int) -> int:
    """The largest multiple of 64 that a product's third dimension may have, its other two multiplying to other,
    for it to stay within SMALL_PRODUCT multiply-adds (0 when not even 64 fits)."""
    return SMALL_PRODUCT // other // 64 * 64


def _dW_product(a, g, out, scratch):
    """out = a @ g^T for a row's (M, K) windows and its (F, K) dy: when M is small (the first layer's few input
    channels) and the product large, in n equal chunks of K of at most SMALL_PRODUCT multiply-adds each (OpenBLAS's
    small-matrix kernels ran these 2-4x faster than one call, SkylakeX kernels), the n products in one stacked call
    (an (n, M, F) output of more than 500 elements: NumPy's matmul releases the interpreter lock only for those),
    then added in order, the K % n columns left over last."""
    (M, K), F = a.shape, g.shape[0]
    if M > SMALL_ROWS or M * K * F <= SMALL_PRODUCT:
        np.matmul(a, g.T, out=out)
        return
    n = -(-K // max(64, _small_extent(M * F)))
    c = K // n
    chunks_a = a[:, : n * c].reshape(M, n, c).transpose(1, 0, 2)  # (n, M, c) views
    stack = np.matmul(chunks_a, g[:, : n * c].reshape(F, n, c).transpose(1, 2, 0))
    out[...] = stack[0]
    for k in range(1, n):
        out += stack[k]
    if n * c < K:
        out += np.matmul(a[:, n * c :], g[:, n * c :].T, out=scratch)


def _products(a, b, out):
    """out = a @ b over the leading axes of a stack of products, each cut into blocks of columns of at most
    SMALL_PRODUCT multiply-adds (whole when the blocks would be narrower than MIN_COLUMNS): one call for all the
    stack's whole blocks and one for the rest, not one per block (fewer calls, fewer hand-offs of the interpreter
    lock between the rank's threads). Each element is the same sum as in one call on its product."""
    cols = b.shape[-1]
    step = _small_extent(a.shape[-2] * a.shape[-1])
    blocks = cols // step if MIN_COLUMNS <= step < cols else 0
    if blocks == 1:  # no axis to add: a's stack as it is (the extra axis costs interpreter time on every row)
        np.matmul(a, b[..., :step], out=out[..., :step])
    elif blocks:  # the blocks as one more leading axis of strided views
        def cut(m):
            return m[..., : blocks * step].reshape(*m.shape[:-1], blocks, step).swapaxes(-2, -3)
        np.matmul(a[..., None, :, :], cut(b), out=cut(out))
    if blocks * step < cols:
        np.matmul(a, b[..., blocks * step :], out=out[..., blocks * step :])


def _window(q, r: int, j: int, kh: int, stride: tuple, width: int, flat: bool = True):
    """What kernel column j sees for output row r: q[sh*r + i, c, j % sw, j // sw + w, n] over (i, c, w, n).

    q is a (rows, C, sw, cols, N) array as Conv2D._gather makes. A (kh*C, width*N) view when flat
    (the rows i*C + c are evenly spaced in q), else (kh, C, width, N).
    """
    (sh, sw), lo = stride, j // stride[1]
    win = q[sh * r : sh * r + kh, :, j % sw, lo : lo + width]
    return win.reshape(kh * q.shape[1], -1) if flat else win


def _row_views(q, r: int, kw: int, kh: int, stride: tuple, width: int):
    """The kw windows of output row r (see _window; column stride 1) as one (kw, kh*C, width*N) view: window j is
    window 0 moved j columns along the row."""
    w0 = _window(q, r, 0, kh, stride, width)
    assert w0.size == 0 or np.may_share_memory(w0, q)  # a view of q, not a copy
    return np.lib.stride_tricks.as_strided(w0, (kw, *w0.shape), (q.strides[3], *w0.strides), writeable=False)


def _row_windows(q, r: int, kw: int, kh: int, stride: tuple, width: int, out):
    """The kw windows of output row r (see _window) copied into out, returned as one (kw*kh*C, width*N) matrix."""
    if stride[1] == 1:  # one copy from the row's views, not kw (each call holds the interpreter lock a while)
        np.copyto(out, _row_views(q, r, kw, kh, stride, width))
    else:
        for j in range(kw):
            out[j] = _window(q, r, j, kh, stride, width)
    return out.reshape(out.shape[0] * out.shape[1], out.shape[2])


def _correlate(q, Wj, kh: int, stride: tuple, out_hw: tuple, thin: bool, b=None, relu: bool = False):
    """y (F, Ho, Wo*N) = sum over windows of Wj[j] (F, kh*C) @ _window(q, r, j), plus b, rectified if relu, one
    output row at a time.

    Each output row takes kw products with views of q (one stacked call when the column stride is 1,
    cut into blocks of columns, see _products), so no im2col copy is made and the row's partial sums
    stay in cache; when thin, the row's windows are copied into one buffer instead and take a single
    product. The partial products, the bias and the ReLU are then added in one compiled pass over
    the row (kernels.finish_row), in the order of the NumPy calls it replaced.
    """
    (Ho, Wo), N, (kw, F, depth) = out_hw, q.shape[-1], Wj.shape
    y = np.empty((F, Ho, Wo * N), q.dtype)
    Wk = Wj.transpose(1, 0, 2).reshape(F, kw * depth) if thin else None  # W[f, (j, i, c)], a copy
    bias = b if b is not None else np.zeros(0, q.dtype)

    def rows(lo, hi):
        windows = np.empty((kw, depth, Wo * N), q.dtype) if thin else None  # a row's windows, copied
        parts = np.empty((0 if thin else kw, F, Wo * N), q.dtype)  # a row's product per kernel column
        for r in range(lo, hi):
            if thin:
                _products(Wk, _row_windows(q, r, kw, kh, stride, Wo, windows), y[:, r])
            elif stride[1] == 1:  # the row's kw products in one stack
                _products(Wj, _row_views(q, r, kw, kh, stride, Wo), parts)
            else:
                for j in range(kw):
                    _products(Wj[j], _window(q, r, j, kh, stride, Wo), parts[j])
            if len(parts) or b is not None or relu:  # the partial sums in column order, b, the ReLU: one pass
                kernels.finish_row(y, r, parts, bias, b is not None, relu)

    threads.run(rows, Ho, y.size)  # each thread's rows on its own single-thread sgemm: the same bits at any count
    return y


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
