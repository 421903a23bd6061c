"""Token layers: the embedding of ids (N, T) -> (N, T, D), the learned position embedding, and the output
projection tied to an embedding's table (its gradient the sum of both uses)."""

import numpy as np

from . import threads
from .layers import Layer, check_spec, register, spec_value

INIT_STD = 0.02  # N(0, 0.02) for the tables, as GPT-2 and nanoGPT: unit-variance rows would swamp the residual


def _normal_table(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A table drawn from N(0, INIT_STD^2)."""
    return rng.normal(0.0, INIT_STD, size=shape)


def check_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """ids as an integer array; ValueError naming the first id outside [0, vocab) and where it is."""
    ids = np.asarray(ids)
    if ids.dtype.kind == "f":
        if not np.array_equal(ids, np.floor(ids)):
            raise ValueError("embedding: token ids must be whole numbers")
        ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[at])} at (row, position) {at} is outside [0, {vocab}), the "
                         "embedding's vocabulary")
    return ids


@register("embedding")
class Embedding(Layer):
    """y[n, t] = W[ids[n, t]] with W of shape (vocab, D); backward scatter-adds dy into the rows of dW."""

    private_output = True
    takes_ids = True  # Sequential passes integer inputs through uncast

    def __init__(self, T: int, vocab: int, dim: int):
        self.T, self.vocab, self.dim = T, vocab, dim
        self.out_shape = (T, dim)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "embedding", "vocab": V, "dim": D} on (T,) token ids (vocab: the dataset's)."""
        check_spec(spec, index, ("vocab", "dim"))
        if len(in_shape) != 1:
            raise ValueError(f"layer {index} (embedding) needs (T,) token ids per row but gets shape "
                             f"{tuple(in_shape)}; put it first, on a sequence dataset")
        vocab = spec_value(spec, index, "vocab", int, ok=lambda v: v >= 1, want=">= 1, the number of token ids")
        dim = spec_value(spec, index, "dim", int, ok=lambda v: v >= 1, want=">= 1, the embedding width")
        return cls(in_shape[0], vocab, dim)

    def param_shapes(self) -> list:
        """[("W", (vocab, D))]."""
        return [("W", (self.vocab, self.dim))]

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of the table and its gradient."""
        self.W, self.dW = params["W"], grads["W"]

    def init_params(self, rng: np.random.Generator) -> None:
        """W ~ N(0, 0.02^2)."""
        self.W[...] = _normal_table(rng, self.W.shape)

    def forward(self, x):
        """Rows of W for each id; keeps the ids for backward."""
        self.ids = check_ids(x, self.vocab)        # (N, T)
        return self.W.take(self.ids, axis=0)       # (N, T, D)

    def backward(self, dy):
        """dW[id] += dy at every place of id, summed in a fixed order (never a one-hot matmul); no dx (ids)."""
        ids = self.ids.reshape(-1)
        if ids.size == 0:  # a rank with no rows in this pass
            return None
        order = np.argsort(ids, kind="stable")     # each id's places in row order: the same sum every run
        s = ids[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        # one sum per distinct id: 4x faster than np.add.at's row-by-row adds, the same fixed order
        self.dW[s[starts]] += np.add.reduceat(dy.reshape(-1, self.dim)[order], starts, axis=0)
        return None


@register("position_embedding")
class PositionEmbedding(Layer):
    """y = x + P[:T] with a learned P of shape (T, D), the same for every row."""

    private_dx = False

    def __init__(self, shape: tuple):
        self.out_shape = tuple(shape)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "position_embedding"} on (T, D) inputs."""
        check_spec(spec, index)
        if len(in_shape) != 2:
            raise ValueError(f"layer {index} (position_embedding) needs (T, D) inputs but gets shape "
                             f"{tuple(in_shape)}; put it after an embedding")
        return cls(in_shape)

    def param_shapes(self) -> list:
        """[("W", (T, D))]."""
        return [("W", self.out_shape)]

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of the table and its gradient."""
        self.W, self.dW = params["W"], grads["W"]

    def init_params(self, rng: np.random.Generator) -> None:
        """P ~ N(0, 0.02^2)."""
        self.W[...] = _normal_table(rng, self.W.shape)

    def forward(self, x):
        """x + P, in place when x is a temporary."""
        return np.add(x, self.W, out=x if self.overwrite_x else None)

    def backward(self, dy):
        """dP += sum of dy over rows; dx = dy."""
        self.dW += dy.sum(axis=0)
        return dy


@register("tied_output")
class TiedOutput(Layer):
    """Logits y = x @ E.T (+ b) over the last axis, E the table of the embedding layer named by index.

    No weight of its own: backward adds dy.T @ x into the embedding's gradient, so the table's
    gradient is the sum of both uses (nn.Linear sharing its weight with nn.Embedding in torch).
    """

    private_output = True
    private_dx = True

    def __init__(self, in_shape: tuple, embedding: int, bias: bool, index: int):
        self.in_shape, self.embedding, self.bias, self.index = tuple(in_shape), embedding, bias, index
        self.out_shape = None  # set by tie() from the embedding's vocabulary
        self.table, self.b, self.db = None, None, None

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "tied_output", "embedding": 0[, "bias": false]}."""
        check_spec(spec, index, ("embedding", "bias"))
        emb = spec_value(spec, index, "embedding", int, 0, lambda v: 0 <= v < index,
                         f"in [0, {index}), the index of an earlier embedding layer")
        return cls(in_shape, emb, spec_value(spec, index, "bias", bool, False), index)

    def tie(self, layers: list) -> None:
        """Find the embedding whose table this layer shares; its output shape follows."""
        table = layers[self.embedding]
        if not isinstance(table, Embedding):
            raise ValueError(f"layer {self.index} (tied_output): embedding={self.embedding} is a "
                             f"{table.kind} layer; name the index of an embedding layer")
        if self.in_shape[-1] != table.dim:
            raise ValueError(f"layer {self.index} (tied_output): inputs of width {self.in_shape[-1]} do not "
                             f"match the embedding's dim {table.dim}")
        self.table = table
        self.out_shape = (*self.in_shape[:-1], table.vocab)

    def param_shapes(self) -> list:
        """[("b", (vocab,))] with a bias, else none (the weight is the embedding's)."""
        return [("b", (self.table.vocab,))] if self.bias else []

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of the bias and its gradient."""
        self.b, self.db = params.get("b"), grads.get("b")

    def init_params(self, rng: np.random.Generator) -> None:
        """b = 0."""
        self.b[...] = 0

    def forward(self, x):
        """y = x @ E.T + b over the last axis."""
        self.x = x.reshape(-1, x.shape[-1])                  # (N*T, D)
        y = threads.matmul(self.x, self.table.W.T)           # (N*T, V)
        if self.b is not None:
            y += self.b
        return y.reshape(*x.shape[:-1], self.table.vocab)

    def backward(self, dy):
        """dE += dy.T @ x into the embedding's gradient (read at call time: the step may rebind it); dx = dy @ E."""
        dy2 = dy.reshape(-1, dy.shape[-1])                   # (N*T, V)
        self.table.dW += threads.matmul(dy2.T, self.x)
        if self.db is not None:
            self.db += dy2.sum(axis=0)
        return threads.matmul(dy2, self.table.W).reshape(*dy.shape[:-1], self.table.dim)
