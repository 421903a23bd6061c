"""Pooling on NCHW arrays: MaxPool2D, AvgPool2D (torch MaxPool2d, AvgPool2d) and GlobalAvgPool
(torch AdaptiveAvgPool2d(1)).

They work on a (C, H, W, N) copy so each window offset is one strided slice, and return
NCHW-shaped views.
"""

import numpy as np

from .layers import Layer, check_spec, register
from . import windows


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
        x = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # (C, H, W, N): no copy after a conv
        if self.pairs:
            return self._forward_pairs(x).transpose(3, 0, 1, 2)
        shifts = windows.offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)
        y = x[:, shifts[0][0], shifts[0][1]].copy()  # (C, Ho, Wo, N)
        argmax = np.zeros(y.shape, np.min_scalar_type(len(shifts) - 1))
        for k, (rows, cols) in enumerate(shifts[1:], start=1):  # select, as masked writes are slow
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
        for k, (rows, cols) in enumerate(windows.offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)):
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
        xp = np.zeros((C, H + 2 * self.ph, W + 2 * self.pw, N), x.dtype)  # padded, N innermost
        xp[:, self.ph : self.ph + H, self.pw : self.pw + W] = x.transpose(1, 2, 3, 0)
        y = np.zeros((C, self.Ho, self.Wo, N), x.dtype)
        for rows, cols in self._window_slices():
            y += xp[:, rows, cols]
        y /= self.kh * self.kw
        return y.transpose(3, 0, 1, 2)  # (N, C, Ho, Wo) view

    def backward(self, dy):
        """dx = dy / (kh * kw) added to every position of its window."""
        N, (C, H, W) = dy.shape[0], self.in_shape
        g = dy.transpose(1, 2, 3, 0) / (self.kh * self.kw)  # (C, Ho, Wo, N)
        dxp = np.zeros((C, H + 2 * self.ph, W + 2 * self.pw, N), dy.dtype)
        for rows, cols in self._window_slices():
            dxp[:, rows, cols] += g
        return dxp[:, self.ph : self.ph + H, self.pw : self.pw + W].transpose(3, 0, 1, 2)  # (N, C, H, W) view


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
        return x.mean(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)

    def backward(self, dy):
        """dx = dy / (H * W) at every position."""
        _, H, W = self.in_shape
        return np.broadcast_to(dy / (H * W), (dy.shape[0], *self.in_shape)).copy()  # (N, C, H, W)
