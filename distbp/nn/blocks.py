"""Container layers: Chain (layers in order), Block (a layer owning chains), Residual and Concat.

A block's sub-layers are ordinary layers built from nested spec lists; the model walks them
depth-first (``walk``) to lay their parameters into its one flat vector, named by their path:
``3.residual.body.0.conv2d.W`` is parameter W of layer 0 of the body of the residual block
that is layer 3. ``Fork`` runs every chain on the same input and joins the outputs; its
backward SUMS the chains' input gradients (a fan-out adds, never assigns).
"""

import functools

import numpy as np

from .init import default_init
from .layers import Activation, Layer, ReLU, check_spec, layer_class, register

FUSE_RELU = True  # a layer that can rectifies its own output when a ReLU follows it (tests turn it off to compare)


class Chain:
    """Layers applied in order (a model's stack, a residual's body): forward, backward and the copy-saving links."""

    def __init__(self, layers: list, in_shape: tuple, shapes_io: list):
        self.layers, self.in_shape, self.shapes_io = layers, tuple(in_shape), shapes_io
        self.out_shape = shapes_io[-1][1] if layers else self.in_shape
        self.first_param = next((j for j, layer in enumerate(layers) if has_params(layer)), len(layers))

    @classmethod
    def build(cls, specs: list, in_shape: tuple, seed: int, prefix: str = "") -> "Chain":
        """Build specs in order from inputs of shape in_shape; layer j's index is j, or "{prefix}.{j}" inside a block."""
        layers, shapes_io, shape = [], [], tuple(in_shape)
        for j, spec in enumerate(specs):
            index = f"{prefix}.{j}" if prefix else j
            try:
                kind = layer_class(spec.get("type"))
            except ValueError as e:
                raise ValueError(f"layer {index}: type {spec.get('type')!r} {e}") from None
            layer = kind.build(spec, shape, index, seed)
            if hasattr(layer, "tie"):  # a layer sharing an earlier layer's weight (tied_output)
                layer.tie(layers)
            shapes_io.append((shape, tuple(layer.out_shape)))
            layers.append(layer)
            shape = tuple(layer.out_shape)
        return cls(layers, in_shape, shapes_io)

    @property
    def private_output(self) -> bool:
        """Whether forward returns a fresh array no one keeps (its last layer's private_output)."""
        return bool(self.layers) and bool(self.layers[-1].private_output)

    @property
    def private_dx(self) -> bool:
        """Whether backward returns a fresh array (its first layer's private_dx)."""
        return bool(self.layers) and bool(self.layers[0].private_dx)

    def link(self, overwrite_x: bool, overwrite_dy: bool, after: str | None, ctx) -> None:
        """Set each layer's ctx, default init and overwrite flags from its neighbours; the ends get the
        caller's flags, ``after`` is the activation that follows the chain. Recurses into blocks."""
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers):
            layer.ctx = ctx
            nxt = self._next_activation(j, after)
            if getattr(layer, "init", "") is None:
                layer.init = default_init(nxt)
            layer.overwrite_x = bool(self.layers[j - 1].private_output) if j > 0 else overwrite_x
            layer.overwrite_dy = bool(self.layers[j + 1].private_dx) if j < last else overwrite_dy
            if isinstance(layer, Block):
                layer.link(nxt, ctx)
        self.fuse_relu()

    def fuse_relu(self) -> None:
        """Let a layer with ``fuses_relu()`` true (Conv2D, BatchNorm, Linear with a bias) apply the ReLU after it
        in its own last pass over each block of output, and mask dy in its backward when it ``masks_dy``."""
        for layer, nxt in zip(self.layers, self.layers[1:] + [None]):
            fusable = getattr(layer, "fuses_relu", None)
            fuse = FUSE_RELU and type(nxt) is ReLU and nxt.overwrite_x and fusable is not None and fusable()
            if fusable is not None:
                layer.relu = fuse
            if type(nxt) is ReLU:
                nxt.fused = layer if fuse else None
            if fuse and layer.masks_dy:  # dy passes the ReLU untouched: its overwrite rule holds for the mask
                layer.overwrite_dy = nxt.overwrite_dy

    def _next_activation(self, j: int, after: str | None) -> str | None:
        """Kind of the activation after layer j, before the next initialised layer or block; ``after`` past the end."""
        for layer in self.layers[j + 1:]:
            if isinstance(layer, Activation):
                return layer.kind
            if hasattr(layer, "init") or isinstance(layer, Block):
                return None
        return after

    def forward(self, x):
        """The layers applied in order."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, need_dx: bool = True, after_layer=None):
        """Backward through the layers in reverse; without need_dx stop at the first layer with parameters.
        after_layer(i), if given, runs once layer i's backward is done (train.overlap starts buckets there);
        a layer may call it earlier, after_layer(i, n) once its first n gradient values are final and
        after_layer(i) once all are, before its dx product (Layer.after_grads)."""
        stop = 0 if need_dx else self.first_param
        if self.first_param < len(self.layers):
            self.layers[self.first_param].need_dx = need_dx
        for i in range(len(self.layers) - 1, stop - 1, -1):
            layer = self.layers[i]
            layer.after_grads = functools.partial(after_layer, i) if after_layer else None
            dy = layer.backward(dy)
            layer.after_grads = None
            if after_layer:
                after_layer(i)
        return dy if need_dx else None


class Block(Layer):
    """Base of container layers: a layer whose work is done by sub-layers held in named chains.

    A subclass builds its chains in ``build`` with ``Chain.build(specs, shape, seed, f"{index}.{kind}.{name}")``
    and lists them in ``chains()``; the model binds, initialises and switches train/eval on the
    sub-layers itself (see ``walk``), so a block implements only build, chains, forward and backward.
    """

    def chains(self) -> list[tuple[str, Chain]]:
        """(name, chain) pairs in parameter order, e.g. [("body", ...), ("shortcut", ...)]."""
        raise NotImplementedError

    def children(self) -> list[tuple[str, Layer]]:
        """(name within the block, sub-layer) in parameter order: "body.0", "body.1", "shortcut.0", ..."""
        return [(f"{name}.{j}", layer) for name, chain in self.chains() for j, layer in enumerate(chain.layers)]

    def link(self, after: str | None, ctx) -> None:
        """Link every chain: its first layer never overwrites x and its last never overwrites dy (both are shared)."""
        for _, chain in self.chains():
            chain.link(False, False, after, ctx)


def has_params(layer) -> bool:
    """Whether the layer or any of its sub-layers owns a trained parameter."""
    return any(own_shapes(sub, "param_shapes") for _, _, sub in walk(layer, "", ()))


def own_shapes(layer, method: str) -> list:
    """(name, shape) pairs from a layer's own param_shapes/buffer_shapes, [] if it has none."""
    get = getattr(layer, method, None)
    return list(get()) if get else []


