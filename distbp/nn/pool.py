"""Pooling on NCHW arrays: MaxPool2D, AvgPool2D (torch MaxPool2d, AvgPool2d) and GlobalAvgPool
(torch AdaptiveAvgPool2d(1)).

They work on a (C, H, W, N) copy so each window offset is one strided slice, and return
NCHW-shaped views.
"""

import numpy as np

from .layers import Layer, check_spec, register
from . import kernels, threads, windows


def _channels_outer(a):
    """a (N, C, H, W) as a C-contiguous (C, H, W, N) array: a view after a conv, else a copy on the rank's threads."""
    t = a.transpose(1, 2, 3, 0)
    if t.flags.c_contiguous:
        return t
    out = np.empty(t.shape, a.dtype)
    threads.run(lambda lo, hi: np.copyto(out[lo:hi], t[lo:hi]), t.shape[0], t.size)
    return out


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
        kernel = windows.pair(spec, index, "kernel")
        stride = windows.pair(spec, index, "stride", kernel)
        return cls(in_shape, kernel, stride, windows.out_hw(spec, index, in_shape, kernel, stride))

    def forward(self, x):
        """y = max of each window (the first one on ties); keeps which window offset won."""
        x = _channels_outer(x)  # (C, H, W, N): no copy after a conv
        if self.pairs:
            return self._forward_pairs(x).transpose(3, 0, 1, 2)
        shifts = windows.offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)
        y = np.empty((x.shape[0], self.Ho, self.Wo, x.shape[-1]), x.dtype)  # (C, Ho, Wo, N)
        self.argmax = np.empty(y.shape, np.min_scalar_type(len(shifts) - 1))

        def channels(lo, hi):  # the max and its argmax in one pass over each channel
            yc, am = y[lo:hi], self.argmax[lo:hi]
            np.copyto(yc, x[lo:hi, shifts[0][0], shifts[0][1]])
            am[...] = 0
            for k, (rows, cols) in enumerate(shifts[1:], start=1):  # select, as masked writes are slow
                v = x[lo:hi, rows, cols]
                am[...] = np.where(v > yc, am.dtype.type(k), am)
                np.maximum(yc, v, out=yc)

        threads.run(channels, x.shape[0], x.size)
        return y.transpose(3, 0, 1, 2)  # (N, C, Ho, Wo) view

    def backward(self, dy):
        """dx = dy added at each window's argmax."""
        N, (C, H, W) = dy.shape[0], self.in_shape
        dy = _channels_outer(dy)  # (C, Ho, Wo, N)
        if self.pairs:
            return self._backward_pairs(dy).transpose(3, 0, 1, 2)
        dx = np.empty((C, H, W, N), dy.dtype)
        shifts = windows.offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)

        def channels(lo, hi):
            dx[lo:hi] = 0
            for k, (rows, cols) in enumerate(shifts):
                dx[lo:hi, rows, cols] += dy[lo:hi] * (self.argmax[lo:hi] == k)

        threads.run(channels, C, dx.size)
        return dx.transpose(3, 0, 1, 2)  # (N, C, H, W) view

    def _forward_pairs(self, x):
        """2x2 windows, stride 2: the max and which quarter won, one compiled pass per channel (kernels.py)."""
        y = np.empty((x.shape[0], self.Ho, self.Wo, x.shape[-1]), x.dtype)
        self.won = np.empty(y.shape, np.uint8)
        threads.run(lambda lo, hi: kernels.maxpool2_forward(x, y, self.won, lo, hi), x.shape[0], x.size)
        return y

    def _backward_pairs(self, dy):
        """dy written where its window's winner was, zeros elsewhere: each element of dx written once."""
        C, N, (H, W) = dy.shape[0], dy.shape[-1], self.in_shape[1:]
        dx = np.empty((C, H, W, N), dy.dtype)
        threads.run(lambda lo, hi: kernels.maxpool2_backward(dy, self.won, dx, lo, hi), C, dx.size)
        return dx


