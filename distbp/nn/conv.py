"""Convolutional layers on NCHW arrays: Conv2D (implicit GEMM: BLAS on views, no im2col copy) and MaxPool2D.

Shapes are NCHW, but the memory of a conv stack is N-innermost: Conv2D returns an
NCHW-shaped view of its (F, Ho, Wo, N) result, MaxPool2D does the same, and the
element-wise layers keep the memory order they get, until Flatten copies to
(N, C*H*W). Conv2D pads its input into (H, C, W, N) order, where the kh*C input
values one kernel column sees for a whole output row form a (kh*C, Wo*N) matrix
view with evenly spaced rows: an output row is kw matmuls with those views (see
_correlate), small enough to stay in cache, with no im2col matrix in memory. When those
views are thin (kh*C below THIN_DEPTH rows: the first layer of an image network, C = 1
or 3), BLAS runs them slowly, so the row's kw views are copied into one (kw*kh*C, Wo*N)
buffer, an im2col of one output row, and multiplied at once.
"""

import numpy as np

from .layers import Layer, WeightLayer, check_spec, register

THIN_DEPTH = 64  # kh*C below this: one matmul per output row over a copied row of windows (see _row_windows)


def _pair(spec: dict, index: int, key: str, default=None, low: int = 1) -> tuple[int, int]:
    """Read spec[key] as an int or an [h, w] pair of ints >= low."""
    value = spec.get(key, default)
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair):
        raise ValueError(f"layer {index} ({spec['type']}): {key}={value!r} must be an int >= {low} "
                         f"or a pair [h, w] of them, e.g. {key} = {max(low, 2)}")
    return pair


def _out_hw(spec: dict, index: int, in_shape: tuple, kernel, stride, padding=(0, 0)) -> tuple[int, int]:
    """Output (Ho, Wo) of (kh, kw) windows sliding with stride over the padded (H, W)."""
    if len(in_shape) != 3:
        raise ValueError(f"layer {index} ({spec['type']}) needs a (C, H, W) input but gets shape "
                         f"{tuple(in_shape)}; use it before any flatten or linear layer")
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_shape[1:], kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"layer {index} ({spec['type']}): kernel {list(kernel)} does not fit the "
                         f"input {tuple(in_shape)} with padding {list(padding)}; "
                         "use a smaller kernel or more padding")
    return out


def _offsets(kh, kw, sh, sw, Ho, Wo):
    """For each window offset (i, j): the (rows, cols) slices of the input it reads for all outputs."""
    return [(slice(i, i + sh * Ho, sh), slice(j, j + sw * Wo, sw)) for i in range(kh) for j in range(kw)]


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
        kernel, stride = _pair(spec, index, "kernel"), _pair(spec, index, "stride", 1)
        padding = _pair(spec, index, "padding", 0, low=0)
        out_hw = _out_hw(spec, index, in_shape, kernel, stride, padding)
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
        N, kh, C = dy.shape[0], self.kh, self.C
        dy = np.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(self.F, self.Ho, self.Wo * N)
        dWj = np.zeros((self.kw, kh * C, self.F), dy.dtype)  # W[:, :, :, j]^T, rows (i, c)
        stride, thin = (self.sh, self.sw), kh * C < THIN_DEPTH
        tmp = np.empty_like(dWj if thin else dWj[0])
        windows = np.empty((self.kw, kh * C, dy.shape[-1]), dy.dtype) if thin else None
        for r in range(self.Ho):  # x dy^T runs faster in BLAS than dy x^T
            if thin:
                np.matmul(_row_windows(self.xq, r, self.kw, kh, stride, self.Wo, windows), dy[:, r].T,
                          out=tmp.reshape(-1, self.F))
                dWj += tmp
            else:
                for j in range(self.kw):
                    np.matmul(_window(self.xq, r, j, kh, stride, self.Wo), dy[:, r].T, out=tmp)
                    dWj[j] += tmp
        self.dW += dWj.reshape(self.kw, kh, C, self.F).transpose(3, 2, 1, 0)
        if self.b is not None:
            self.db += dy.sum(axis=(1, 2))
        if not self.need_dx:
            return None
        dx = self._dx_flipped(dy) if (self.sh, self.sw) == (1, 1) else self._dx_col2im(dy)  # (C, H, W, N)
        return dx.transpose(3, 0, 1, 2)

    def _dx_flipped(self, dy):
        """dx of a stride-1 convolution: dy, zero-padded, correlated with the kernel flipped and transposed."""
        (C, H, W), (kh, kw), N = self.in_shape, (self.kh, self.kw), dy.shape[-1] // self.Wo
        dyq = np.zeros((H + kh - 1, self.F, 1, W + kw - 1, N), dy.dtype)  # dyq[u, :, 0, v] = dy[:, u - oh, v - ow]
        oh, ow = kh - 1 - self.ph, kw - 1 - self.pw
        rows, cols = range(max(0, -oh), min(self.Ho, H + self.ph)), range(max(0, -ow), min(self.Wo, W + self.pw))
        dyq[oh + rows.start : oh + rows.stop, :, 0, ow + cols.start : ow + cols.stop] = \
            dy.reshape(self.F, self.Ho, self.Wo, N)[:, rows.start : rows.stop, cols.start : cols.stop].transpose(1, 0, 2, 3)
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
        xp = np.zeros((Hp, C, Wp, N), x.dtype)
        xp[self.ph : self.ph + H, :, self.pw : self.pw + W] = x.transpose(2, 1, 3, 0)
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
    tmp = np.empty((kw, depth, Wo * N) if thin else (F, Wo * N), q.dtype)  # a row's windows, or a partial sum
    Wk = Wj.transpose(1, 0, 2).reshape(F, kw * depth) if thin else None  # W[f, (j, i, c)], a copy
    for r in range(Ho):
        if thin:
            np.matmul(Wk, _row_windows(q, r, kw, kh, stride, Wo, tmp), out=y[:, r])
        else:
            for j in range(kw):
                np.matmul(Wj[j], _window(q, r, j, kh, stride, Wo), out=tmp if j else y[:, r])
                if j:
                    y[:, r] += tmp
        if b is not None:
            y[:, r] += b[:, None]
    return y


