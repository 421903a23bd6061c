"""Sequential model whose parameters and gradients are views into one flat vector each.

Layout: layers in spec order, and within a layer its ``param_shapes()`` order (Linear:
W then b); a block's sub-layers follow depth-first in spec order (a residual's body before
its shortcut, a concat's branches in order; see nn/blocks.py). Each parameter has the
stable name ``"{layer path}.{kind}.{pname}"`` (``0.linear.W``, ``0.linear.b``,
``2.linear.W``, ``3.residual.body.0.conv2d.W``, ...) and occupies ``offsets[name]``
= (start, stop) of ``params`` and ``grads``. Non-trained state (BatchNorm running
statistics) lives the same way in the separate ``buffers`` vector.
"""

import math
import os

import numpy as np

from .blocks import Chain, own_shapes, walk
from .init import layer_rng
from .layers import Context, activation_names


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


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; the physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(num_params: int, num_buffers: int, activations: int, rows: int, dtype: np.dtype):
    """Raise ValueError, before anything is allocated, if parameters, gradients and a pass of `rows` rows
    (`activations` values per row, kept for backward and matched by their gradients) exceed the memory."""
    itemsize = np.dtype(dtype).itemsize
    need = (2 * num_params + num_buffers + 2 * rows * activations) * itemsize
    memory = available_memory()
    if need > memory:
        raise ValueError(f"the model has {num_params:,} parameters and {activations:,} activations per row: "
                         f"{need / 2**30:,.1f} GiB for parameters, gradients and a pass of {rows} rows in "
                         f"{np.dtype(dtype).name}, more than the {memory / 2**30:,.1f} GiB of memory available; "
                         "HINT: use fewer or narrower layers, or fewer rows per batch")


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

    def __init__(self, specs, input_shape, dtype=np.float32, seed: int = 0, rows: int = 0):
        """rows: the rows of a forward pass the model must fit in memory beside its parameters (checked before
        any allocation)."""
        self.dtype, self.rows = np.dtype(dtype), rows
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype={self.dtype} is not supported; use float32 or float64")
        self.specs = [dict(s) for s in specs]
        shape = (input_shape,) if np.ndim(input_shape) == 0 else input_shape
        self.input_shape = tuple(int(d) for d in shape)
        self.seed = seed
        self.ctx = Context()
        self.chain = Chain.build(self.specs, self.input_shape, seed)
        self.layers, self.shapes_io, self.out_shape = self.chain.layers, self.chain.shapes_io, self.chain.out_shape
        # every layer and sub-layer, depth-first: (path, key, layer); the flat vectors follow this order
        self.units = [u for i, layer in enumerate(self.layers) for u in walk(layer, str(i), (i,))]
        self._bind()
        self.chain.link(False, False, None, self.ctx)  # the input is the caller's, dout the loss's: keep both
        self.init_params(seed)
        self.train()

    def _bind(self):
        """Allocate the flat vectors and hand every layer and sub-layer its views."""
        def entries(method):
            return [(f"{path}.{layer.kind}.{p}", s) for path, _, layer in self.units
                    for p, s in own_shapes(layer, method)]

        self.layout = FlatLayout(entries("param_shapes"))
        self.buffer_layout = FlatLayout(entries("buffer_shapes"))
        check_fits(self.layout.size, self.buffer_layout.size, sum(math.prod(o) for _, o in self.shapes_io),
                   self.rows, self.dtype)
        self.params = np.zeros(self.layout.size, self.dtype)
        self.grads = np.zeros(self.layout.size, self.dtype)
        self.buffers = np.zeros(self.buffer_layout.size, self.dtype)
        self._param_layers = [(path, layer) for path, _, layer in self.units if own_shapes(layer, "param_shapes")]
        self._param_views = self.layer_views(self.params)
        self.bind_grads(self.layer_views(self.grads))
        bv = self.buffer_views(self.buffers)
        for path, _, layer in self.units:
            bnames = [p for p, _ in own_shapes(layer, "buffer_shapes")]
            if bnames:
                layer.bind_buffers({p: bv[f"{path}.{layer.kind}.{p}"] for p in bnames})

    def layer_views(self, flat: np.ndarray) -> list[dict]:
        """Views into a params-shaped flat vector: {parameter: view} for each (sub-)layer with parameters."""
        v = self.views(flat)
        return [{p: v[f"{path}.{layer.kind}.{p}"] for p, _ in own_shapes(layer, "param_shapes")}
                for path, layer in self._param_layers]

    def bind_grads(self, grads: list[dict]) -> None:
        """Point the layers' gradients at grads (layer_views of a flat vector); backward writes there."""
        for (_, layer), params, g in zip(self._param_layers, self._param_views, grads, strict=True):
            layer.bind(params, g)
        self._grad_views = grads

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
        """Fill params from seed alone (layer i draws from a generator of (seed, i), a block's
        c-th sub-layer from (seed, i, c), and so on down); reset buffers."""
        for _, key, layer in self.units:
            if own_shapes(layer, "param_shapes"):
                layer.init_params(layer_rng(seed, key))
            if hasattr(layer, "init_buffers"):
                layer.init_buffers()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Output for a batch x of shape (N, *input_shape); caches what backward needs."""
        x = np.asarray(x)
        if not (x.dtype.kind in "iu" and self.layers and getattr(self.layers[0], "takes_ids", False)):
            x = x.astype(self.dtype, copy=False)  # token ids stay integers for an embedding
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input of shape {x.shape} does not match the model's input "
                             f"shape (N, {', '.join(map(str, self.input_shape))})")
        self.ctx.local_rows = len(x)
        return self.chain.forward(x)

    def backward(self, dout: np.ndarray, need_dx: bool = True, after_layer=None):
        """Add d(loss)/d(params) into grads; return d(loss)/dx (None if need_dx is False).

        after_layer(i), if given, is called once top-level layer i's backward is done (its gradients final)."""
        return self.chain.backward(np.asarray(dout, dtype=self.dtype), need_dx, after_layer)

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
        for _, _, layer in self.units:
            layer.training = training
        return self

    def describe(self) -> list[str]:
        """One line per layer, a block's sub-layers indented under it: index, kind, shapes, options, parameters."""
        lines = _describe(self.chain, self.specs, "")
        lines.append(f"    total {self.num_params:,} params ({self.dtype.name})")
        return lines


