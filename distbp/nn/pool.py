"""Average pooling on NCHW arrays: AvgPool2D (torch AvgPool2d) and GlobalAvgPool (torch AdaptiveAvgPool2d(1)).

Like MaxPool2D they work on a (C, H, W, N) copy so each window offset is one strided
slice, and return NCHW-shaped views.
"""

import numpy as np

from .conv import _offsets, _out_hw, _pair
from .layers import Layer, check_spec, register


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
        kernel = _pair(spec, index, "kernel")
        stride = _pair(spec, index, "stride", kernel)
        padding = _pair(spec, index, "padding", 0, low=0)
        if any(2 * p > k for p, k in zip(padding, kernel)):
            raise ValueError(f"layer {index} (avgpool2d): padding {list(padding)} must be at most half the "
                             f"kernel {list(kernel)}, as in torch")
        return cls(in_shape, kernel, stride, padding, _out_hw(spec, index, in_shape, kernel, stride, padding))

    def _window_slices(self):
        """Each window offset's (rows, cols) slices of the padded input."""
        return _offsets(self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)

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
