"""Reshape and Flatten: view each row in a new shape, e.g. flat 64-pixel rows as (1, 8, 8) images."""

import math

from .layers import Layer, check_spec, register


@register("reshape")
class Reshape(Layer):
    """(N, *in_shape) -> (N, *shape) in C order, as torch's x.view(N, *shape)."""

    def __init__(self, in_shape, shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(shape)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "reshape", "shape": [1, 8, 8]}; the sizes must multiply to the input's."""
        check_spec(spec, index, ("shape",))
        shape = spec.get("shape")
        if not (isinstance(shape, list | tuple) and shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"layer {index} (reshape) needs 'shape', a list of positive ints, "
                             f"e.g. shape = [1, 8, 8]; got {shape!r}")
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