@register("maxpool2d")
class MaxPool2D(Layer):
    """Max over (kh, kw) windows (no padding, floor as torch); backward routes dy to each window's argmax."""

    private_output = True
    private_dx = True

    def __init__(self, in_shape, kernel, stride, out_hw):
        self.in_shape = tuple(in_shape)
        (self.kh, self.kw), (self.sh, self.sw) = kernel, stride
        self.Ho, self.Wo = out_hw
        self.out_shape = (in_shape[0], self.Ho, self.Wo)
        self.pairs = kernel == stride == (2, 2)  # the common case, with a faster path

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "maxpool2d", "kernel": 2[, "stride": kernel]}, int or [h, w] each."""
        check_spec(spec, index, ("kernel", "stride"))
        kernel = _pair(spec, index, "kernel")
        stride = _pair(spec, index, "stride", kernel)
        return cls(in_shape, kernel, stride, _out_hw(spec, index, in_shape, kernel, stride))

    def forward(self, x):
        """y = max of each window (the first one on ties); keeps which window offset won."""
        x = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # (C, H, W, N): no copy after a conv
        if self.pairs:
            return self._forward_pairs(x).transpose(3, 0, 1, 2)
        offsets = _offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)
        y = x[:, offsets[0][0], offsets[0][1]].copy()  # (C, Ho, Wo, N)
        argmax = np.zeros(y.shape, np.min_scalar_type(len(offsets) - 1))
        for k, (rows, cols) in enumerate(offsets[1:], start=1):  # select, as masked writes are slow
            v = x[:, rows, cols]
            argmax = np.where(v > y, argmax.dtype.type(k), argmax)
            np.maximum(y, v, out=y)
        self.argmax = argmax
        return y.transpose(3, 0, 1, 2)  # (N, C, Ho, Wo) view

    def backward(self, dy):
        """dx = dy added at each window's argmax."""
        N, (C, H, W) = dy.shape[0], self.in_shape
        dy = np.ascontiguousarray(dy.transpose(1, 2, 3, 0))  # (C, Ho, Wo, N)
        if self.pairs:
            return self._backward_pairs(dy).transpose(3, 0, 1, 2)
        dx = np.zeros((C, H, W, N), dy.dtype)
        for k, (rows, cols) in enumerate(_offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)):
            dx[:, rows, cols] += dy * (self.argmax == k)
        return dx.transpose(3, 0, 1, 2)  # (N, C, H, W) view

    def _quarters(self, x):
        """The 2x2 windows' (top left, top right, bottom left, bottom right) values: (C, Ho, Wo, N) views of x."""
        C, N = x.shape[0], x.shape[-1]
        q = x[:, : 2 * self.Ho, : 2 * self.Wo].reshape(C, self.Ho, 2, self.Wo, 2, N)
        return q[:, :, 0, :, 0], q[:, :, 0, :, 1], q[:, :, 1, :, 0], q[:, :, 1, :, 1]

    def _forward_pairs(self, x):
        """2x2 windows, stride 2, as a tournament: top pair, bottom pair, then the winners (ties: first)."""
        a, b, c, d = self._quarters(x)
        top, bottom = np.maximum(a, b), np.maximum(c, d)
        self.b_wins, self.d_wins, self.top_wins = b > a, d > c, top >= bottom
        return np.maximum(top, bottom, out=top)

    def _backward_pairs(self, dy):
        """Route dy down the tournament of _forward_pairs, writing each quarter of dx once."""
        C, N, (H, W) = dy.shape[0], dy.shape[-1], self.in_shape[1:]
        dx = np.empty((C, H, W, N), dy.dtype)
        dx[:, 2 * self.Ho :] = 0  # rows and columns no window covers
        dx[:, :, 2 * self.Wo :] = 0
        a, b, c, d = self._quarters(dx)
        top = dy * self.top_wins
        bottom = np.subtract(dy, top, out=dy if self.overwrite_dy else None)
        np.subtract(top, np.multiply(top, self.b_wins, out=b), out=a)
        np.subtract(bottom, np.multiply(bottom, self.d_wins, out=d), out=c)
        return dx

