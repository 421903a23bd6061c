"""Sequential model whose parameters and gradients are views into one flat vector each.

Layout: layers in spec order, and within a layer its ``param_shapes()`` order (Linear:
W then b). Each parameter has the stable name ``"{layer index}.{kind}.{pname}"``
(``0.linear.W``, ``0.linear.b``, ``2.linear.W``, ...) and occupies ``offsets[name]``
= (start, stop) of ``params`` and ``grads``. Non-trained state (BatchNorm running
statistics) lives the same way in the separate ``buffers`` vector.
"""

import math

import numpy as np

from .init import default_init, layer_rng
from .layers import Activation, Context, activation_names, layer_class


def mlp_specs(sizes, activation: str = "relu", dropout: float = 0.0) -> list[dict]:
    """Specs for Linear/activation/(Dropout) stacks from sizes [in, h1, ..., out]."""
    if len(sizes) < 2:
        raise ValueError(f"mlp sizes={list(sizes)} needs at least [in, out]")
    if activation not in activation_names():
        raise ValueError(f"activation={activation!r} is unknown; use one of {list(activation_names())}")
    specs = []
    for width in sizes[1:-1]:
        specs += [{"type": "linear", "out": int(width)}, {"type": activation}]
        if dropout > 0:
            specs.append({"type": "dropout", "p": float(dropout)})
    return specs + [{"type": "linear", "out": int(sizes[-1])}]


def _shapes_of(layer, method: str) -> list:
    """(name, shape) pairs from a layer's param_shapes/buffer_shapes, [] if it has none."""
    get = getattr(layer, method, None)
    return list(get()) if get else []


class FlatLayout:
    """Names, shapes and (start, stop) offsets of named arrays packed in one flat vector."""

    def __init__(self, entries):
        self.names, self.shapes, self.offsets = [], {}, {}
        start = 0
        for name, shape in entries:
            stop = start + math.prod(shape)
            self.names.append(name)
            self.shapes[name] = tuple(shape)
            self.offsets[name] = (start, stop)
            start = stop
        self.size = start

    def views(self, flat: np.ndarray) -> dict:
        """Reshaped views of ``flat`` by name."""
        if flat.ndim != 1 or flat.size != self.size:
            raise ValueError(f"flat vector of shape {flat.shape} does not match the layout "
                             f"of {self.size} values")
        return {n: flat[a:b].reshape(self.shapes[n]) for n, (a, b) in self.offsets.items()}


