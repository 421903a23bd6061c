"""Convolutional layers on NCHW arrays: Conv2D (im2col + BLAS) and MaxPool2D.

Shapes are NCHW. Conv2D works on a (C, H, W, N) copy of its input, so that each
window slice is a run of W*N contiguous values rather than W (im2col and col2im
of small images are otherwise bound by numpy's per-row overhead), and returns an
NCHW-shaped view of its (F, Ho, Wo, N) result; MaxPool2D does the same, and the
element-wise layers keep the memory order they get, so a conv stack stays
N-innermost in memory until Flatten copies to (N, C*H*W).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import Layer, WeightLayer, check_spec, register


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
        """y = W * x + b on every window, as one BLAS matmul with the im2col matrix."""
        N, (C, H, W) = x.shape[0], self.in_shape
        if self.ph or self.pw:
            xp = np.zeros((C, H + 2 * self.ph, W + 2 * self.pw, N), x.dtype)  # padded, N innermost
            xp[:, self.ph : self.ph + H, self.pw : self.pw + W] = x.transpose(1, 2, 3, 0)
        else:
            xp = x.transpose(1, 2, 3, 0)  # (C, H, W, N)
        win = sliding_window_view(xp, (self.kh, self.kw), axis=(1, 2))  # (C, Hp-kh+1, Wp-kw+1, N, kh, kw)
        win = win[:, : self.sh * self.Ho : self.sh, : self.sw * self.Wo : self.sw]  # (C, Ho, Wo, N, kh, kw)
        K, P = self.kh * self.kw * C, self.Ho * self.Wo * N
        self.cols = win.transpose(4, 5, 0, 1, 2, 3).reshape(K, P)  # im2col copy: (kh*kw*C, Ho*Wo*N)
        self.Wk = self.W.transpose(0, 2, 3, 1).reshape(self.F, K)  # (F, kh*kw*C), rows match cols
        self.xp_shape = xp.shape
        y = self.Wk @ self.cols  # (F, Ho*Wo*N)
        if self.b is not None:
            y += self.b[:, None]
        return y.reshape(self.F, self.Ho, self.Wo, N).transpose(3, 0, 1, 2)  # (N, F, Ho, Wo) view

    def backward(self, dy):
        """dW += dy cols^T, db += sum(dy), return dx = col2im(W^T dy) (None if need_dx is off)."""
        N, (C, H, W) = dy.shape[0], self.in_shape
        dy = dy.transpose(1, 2, 3, 0).reshape(self.F, self.Ho * self.Wo * N)  # (F, Ho*Wo*N)
        self.dW += (dy @ self.cols.T).reshape(self.F, self.kh, self.kw, C).transpose(0, 3, 1, 2)
        if self.b is not None:
            self.db += dy.sum(axis=1)
        if not self.need_dx:
            return None
        dcols = (self.Wk.T @ dy).reshape(self.kh * self.kw, C, self.Ho, self.Wo, N)
        dxp = np.zeros(self.xp_shape, dy.dtype)  # (C, Hp, Wp, N)
        for dwin, (rows, cols) in zip(dcols, _offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)):
            dxp[:, rows, cols] += dwin  # col2im: one strided add per window offset
        return dxp[:, self.ph : self.ph + H, self.pw : self.pw + W].transpose(3, 0, 1, 2)  # (N, C, H, W) view


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
        dx = np.zeros((C, H, W, N), dy.dtype)
        for k, (rows, cols) in enumerate(_offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)):
            dx[:, rows, cols] += dy * (self.argmax == k)
        return dx.transpose(3, 0, 1, 2)  # (N, C, H, W) view