def walk(layer, path: str, key: tuple):
    """(path, key, layer) for the layer and, depth-first in parameter order, all its sub-layers.

    A sub-layer's path is "{block path}.{block kind}.{child name}" and its key the block's key
    plus its position among the block's children (the init generator's seed; see Sequential).
    """
    yield path, key, layer
    if isinstance(layer, Block):
        for c, (name, child) in enumerate(layer.children()):
            yield from walk(child, f"{path}.{layer.kind}.{name}", key + (c,))


def layer_list(spec: dict, index, key: str, default=None) -> list:
    """spec[key] as a list of layer tables (default when absent and given); else ValueError naming the block."""
    specs = spec.get(key, default)
    if not (isinstance(specs, list) and all(isinstance(s, dict) for s in specs)):
        got = "missing" if specs is None else repr(specs)
        raise ValueError(f"layer {index} ({spec.get('type')}): {key}={got} must be a list of layer tables, "
                         f'e.g. {key} = [{{ type = "conv2d", out_channels = 16, kernel = 3, padding = 1 }}]')
    return specs


def nested_specs(specs: list, prefix: str = ""):
    """(path, spec) for every layer spec and, depth-first, the specs nested in its lists of layers."""
    for j, spec in enumerate(specs):
        path = f"{prefix}.{j}" if prefix else str(j)
        yield path, spec
        for key, value in spec.items():
            if isinstance(value, list) and value and all(isinstance(s, dict) for s in value):
                yield from nested_specs(value, f"{path}.{spec.get('type')}.{key}")
            elif isinstance(value, list) and value and all(isinstance(s, list) for s in value):
                for b, branch in enumerate(value):
                    if all(isinstance(s, dict) for s in branch):
                        yield from nested_specs(branch, f"{path}.{spec.get('type')}.{key}.{b}")


