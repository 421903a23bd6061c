"""Sequence layers on (N, T, D): finite differences, PyTorch in float64 to 1e-12, causality bitwise."""
import numpy as np
import pytest

from conftest import bind_random, check_grads, import_torch, numeric_grad, rel_err
from distbp.nn import Sequential, SequenceCrossEntropy
from distbp.nn.attention import CausalSelfAttention, masked_softmax, causal_mask
from distbp.nn.layers import GELU, Context, Dropout, Linear
from distbp.nn.norm import LayerNorm
from distbp.nn.embedding import PositionEmbedding

N, T, D, V, H = 3, 5, 8, 11, 2
TINY_GPT = [{"type": "embedding", "vocab": V, "dim": D}, {"type": "position_embedding"},
            {"type": "transformer_block", "heads": H}, {"type": "layernorm", "dims": 1}, {"type": "tied_output"}]


def attention(rng, dropout=0.0):
    """A bound attention layer in training mode with a step context."""
    layer = CausalSelfAttention(T, D, H, dropout, index=3, seed=7)
    params, grads = bind_random(layer, rng)
    layer.ctx = Context()
    layer.ctx.step = 4
    return layer, params, grads


@pytest.mark.parametrize("layer", [
    lambda: CausalSelfAttention(T, D, H), lambda: PositionEmbedding((T, D)), lambda: Linear(D, 6, lead=(T,)),
    lambda: LayerNorm((T, D), 1, 1e-5), lambda: GELU((T, D), "none"), lambda: GELU((T, D), "tanh"),
    lambda: CausalSelfAttention(T, D, H, 0.3, index=2, seed=1)], ids=["attn", "pos", "linear", "ln", "gelu-erf",
                                                                    "gelu-tanh", "attn-dropout"])
def test_layer_backward_matches_finite_differences(layer):
    rng = np.random.default_rng(0)
    layer = layer()
    layer.ctx = Context()
    params, grads = bind_random(layer, rng)
    check_grads(layer, rng.standard_normal((N, T, D)), params, grads, rng, tol=1e-6)


def model_with_tables(rng):
    """The tiny GPT in float64 with its tables at a visible scale."""
    model = Sequential(TINY_GPT, (T,), dtype=np.float64, seed=3)
    model.params[:] = 0.5 * rng.standard_normal(model.params.size)
    return model


def test_embedding_and_tied_output_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    model = model_with_tables(rng)
    ids = rng.integers(0, V, (N, T))
    R = rng.standard_normal((N, T, V))
    model.zero_grad()
    model.forward(ids)
    model.backward(R, need_dx=False)
    table = model.views(model.params)["0.embedding.W"]
    numeric = numeric_grad(lambda: float(np.sum(model.forward(ids) * R)), table)
    assert rel_err(model.views(model.grads)["0.embedding.W"], numeric) < 1e-7
    numeric_all = numeric_grad(lambda: float(np.sum(model.forward(ids) * R)), model.params)
    assert rel_err(model.grads, numeric_all) < 1e-7


def test_embedding_refuses_ids_outside_the_vocabulary():
    model = Sequential(TINY_GPT, (T,), dtype=np.float64)
    with pytest.raises(ValueError, match=r"token id 11 at \(row, position\) \(1, 2\) is outside \[0, 11\)"):
        model.forward(np.array([[0] * T, [0, 0, 11, 0, 0], [0] * T]))


def test_masked_softmax_is_finite_at_any_logit_size():
    for size in (1e-300, 1.0, 1e4, 1e300):
        s = np.full((T, T), size)
        s[np.arange(T), np.arange(T)] = -size
        p = masked_softmax(s, causal_mask(T))
        assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1) and not p[causal_mask(T)].any()


