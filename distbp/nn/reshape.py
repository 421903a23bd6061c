"""Reshape and Flatten: view each row in a new shape, e.g. flat 64-pixel rows as (1, 8, 8) images."""

import math

from .layers import Layer, check_spec, register


def _infer(shape: list, size: int) -> list:
    """shape with its -1 entries filled in so that it holds size values (two -1: equal, a square)."""
    free = shape.count(-1)
    if not free:
        return shape
    rest = size / math.prod(d for d in shape if d != -1)
    side = round(rest ** (1 / free))
    return [side if d == -1 else d for d in shape] if side >= 1 and side ** free == rest else shape


@register("reshape")
class Reshape(Layer):
    """(N, *in_shape) -> (N, *shape) in C order, as torch's x.view(N, *shape)."""

    def __init__(self, in_shape, shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(shape)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "reshape", "shape": [1, 8, 8]}; the sizes must multiply to the input's; one -1 is
        inferred (as numpy's), two -1 are the equal sides of a square ([1, -1, -1]: 64 -> 1x8x8, 784 -> 1x28x28)."""
        check_spec(spec, index, ("shape",))
        shape = spec.get("shape")
        if not (isinstance(shape, list | tuple) and shape and shape.count(-1) <= 2
                and all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1) for d in shape)):
            raise ValueError(f"layer {index} (reshape) needs 'shape', a list of positive ints (at most two -1 "
                             f"to infer), e.g. shape = [1, 8, 8] or [1, -1, -1]; got {shape!r}")
        given, shape = list(shape), _infer(list(shape), math.prod(in_shape))
        if -1 in shape:
            raise ValueError(f"layer {index} (reshape): shape {given} cannot hold the {math.prod(in_shape)} values "
                             f"of the input {tuple(in_shape)} (two -1 must be the sides of a square); give the "
                             "sizes, e.g. shape = [3, 32, 32]")
        if math.prod(shape) != math.prod(in_shape):
            raise ValueError(f"layer {index} (reshape): shape {list(shape)} holds {math.prod(shape)} values "
                             f"per row but the input {tuple(in_shape)} has {math.prod(in_shape)}")
        return cls(in_shape, shape)

    def forward(self, x):
        """Reshape to (N, *shape)."""
        return x.reshape(x.shape[0], *self.out_shape)

    def backward(self, dy):
        """Reshape back to (N, *in_shape)."""
        return dy.reshape(dy.shape[0], *self.in_shape)


@register("flatten")
class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C order, as torch.nn.Flatten."""

    def __init__(self, in_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = (math.prod(in_shape),)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "flatten"}."""
        check_spec(spec, index)
        return cls(in_shape)

    def forward(self, x):
        """Reshape to (N, features)."""
        return x.reshape(x.shape[0], *self.out_shape)

    def backward(self, dy):
        """Reshape back to (N, *in_shape)."""
        return dy.reshape(dy.shape[0], *self.in_shape)