def _sum(arrays: list, private: list):
    """Sum of the arrays in order, written into the first private one (fresh, kept by no one), else into a new array."""
    first = next((i for i, p in enumerate(private) if p), None)
    if first is None:
        total, rest = np.add(arrays[0], arrays[1]), arrays[2:]
    else:
        total, rest = arrays[first], arrays[:first] + arrays[first + 1:]
    for a in rest:
        total += a
    return total


class Fork(Block):
    """A block that runs each chain on the same x and joins their outputs; backward adds the chains' dx.

    Both results are fresh arrays (a sum or a join), so the neighbours may overwrite them.
    """

    private_output = True
    private_dx = True

    def __init__(self, paths: list[tuple[str, Chain]], out_shape: tuple):
        self.paths, self.out_shape = paths, tuple(out_shape)

    def chains(self) -> list[tuple[str, Chain]]:
        """The paths in order."""
        return self.paths

    def forward(self, x):
        """join(chain(x) for each chain)."""
        return self.join([chain.forward(x) for _, chain in self.paths])

    def backward(self, dy):
        """dx = sum over the chains of chain.backward(its part of dy); None without need_dx."""
        dxs = [chain.backward(d, self.need_dx) for (_, chain), d in zip(self.paths, self.split(dy))]
        if not self.need_dx:
            return None
        return _sum(dxs, [chain.private_dx for _, chain in self.paths])

    def join(self, outs: list):
        """The block's output from the chains' outputs."""
        raise NotImplementedError

    def split(self, dy) -> list:
        """Each chain's output gradient from the block's."""
        raise NotImplementedError


@register("residual")
class Residual(Fork):
    """y = body(x) + shortcut(x); the shortcut is the identity when it has no layers (He et al. 2016)."""

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index, seed: int):
        """Build from {"type": "residual", "body": [...layers...][, "shortcut": [...layers...]]}."""
        check_spec(spec, index, ("body", "shortcut"))
        body_specs = layer_list(spec, index, "body")
        if not body_specs:
            raise ValueError(f"layer {index} ({cls.kind}): body is empty; give it the layers of the residual "
                             'branch, e.g. body = [{ type = "conv2d", out_channels = 16, kernel = 3, padding = 1 }]')
        body = Chain.build(body_specs, in_shape, seed, f"{index}.{cls.kind}.body")
        shortcut = Chain.build(layer_list(spec, index, "shortcut", []), in_shape, seed, f"{index}.{cls.kind}.shortcut")
        if body.out_shape != shortcut.out_shape:
            raise ValueError(_mismatch(f"layer {index} ({cls.kind})", tuple(in_shape), body.out_shape,
                                       shortcut.out_shape, bool(shortcut.layers)))
        return cls([("body", body), ("shortcut", shortcut)], body.out_shape)

    def join(self, outs: list):
        """body(x) + shortcut(x), in place in a private output when there is one."""
        return _sum(outs, [chain.private_output for _, chain in self.paths])

    def split(self, dy) -> list:
        """Both paths receive all of dy (neither may overwrite it)."""
        return [dy, dy]