def torch_attention(torch, x, p, heads, keep=None):
    """nanoGPT's CausalSelfAttention on float64 tensors with distbp's parameters."""
    n, t, d = x.shape
    q, k, v = (x @ p["W_qkv"] + p["b_qkv"]).split(d, dim=-1)
    q, k, v = (a.view(n, t, heads, d // heads).transpose(1, 2) for a in (q, k, v))
    if keep is None:
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        att = (q @ k.transpose(-2, -1)) / (d // heads) ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att * keep) @ v
    return y.transpose(1, 2).reshape(n, t, d) @ p["W_proj"] + p["b_proj"]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_attention_matches_torch(dropout):
    torch = import_torch()
    rng = np.random.default_rng(2)
    layer, params, grads = attention(rng, dropout)
    x, dy = rng.standard_normal((N, T, D)), rng.standard_normal((N, T, D))
    y = layer.forward(x)
    dx = layer.backward(dy)
    t_p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t_x = torch.tensor(x, requires_grad=True)
    keep = None if layer.keep is None else torch.tensor(layer.keep)
    t_y = torch_attention(torch, t_x, t_p, H, keep)
    t_y.backward(torch.tensor(dy))
    assert rel_err(y, t_y.detach().numpy()) < 1e-12
    assert rel_err(dx, t_x.grad.numpy()) < 1e-12
    for k in params:
        assert rel_err(grads[k], t_p[k].grad.numpy()) < 1e-12, k


def test_attention_dropout_masks_follow_the_global_row_not_the_rank():
    rng = np.random.default_rng(3)
    layer, _, _ = attention(rng, 0.5)
    layer.ctx.rows = np.array([4, 5, 6])
    whole = layer._keep(3, np.float64)
    layer.ctx.rows = np.array([5])
    assert np.array_equal(layer._keep(1, np.float64)[0], whole[1])
    assert 0.3 < (whole[:, :, ~causal_mask(T)] > 0).mean() < 0.7


@pytest.mark.parametrize("make", [
    lambda torch: (Linear(D, 6, lead=(T,)), lambda x, p: x @ p["W"] + p["b"]),
    lambda torch: (LayerNorm((T, D), 1, 1e-5),
                   lambda x, p: torch.nn.functional.layer_norm(x, (D,), p["W"], p["b"], 1e-5)),
    lambda torch: (GELU((T, D), "none"), lambda x, p: torch.nn.functional.gelu(x)),
    lambda torch: (GELU((T, D), "tanh"), lambda x, p: torch.nn.functional.gelu(x, approximate="tanh")),
    lambda torch: (PositionEmbedding((T, D)), lambda x, p: x + p["W"]),
], ids=["linear", "layernorm", "gelu-erf", "gelu-tanh", "position"])
def test_last_axis_layers_match_torch(make):
    torch = import_torch()
    rng = np.random.default_rng(4)
    layer, reference = make(torch)
    params, grads = bind_random(layer, rng)
    x, dy = 2 * rng.standard_normal((N, T, D)), rng.standard_normal((N, T, *layer.out_shape[1:]))
    y, dx = layer.forward(x), None
    dx = layer.backward(dy)
    t_p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t_x = torch.tensor(x, requires_grad=True)
    t_y = reference(t_x, t_p)
    t_y.backward(torch.tensor(dy))
    assert rel_err(y, t_y.detach().numpy()) < 1e-12 and rel_err(dx, t_x.grad.numpy()) < 1e-12
    for k in params:
        assert rel_err(grads[k], t_p[k].grad.numpy()) < 1e-12, k


def test_dropout_over_the_last_axis_of_sequences_keeps_its_row_masks():
    layer = Dropout((T, D), 0.5, index=1, seed=2)
    layer.ctx = Context()
    layer.ctx.rows = np.array([0, 1])
    x = np.ones((2, T, D))
    y = layer.forward(x)
    assert set(np.unique(y)) <= {0.0, 2.0} and np.array_equal(layer.backward(x), y)


def torch_gpt(torch, model):
    """The tiny GPT rebuilt in PyTorch (nanoGPT's Block, tanh GELU, tied head) from distbp's parameters."""
    p = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.views(model.params).items()}
    b = "2.transformer_block.layers"

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (D,), p[f"{name}.W"], p[f"{name}.b"], 1e-5)

    def forward(ids):
        x = p["0.embedding.W"][ids] + p["1.position_embedding.W"]
        att = {k: p[f"{b}.0.residual.body.1.causal_self_attention.{k}"] for k in ("W_qkv", "b_qkv", "W_proj", "b_proj")}
        x = x + torch_attention(torch, ln(x, f"{b}.0.residual.body.0.layernorm"), att, H)
        h = ln(x, f"{b}.1.residual.body.0.layernorm") @ p[f"{b}.1.residual.body.1.linear.W"] \
            + p[f"{b}.1.residual.body.1.linear.b"]
        h = torch.nn.functional.gelu(h, approximate="tanh")
        x = x + h @ p[f"{b}.1.residual.body.3.linear.W"] + p[f"{b}.1.residual.body.3.linear.b"]
        return ln(x, "3.layernorm") @ p["0.embedding.W"].T
    return forward, p


def test_tiny_gpt_loss_and_gradients_match_torch():
    torch = import_torch()
    rng = np.random.default_rng(5)
    model = model_with_tables(rng)
    ids, targets = rng.integers(0, V, (N, T)), rng.integers(0, V, (N, T))
    loss = SequenceCrossEntropy()
    model.zero_grad()
    value = loss.forward(model.forward(ids), targets) / N
    dout = loss.backward()
    dout /= N  # the trainer's mean over rows: with T tokens per row, the mean over all tokens
    model.backward(dout, need_dx=False)
    forward, p = torch_gpt(torch, model)
    logits = forward(torch.tensor(ids))
    t_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(targets).reshape(-1))
    t_loss.backward()
    assert abs(value - t_loss.item()) < 1e-12 * abs(value)
    grads = model.views(model.grads)
    for k, v in p.items():
        assert rel_err(grads[k], v.grad.numpy()) < 1e-12, k  # the tied table: the sum of both uses