def _describe(chain, specs: list, indent: str) -> list[str]:
    """describe()'s lines for a chain and, indented, the chains of its blocks."""
    lines = []
    for i, (layer, spec) in enumerate(zip(chain.layers, specs)):
        (shape_in, shape_out) = chain.shapes_io[i]
        count = sum(math.prod(s) for _, _, sub in walk(layer, "", ()) for _, s in own_shapes(sub, "param_shapes"))
        opts = " ".join(f"{k}={v}" for k, v in spec.items()
                        if k != "type" and not (isinstance(v, list) and v and isinstance(v[0], list | dict)))
        lines.append(f"{indent}{i:>3} {layer.kind:<11} {str(shape_in):>14} -> {str(shape_out):<14}"
                     f" {count:>10,} params {opts}".rstrip())
        for name, sub in getattr(layer, "chains", lambda: [])():
            lines.append(f"{indent}      {name}:" + ("" if sub.layers else " identity"))
            specs_of = getattr(layer, "chain_specs", {})  # a block that writes its own specs (transformer_block)
            lines += _describe(sub, specs_of.get(name) or _specs_at(spec, name), indent + "      ")
    return lines


def _specs_at(spec: dict, name: str) -> list:
    """The spec list of a block's chain by name: spec["body"], or spec["branches"][1] for "branches.1"."""
    key, *rest = name.split(".")
    value = spec.get(key, [])
    for r in rest:
        value = value[int(r)]
    return value


def _natural(name: str) -> list:
    """Sort key of a dotted name with its numbers compared as numbers (2 before 10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def name_tree(names) -> list[tuple[int, str, str | None]]:
    """(depth, label, full name or None for a heading) lines that show parameter names as the block tree:
    "3.residual.body.0.conv2d.W" is leaf "0.conv2d.W" under heading "body" under heading "3.residual"."""
    lines, open_heads = [], []
    for name in sorted(names, key=_natural):
        t = name.split(".")
        heads, i = [], 0
        while len(t) - i > 3:  # a block: its index and kind, then a chain name and the child's index
            heads.append(".".join(t[i : i + 2]))
            j = i + 3
            while j + 1 < len(t) and t[j].isdigit() and t[j + 1].isdigit():
                j += 1
            heads.append(".".join(t[i + 2 : j]))
            i = j
        shared = next((k for k, (a, b) in enumerate(zip(open_heads, heads)) if a != b), min(len(open_heads), len(heads)))
        lines += [(k, heads[k], None) for k in range(shared, len(heads))]
        open_heads = heads
        lines.append((len(heads), ".".join(t[i:]), name))
    return lines