def _mismatch(where: str, x: tuple, body: tuple, shortcut: tuple, projected: bool) -> str:
    """The message for a residual whose body and shortcut outputs differ, with the fix."""
    if projected:
        return (f"{where}: the body gives shape {body} but the shortcut gives {shortcut}; both must give the "
                f"same shape: make the shortcut's last layer output {body}")
    fix = "a projection shortcut that maps the input to the body's output shape"
    if len(x) == 3 and len(body) == 3 and body[1] and x[1] % body[1] == 0:
        stride = x[1] // body[1]
        fix += (f", e.g. shortcut = [{{ type = \"conv2d\", out_channels = {body[0]}, kernel = 1"
                f"{f', stride = {stride}' if stride > 1 else ''} }}, {{ type = \"batchnorm\" }}]")
    elif len(body) == 1:
        fix += f', e.g. shortcut = [{{ type = "linear", out = {body[0]} }}]'
    return (f"{where}: the body gives shape {body} but the identity shortcut gives the input's {shortcut}; "
            f"a body that changes the shape (a stride of 2, more channels) needs {fix}")


@register("concat")
class Concat(Fork):
    """The branches' outputs joined along the channel (or feature) axis, as torch.cat(dim=1) (Inception)."""

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index, seed: int):
        """Build from {"type": "concat", "branches": [[...layers...], [...layers...], ...]}."""
        check_spec(spec, index, ("branches",))
        branches = spec.get("branches")
        if not (isinstance(branches, list) and len(branches) >= 2 and all(isinstance(b, list) for b in branches)):
            raise ValueError(f"layer {index} ({cls.kind}): branches={branches!r} must be a list of two or more "
                             'lists of layer tables, e.g. branches = [[{ type = "conv2d", out_channels = 8, '
                             'kernel = 1 }], [{ type = "conv2d", out_channels = 8, kernel = 3, padding = 1 }]]')
        paths = []
        for b, specs in enumerate(branches):  # an empty branch is the identity (DenseNet joins x to f(x))
            if not all(isinstance(s, dict) for s in specs):
                raise ValueError(f"layer {index} ({cls.kind}): branch {b} must be a list of layer tables, got {specs!r}")
            paths.append((f"branches.{b}", Chain.build(specs, in_shape, seed, f"{index}.{cls.kind}.branches.{b}")))
        return cls(paths, _joined_shape(f"layer {index} ({cls.kind})", [c.out_shape for _, c in paths]))

    def __init__(self, paths: list[tuple[str, Chain]], out_shape: tuple):
        super().__init__(paths, out_shape)
        ends = np.cumsum([0] + [chain.out_shape[0] for _, chain in paths])
        self.bounds = list(zip(ends[:-1], ends[1:]))

    def join(self, outs: list):
        """A fresh (N, C1 + C2 + ..., ...) array; images keep the batch innermost in memory, as conv outputs do."""
        N, dtype = outs[0].shape[0], outs[0].dtype
        if len(self.out_shape) == 3:
            y = np.empty((*self.out_shape, N), dtype).transpose(3, 0, 1, 2)
        else:
            y = np.empty((N, *self.out_shape), dtype)
        for (a, b), out in zip(self.bounds, outs):
            y[:, a:b] = out
        return y

    def split(self, dy) -> list:
        """Each branch's channels of dy (disjoint views)."""
        return [dy[:, a:b] for a, b in self.bounds]

    def link(self, after: str | None, ctx) -> None:
        """As Block.link, but a branch may overwrite its own (disjoint) part of dy when the block may overwrite dy."""
        for _, chain in self.paths:
            chain.link(False, self.overwrite_dy, after, ctx)


def _joined_shape(where: str, shapes: list) -> tuple:
    """The shape of the branches' outputs joined on axis 0 (channels); ValueError when the other axes differ."""
    first = shapes[0]
    for b, shape in enumerate(shapes[1:], 1):
        if len(shape) != len(first) or shape[1:] != first[1:]:
            spatial = "spatial size" if len(first) == 3 else "shape beyond the channel axis"
            raise ValueError(f"{where}: branch {b} gives shape {shape} but branch 0 gives {first}; concat joins "
                             f"along channels, so every branch must keep the same {spatial}: give the branch "
                             "that changes it stride 1 and padding (kernel - 1) / 2, or use the same stride in "
                             "every branch")
    return (sum(s[0] for s in shapes), *first[1:])