class Sequential:
    """Layers applied in order; one flat params, grads and buffers vector each."""

    def __init__(self, specs, input_shape, dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype={self.dtype} is not supported; use float32 or float64")
        self.specs = [dict(s) for s in specs]
        shape = (input_shape,) if np.ndim(input_shape) == 0 else input_shape
        self.input_shape = tuple(int(d) for d in shape)
        self.seed = seed
        self.ctx = Context()
        self.layers, self.shapes_io = self._build()
        self.out_shape = self.shapes_io[-1][1] if self.layers else self.input_shape
        self._bind()
        self._link()
        self.init_params(seed)
        self.train()

    def _build(self):
        """Instantiate every layer, threading the shape through."""
        layers, shapes_io, shape = [], [], self.input_shape
        for i, spec in enumerate(self.specs):
            try:
                cls = layer_class(spec.get("type"))
            except ValueError as e:
                raise ValueError(f"layer {i}: type {spec.get('type')!r} {e}") from None
            layer = cls.build(spec, shape, i, self.seed)
            shapes_io.append((shape, tuple(layer.out_shape)))
            layers.append(layer)
            shape = tuple(layer.out_shape)
        return layers, shapes_io

    def _bind(self):
        """Allocate the flat vectors and hand every layer its views."""
        def entries(method):
            return [(f"{i}.{layer.kind}.{p}", s) for i, layer in enumerate(self.layers)
                    for p, s in _shapes_of(layer, method)]

        self.layout = FlatLayout(entries("param_shapes"))
        self.buffer_layout = FlatLayout(entries("buffer_shapes"))
        self.params = np.zeros(self.layout.size, self.dtype)
        self.grads = np.zeros(self.layout.size, self.dtype)
        self.buffers = np.zeros(self.buffer_layout.size, self.dtype)
        self._param_layers = [(i, layer) for i, layer in enumerate(self.layers) if self._has_params(i)]
        self._param_views = self.layer_views(self.params)
        self.bind_grads(self.layer_views(self.grads))
        bv = self.buffer_views(self.buffers)
        for i, layer in enumerate(self.layers):
            bnames = [p for p, _ in _shapes_of(layer, "buffer_shapes")]
            if bnames:
                layer.bind_buffers({p: bv[f"{i}.{layer.kind}.{p}"] for p in bnames})

    def layer_views(self, flat: np.ndarray) -> list[dict]:
        """Views into a params-shaped flat vector: {parameter: view} for each layer with parameters."""
        v = self.views(flat)
        return [{p: v[f"{i}.{layer.kind}.{p}"] for p, _ in _shapes_of(layer, "param_shapes")}
                for i, layer in self._param_layers]

    def bind_grads(self, grads: list[dict]) -> None:
        """Point the layers' gradients at grads (layer_views of a flat vector); backward writes there."""
        for (_, layer), params, g in zip(self._param_layers, self._param_views, grads, strict=True):
            layer.bind(params, g)
        self._grad_views = grads

    def _link(self):
        """Share the context, choose default inits and allow in-place work on temporaries."""
        for i, layer in enumerate(self.layers):
            layer.ctx = self.ctx
            if getattr(layer, "init", "") is None:
                layer.init = default_init(self._next_activation(i))
            prev = self.layers[i - 1] if i > 0 else None
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            layer.overwrite_x = bool(getattr(prev, "private_output", False))
            layer.overwrite_dy = bool(getattr(nxt, "private_dx", False))
        self._first_param = self._param_layers[0][0] if self._param_layers else len(self.layers)

    def _next_activation(self, i: int) -> str | None:
        """Kind of the activation after layer i, before the next initialised layer."""
        for layer in self.layers[i + 1:]:
            if isinstance(layer, Activation):
                return layer.kind
            if hasattr(layer, "init"):
                return None
        return None

    def _has_params(self, i: int) -> bool:
        """Whether layer i owns any parameter."""
        return bool(_shapes_of(self.layers[i], "param_shapes"))

    @property
    def names(self) -> list[str]:
        """Parameter names in flat-vector order."""
        return self.layout.names

    @property
    def shapes(self) -> dict:
        """Parameter name -> shape."""
        return self.layout.shapes

    @property
    def offsets(self) -> dict:
        """Parameter name -> (start, stop) in params and grads."""
        return self.layout.offsets

    @property
    def buffer_names(self) -> list[str]:
        """Buffer names in flat-vector order."""
        return self.buffer_layout.names

    @property
    def num_params(self) -> int:
        """Number of trained parameters."""
        return self.params.size

    def views(self, flat: np.ndarray) -> dict:
        """Reshaped views by parameter name of any flat vector shaped like params."""
        return self.layout.views(flat)

    def buffer_views(self, flat: np.ndarray) -> dict:
        """Reshaped views by buffer name of any flat vector shaped like buffers."""
        return self.buffer_layout.views(flat)

    def init_params(self, seed: int) -> None:
        """Fill params from seed alone (layer i draws from a generator of (seed, i)); reset buffers."""
        for i, layer in enumerate(self.layers):
            if self._has_params(i):
                layer.init_params(layer_rng(seed, i))
            if hasattr(layer, "init_buffers"):
                layer.init_buffers()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Output for a batch x of shape (N, *input_shape); caches what backward needs."""
        x = np.asarray(x, dtype=self.dtype)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input of shape {x.shape} does not match the model's input "
                             f"shape (N, {', '.join(map(str, self.input_shape))})")
        self.ctx.local_rows = len(x)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: np.ndarray, need_dx: bool = True):
        """Add d(loss)/d(params) into grads; return d(loss)/dx (None if need_dx is False)."""
        dy = np.asarray(dout, dtype=self.dtype)
        stop = 0 if need_dx else self._first_param
        if self._first_param < len(self.layers):
            self.layers[self._first_param].need_dx = need_dx
        for layer in reversed(self.layers[stop:]):
            dy = layer.backward(dy)
        return dy if need_dx else None

    def zero_grad(self, skip_written: bool = False) -> None:
        """Set every gradient the layers are bound to to zero (backward adds); see skip_written below."""
        # skip_written leaves the gradients of layers whose next backward writes them (Linear)
        # as they are, for a backward that follows: one pass over the gradient vector fewer
        for (_, layer), grads in zip(self._param_layers, self._grad_views):
            if not (skip_written and layer.writes_grads):
                for g in grads.values():
                    g.fill(0)
            layer.grads_zero = True

    def train(self):
        """Training mode for every layer (dropout active, batch statistics)."""
        return self._set_mode(True)

    def eval(self):
        """Evaluation mode for every layer (dropout off, running statistics)."""
        return self._set_mode(False)

    def _set_mode(self, training: bool):
        """Set ``training`` on the model and its layers."""
        self.training = training
        for layer in self.layers:
            layer.training = training
        return self

    def describe(self) -> list[str]:
        """One line per layer: index, kind, shapes, options and parameter count."""
        lines = []
        for i, (layer, spec) in enumerate(zip(self.layers, self.specs)):
            (shape_in, shape_out) = self.shapes_io[i]
            count = sum(math.prod(s) for _, s in layer.param_shapes())
            opts = " ".join(f"{k}={v}" for k, v in spec.items() if k != "type")
            lines.append(f"{i:>3} {layer.kind:<11} {str(shape_in):>14} -> {str(shape_out):<14}"
                         f" {count:>10,} params {opts}".rstrip())
        lines.append(f"    total {self.num_params:,} params ({self.dtype.name})")
        return lines
