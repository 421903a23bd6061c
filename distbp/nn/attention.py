"""Causal multi-head self-attention on (N, T, D): one fused q/k/v projection, a masked softmax that is
stable at any logit size, optional attention dropout, an output projection (nanoGPT's CausalSelfAttention)."""

import math

import numpy as np

from .counter_rng import MASK64, dropout_bits
from .embedding import INIT_STD
from .layers import Context, Layer, check_spec, register, spec_value
from .threads import matmul as mm


def causal_mask(T: int) -> np.ndarray:
    """(T, T) True where position t may not look (the future, s > t)."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def masked_softmax(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis with masked entries exactly 0, in place on s (rows keep the diagonal)."""
    s[..., mask] = -np.inf
    s -= s.max(axis=-1, keepdims=True)  # the diagonal is never masked: every row's max is finite
    np.exp(s, out=s)                    # exp(-inf) = 0 exactly, so later tokens add exact zeros
    s /= s.sum(axis=-1, keepdims=True)
    return s


@register("causal_self_attention")
class CausalSelfAttention(Layer):
    """y = proj(concat_h softmax(q_h k_h^T / sqrt(d_h) + causal mask) v_h), q, k, v = x W_qkv + b_qkv.

    W_qkv (D, 3D) holds q, k, v side by side (torch's in_proj_weight.T), each split into ``heads``
    slices of D / heads; W_proj (D, D). Attention dropout draws its mask like Dropout, from
    (seed, step, layer index, global row, (head, t, s)), so a row gets it on any rank.
    """

    private_output = True
    private_dx = True

    def __init__(self, T: int, D: int, heads: int, dropout: float = 0.0, bias: bool = True, index: int = 0,
                 seed: int = 0):
        if D % heads:
            raise ValueError(f"causal_self_attention: width {D} is not divisible by heads={heads}")
        self.T, self.D, self.H, self.p, self.bias = T, D, heads, dropout, bias
        self.index, self.seed = index, seed
        self.out_shape = (T, D)
        self.mask = causal_mask(T)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "causal_self_attention", "heads": 4[, "dropout": 0.0, "bias": true]} on (T, D)."""
        check_spec(spec, index, ("heads", "dropout", "bias"))
        if len(in_shape) != 2:
            raise ValueError(f"layer {index} (causal_self_attention) needs (T, D) inputs but gets shape "
                             f"{tuple(in_shape)}; put it after an embedding")
        T, D = in_shape
        heads = spec_value(spec, index, "heads", int, ok=lambda v: v >= 1 and D % v == 0,
                           want=f">= 1 dividing the width {D}")
        p = spec_value(spec, index, "dropout", float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
        return cls(T, D, heads, p, spec_value(spec, index, "bias", bool, True), index, seed)

    def param_shapes(self) -> list:
        """W_qkv (D, 3D), b_qkv (3D,), W_proj (D, D), b_proj (D,); no biases with bias = false."""
        D = self.D
        shapes = [("W_qkv", (D, 3 * D)), ("b_qkv", (3 * D,)), ("W_proj", (D, D)), ("b_proj", (D,))]
        return shapes if self.bias else [s for s in shapes if s[0].startswith("W")]

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views by name."""
        self.W_qkv, self.dW_qkv, self.W_proj, self.dW_proj = (params["W_qkv"], grads["W_qkv"], params["W_proj"],
                                                              grads["W_proj"])
        self.b_qkv, self.db_qkv = params.get("b_qkv"), grads.get("b_qkv")
        self.b_proj, self.db_proj = params.get("b_proj"), grads.get("b_proj")

    def init_params(self, rng: np.random.Generator) -> None:
        """Weights ~ N(0, 0.02^2) as GPT-2, biases 0."""
        for W in (self.W_qkv, self.W_proj):
            W[...] = rng.normal(0.0, INIT_STD, size=W.shape)
        for b in (self.b_qkv, self.b_proj):
            if b is not None:
                b[...] = 0

    def _heads(self, a2: np.ndarray, n: int) -> np.ndarray:
        """(N*T, D) -> (N, H, T, D/H)."""
        return a2.reshape(n, self.T, self.H, self.D // self.H).transpose(0, 2, 1, 3)

    def _keep(self, n: int, dtype) -> np.ndarray | None:
        """The attention dropout's scaled keep mask (N, H, T, T), or None when it is off."""
        if not self.training or self.p == 0:
            return None
        ctx = self.ctx or Context()
        bits = dropout_bits(self.seed, ctx.step, self.index, ctx.rows_for(n), self.H * self.T * self.T)
        keep = bits >= np.uint64(min(math.ceil(self.p * 2.0**64), MASK64))
        return np.multiply(keep.reshape(n, self.H, self.T, self.T), 1.0 / (1.0 - self.p), dtype=dtype)

    def forward(self, x):
        """Attention of every position over itself and the earlier ones."""
        n = len(x)
        self.x2 = x.reshape(n * self.T, self.D)                          # (N*T, D)
        qkv = mm(self.x2, self.W_qkv)                                    # (N*T, 3D)
        if self.b_qkv is not None:
            qkv += self.b_qkv
        q, k, v = (self._heads(a, n) for a in np.split(qkv, 3, axis=1))  # (N, H, T, d) each
        scale = 1.0 / math.sqrt(self.D // self.H)
        p = masked_softmax(mm(q, k.transpose(0, 1, 3, 2)) * scale, self.mask)  # (N, H, T, T)
        self.keep = self._keep(n, x.dtype)
        pd = p if self.keep is None else p * self.keep
        a = mm(pd, v)                                                    # (N, H, T, d)
        self.a2 = a.transpose(0, 2, 1, 3).reshape(n * self.T, self.D)    # (N*T, D), heads side by side
        y = mm(self.a2, self.W_proj)
        if self.b_proj is not None:
            y += self.b_proj
        self.q, self.k, self.v, self.p_att, self.pd, self.scale = q, k, v, p, pd, scale
        return y.reshape(n, self.T, self.D)

    def backward(self, dy):
        """Add the four gradients; return dx (None if need_dx is off)."""
        n = len(dy)
        dy2 = dy.reshape(n * self.T, self.D)
        self.dW_proj += mm(self.a2.T, dy2)
        if self.db_proj is not None:
            self.db_proj += dy2.sum(axis=0)
        da = self._heads(mm(dy2, self.W_proj.T), n)                       # (N, H, T, d)
        dv = mm(self.pd.transpose(0, 1, 3, 2), da)
        dp = mm(da, self.v.transpose(0, 1, 3, 2))                         # (N, H, T, T)
        if self.keep is not None:
            dp *= self.keep
        p = self.p_att
        ds = dp - (dp * p).sum(axis=-1, keepdims=True)                    # softmax backward; masked p = 0
        ds *= p
        ds *= self.scale
        dq, dk = mm(ds, self.k), mm(ds.transpose(0, 1, 3, 2), self.q)
        dqkv = np.concatenate([g.transpose(0, 2, 1, 3).reshape(n * self.T, self.D) for g in (dq, dk, dv)], axis=1)
        self.dW_qkv += mm(self.x2.T, dqkv)
        if self.db_qkv is not None:
            self.db_qkv += dqkv.sum(axis=0)
        if not self.need_dx:
            return None
        return mm(dqkv, self.W_qkv.T).reshape(n, self.T, self.D)