@register("avgpool2d")
class AvgPool2D(Layer):
    """Mean over (kh, kw) windows; zero padding counts in the mean (torch's count_include_pad=True)."""

    private_output = True
    private_dx = True

    def __init__(self, in_shape, kernel, stride, padding, out_hw):
        self.in_shape = tuple(in_shape)
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        self.Ho, self.Wo = out_hw
        self.out_shape = (in_shape[0], self.Ho, self.Wo)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "avgpool2d", "kernel": 2[, "stride": kernel, "padding": 0]}, int or [h, w] each."""
        check_spec(spec, index, ("kernel", "stride", "padding"))
        kernel = windows.pair(spec, index, "kernel")
        stride = windows.pair(spec, index, "stride", kernel)
        padding = windows.pair(spec, index, "padding", 0, low=0)
        if any(2 * p > k for p, k in zip(padding, kernel)):
            raise ValueError(f"layer {index} (avgpool2d): padding {list(padding)} must be at most half the "
                             f"kernel {list(kernel)}, as in torch")
        return cls(in_shape, kernel, stride, padding, windows.out_hw(spec, index, in_shape, kernel, stride, padding))

    def _window_slices(self):
        """Each window offset's (rows, cols) slices of the padded input."""
        return windows.offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)

    def forward(self, x):
        """y = sum of each window / (kh * kw)."""
        N, (C, H, W) = x.shape[0], self.in_shape
        xt, y = x.transpose(1, 2, 3, 0), np.empty((C, self.Ho, self.Wo, N), x.dtype)

        def channels(lo, hi):
            xp = np.zeros((hi - lo, H + 2 * self.ph, W + 2 * self.pw, N), x.dtype)  # padded, N innermost
            xp[:, self.ph : self.ph + H, self.pw : self.pw + W] = xt[lo:hi]
            y[lo:hi] = 0
            for rows, cols in self._window_slices():
                y[lo:hi] += xp[:, rows, cols]
            y[lo:hi] /= self.kh * self.kw

        threads.run(channels, C, x.size)
        return y.transpose(3, 0, 1, 2)  # (N, C, Ho, Wo) view

    def backward(self, dy):
        """dx = dy / (kh * kw) added to every position of its window."""
        N, (C, H, W) = dy.shape[0], self.in_shape
        dyt, dx = dy.transpose(1, 2, 3, 0), np.empty((C, H, W, N), dy.dtype)

        def channels(lo, hi):
            g = dyt[lo:hi] / (self.kh * self.kw)  # (c, Ho, Wo, N)
            dxp = np.zeros((hi - lo, H + 2 * self.ph, W + 2 * self.pw, N), dy.dtype)
            for rows, cols in self._window_slices():
                dxp[:, rows, cols] += g
            dx[lo:hi] = dxp[:, self.ph : self.ph + H, self.pw : self.pw + W]

        threads.run(channels, C, dx.size)
        return dx.transpose(3, 0, 1, 2)  # (N, C, H, W) view


@register("global_avgpool")
class GlobalAvgPool(Layer):
    """(N, C, H, W) -> (N, C, 1, 1), the mean over each channel's H x W (torch AdaptiveAvgPool2d(1))."""

    private_output = True
    private_dx = True

    def __init__(self, in_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = (in_shape[0], 1, 1)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "global_avgpool"} on a (C, H, W) input; follow it with flatten before linear."""
        check_spec(spec, index)
        if len(in_shape) != 3:
            raise ValueError(f"layer {index} (global_avgpool) needs a (C, H, W) input but gets shape "
                             f"{tuple(in_shape)}; use it before any flatten or linear layer")
        return cls(in_shape)

    def forward(self, x):
        """y = mean of x over H and W."""
        y = np.empty((x.shape[0], x.shape[1], 1, 1), x.dtype)

        def channels(lo, hi):  # one channel per mean: its summation order is the same on any thread
            for c in range(lo, hi):
                np.mean(x[:, c], axis=(1, 2), out=y[:, c, 0, 0])

        threads.run(channels, x.shape[1], x.size)
        return y  # (N, C, 1, 1)

    def backward(self, dy):
        """dx = dy / (H * W) at every position."""
        C, H, W = self.in_shape
        g = dy / (H * W)
        dx = np.empty((C, H, W, dy.shape[0]), dy.dtype)  # N innermost, like a conv's memory
        threads.run(lambda lo, hi: np.copyto(dx[lo:hi], g[:, lo:hi, 0, 0].T[:, None, None]), C, dx.size)
        return dx.transpose(3, 0, 1, 2)  # (N, C, H, W) view