def test_sequence_accuracy_counts_tokens():
    out = np.zeros((2, 4, 3))
    out[..., 1] = 1
    y = np.array([[1, 1, 0, 0], [1, 2, 2, 2]])
    assert SequenceCrossEntropy().correct(out, y) == 3 / 4


@pytest.mark.parametrize("t", [0, 2, 4])
def test_changing_a_later_token_never_changes_an_earlier_output_bitwise(t):
    rng = np.random.default_rng(6)
    model = Sequential(TINY_GPT[:2] + [{"type": "transformer_block", "heads": H, "attn_dropout": 0.2}] + TINY_GPT[3:],
                       (T,), dtype=np.float32, seed=1)
    ids = rng.integers(0, V, (4, T))
    other = ids.copy()
    other[:, t] = (ids[:, t] + 1 + rng.integers(0, V - 1, 4)) % V
    a, b = model.forward(ids), model.forward(other)
    assert np.array_equal(a[:, :t], b[:, :t])
    assert not np.array_equal(a[:, t:], b[:, t:])


def test_a_rank_without_rows_passes_through_every_layer():
    model = Sequential(TINY_GPT, (T,), dtype=np.float32)
    loss = SequenceCrossEntropy()
    out = model.forward(np.zeros((0, T), np.int64))
    assert out.shape == (0, T, V) and loss.forward(out, np.zeros((0, T), np.int64)) == 0.0
    model.zero_grad()
    model.backward(loss.backward(), need_dx=False)
    assert not model.grads.any()


def test_layernorm_on_sequences_normalizes_each_place_by_default():
    layer = Sequential([{"type": "embedding", "vocab": V, "dim": D}, {"type": "layernorm"}], (T,),
                       dtype=np.float64).layers[1]
    assert layer.axes == (-1,) and layer.norm_shape == (D,)
