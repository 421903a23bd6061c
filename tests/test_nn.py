"""Layers, initialisation and Sequential: gradients vs finite differences, flat views, dropout."""

import numpy as np
import pytest

from distbp.nn import LAYER_TYPES, Context, Sequential, activation_names, init, make_loss, mlp_specs
from conftest import import_torch, numeric_grad, rel_err

ACTIVATIONS = activation_names()

LAYER_CASES = [
    ({"type": "linear", "out": 4}, (5,)),
    ({"type": "linear", "out": 3, "bias": False}, (4,)),
    ({"type": "relu"}, (6,)),
    ({"type": "leaky_relu", "slope": 0.1}, (6,)),
    ({"type": "leaky_relu", "slope": 0.0}, (6,)),
    ({"type": "tanh"}, (6,)),
    ({"type": "sigmoid"}, (6,)),
    ({"type": "gelu"}, (6,)),
    ({"type": "softplus"}, (6,)),
    ({"type": "softplus", "beta": 2.0, "threshold": 1.0}, (2, 3, 3)),  # some entries on the linear part
    ({"type": "dropout", "p": 0.4}, (7,)),
    ({"type": "dropout", "p": 0.4}, (2, 3, 3)),
]


def away_from_kinks(x):
    """Move entries at least 0.1 away from 0, where ReLU-type derivatives jump."""
    return np.where(x >= 0, x + 0.1, x - 0.1)


def bound_layer(spec, in_shape, rng, overwrite=False):
    """A standalone float64 layer with random parameters in fresh views and a fixed ctx."""
    layer = LAYER_TYPES[spec["type"]].build(spec, in_shape, 2, 11)
    shapes = dict(layer.param_shapes())
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = {k: np.zeros(s) for k, s in shapes.items()}
    if shapes:
        layer.bind(params, grads)
    layer.ctx = Context()
    layer.ctx.step = 5
    layer.overwrite_x = layer.overwrite_dy = overwrite
    return layer, params, grads


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spec,in_shape", LAYER_CASES, ids=lambda v: str(v))
def test_layer_backward_matches_finite_differences(spec, in_shape, overwrite):
    rng = np.random.default_rng(0)
    layer, params, grads = bound_layer(spec, in_shape, rng, overwrite)
    x = away_from_kinks(rng.standard_normal((3, *in_shape)))
    layer.ctx.rows = np.array([7, 2, 9])
    r = rng.standard_normal((3, *layer.out_shape))  # L = sum(y * r), so dL/dy = r

    def loss():
        return float(np.sum(layer.forward(x.copy()) * r))

    y = layer.forward(x.copy() if overwrite else x)
    assert y.shape == (3, *layer.out_shape)
    dx = layer.backward(r.copy() if overwrite else r)
    assert rel_err(dx, numeric_grad(loss, x)) < 1e-6
    for name, p in params.items():
        assert rel_err(grads[name], numeric_grad(loss, p)) < 1e-6, name


@pytest.mark.parametrize("spec,in_shape", LAYER_CASES, ids=lambda v: str(v))
def test_layer_leaves_inputs_alone_unless_allowed(spec, in_shape):
    rng = np.random.default_rng(1)
    layer, _, _ = bound_layer(spec, in_shape, rng)
    x = rng.standard_normal((4, *in_shape))
    dy = rng.standard_normal((4, *layer.out_shape))
    x0, dy0 = x.copy(), dy.copy()
    layer.forward(x)
    layer.backward(dy)
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)


def test_linear_backward_accumulates_and_can_skip_dx():
    rng = np.random.default_rng(2)
    layer, params, grads = bound_layer({"type": "linear", "out": 3}, (4,), rng)
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    layer.forward(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy @ params["W"].T)
    np.testing.assert_allclose(grads["W"], x.T @ dy)
    layer.need_dx = False
    assert layer.backward(dy) is None
    np.testing.assert_allclose(grads["W"], 2 * x.T @ dy)
    np.testing.assert_allclose(grads["b"], 2 * dy.sum(axis=0))


def test_gelu_is_torch_tanh_approximation_values():
    layer = LAYER_TYPES["gelu"].build({"type": "gelu"}, (3,), 0, 0)
    y = layer.forward(np.array([[-3.0, 0.0, 1.0]]))
    c = np.sqrt(2 / np.pi)
    expect = [0.5 * v * (1 + np.tanh(c * (v + 0.044715 * v**3))) for v in (-3.0, 0.0, 1.0)]
    np.testing.assert_allclose(y[0], expect, rtol=1e-15)


def test_sigmoid_is_stable_for_large_inputs():
    layer = LAYER_TYPES["sigmoid"].build({"type": "sigmoid"}, (4,), 0, 0)
    for dtype in (np.float32, np.float64):
        y = layer.forward(np.array([[-1e4, -50.0, 50.0, 1e4]], dtype=dtype))
        assert np.all(np.isfinite(y)) and y[0, 0] == 0 and y[0, 3] == 1 and y.dtype == dtype


def model64(activation, dropout=0.0, sizes=(5, 7, 6, 3), seed=3):
    """A float64 MLP in train mode with a fixed step context."""
    model = Sequential(mlp_specs(list(sizes), activation, dropout), sizes[0], np.float64, seed)
    model.ctx.step = 4
    return model


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_model_flat_gradient_matches_finite_differences(activation, task):
    rng = np.random.default_rng(4)
    model = model64(activation, dropout=0.3)
    model.params += 0.05 * rng.standard_normal(model.num_params)  # non-zero biases too
    x = away_from_kinks(rng.standard_normal((6, 5)))
    y = rng.integers(0, 3, 6) if task == "classification" else rng.uniform(0, 1, (6, 3))
    model.ctx.rows = np.arange(20, 26)
    loss = make_loss(task)

    def total():
        return loss.forward(model.forward(x), y)

    total()
    model.zero_grad()
    dx = model.backward(loss.backward())
    assert rel_err(model.grads, numeric_grad(total, model.params)) < 1e-6
    assert rel_err(dx, numeric_grad(total, x)) < 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_model_is_close_to_float64(activation):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    results = []
    for dtype in (np.float32, np.float64):
        model = Sequential(mlp_specs([5, 16, 16, 3], activation, 0.2), (5,), dtype, seed=7)
        loss = make_loss("classification")
        out = model.forward(x)
        value = loss.forward(out, y)
        model.zero_grad()
        dx = model.backward(loss.backward())
        assert out.dtype == dtype and dx.dtype == dtype and model.grads.dtype == dtype
        results.append((out, value, model.grads.copy(), dx))
    (o32, l32, g32, d32), (o64, l64, g64, d64) = results
    np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5)
    assert abs(l32 - l64) < 1e-4 * abs(l64)
    assert rel_err(g32, g64) < 1e-4 and rel_err(d32, d64) < 1e-4


def test_params_and_grads_are_views_into_flat_vectors():
    model = Sequential(mlp_specs([4, 8, 3], "relu"), 4)
    first, last = model.layers[0], model.layers[2]
    for layer in (first, last):
        for a, flat in ((layer.W, model.params), (layer.b, model.params),
                        (layer.dW, model.grads), (layer.db, model.grads)):
            assert np.shares_memory(a, flat)
    model.params[:] = np.arange(model.num_params)
    assert first.W[0, 1] == 1 and first.b[0] == 32 and last.W[0, 0] == 40
    model.views(model.grads)["2.linear.b"][:] = 9
    assert np.all(last.db == 9) and model.grads[-1] == 9
    assert model.params.flags.c_contiguous and model.params.dtype == np.float32


def test_backward_adds_into_the_flat_grad_vector():
    rng = np.random.default_rng(6)
    model = model64("tanh")
    x, dout = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    model.forward(x)
    model.zero_grad()
    model.backward(dout)
    once = model.grads.copy()
    model.backward(dout)
    np.testing.assert_allclose(model.grads, 2 * once)
    parts = [model.layers[0].dW.ravel(), model.layers[0].db, model.layers[2].dW.ravel()]
    np.testing.assert_array_equal(np.concatenate(parts), model.grads[: sum(p.size for p in parts)])


def test_names_shapes_offsets_follow_spec_order():
    model = Sequential(mlp_specs([4, 8, 8, 3], "relu", 0.1), (4,))
    assert model.names == ["0.linear.W", "0.linear.b", "3.linear.W", "3.linear.b",
                           "6.linear.W", "6.linear.b"]
    assert model.shapes["3.linear.W"] == (8, 8) and model.shapes["6.linear.b"] == (3,)
    assert model.offsets == {"0.linear.W": (0, 32), "0.linear.b": (32, 40),
                             "3.linear.W": (40, 104), "3.linear.b": (104, 112),
                             "6.linear.W": (112, 136), "6.linear.b": (136, 139)}
    assert model.num_params == 139 and model.buffers.size == 0
    flat = np.arange(139.0)
    views = model.views(flat)
    assert all(np.shares_memory(v, flat) for v in views.values())
    np.testing.assert_array_equal(np.concatenate([views[n].ravel() for n in model.names]), flat)
    with pytest.raises(ValueError, match="does not match"):
        model.views(np.zeros(5))


def test_init_depends_on_seed_and_layer_index_only():
    a = Sequential(mlp_specs([4, 8, 3], "relu"), 4, seed=1)
    b = Sequential(mlp_specs([6, 8, 3], "relu"), 6, seed=1)
    c = Sequential(mlp_specs([4, 8, 3], "relu"), 4, seed=1, dtype=np.float64)
    np.testing.assert_array_equal(a.layers[2].W, b.layers[2].W)
    np.testing.assert_allclose(a.params, c.params, rtol=1e-7)
    before = a.params.copy()
    a.params += 1
    a.init_params(1)
    np.testing.assert_array_equal(a.params, before)
    a.init_params(2)
    assert not np.array_equal(a.params, before)
    assert np.all(a.layers[0].b == 0)


def test_default_init_follows_the_activation():
    relu = Sequential(mlp_specs([300, 400, 2], "relu", 0.1), 300)
    tanh = Sequential(mlp_specs([300, 400, 2], "tanh"), 300)
    assert [relu.layers[0].init, relu.layers[3].init] == ["he_normal", "glorot_uniform"]
    assert tanh.layers[0].init == "glorot_uniform"
    assert abs(relu.layers[0].W.std() - np.sqrt(2 / 300)) < 0.01 * np.sqrt(2 / 300)
    assert abs(tanh.layers[0].W.max() - np.sqrt(6 / 700)) < 1e-3
    custom = Sequential([{"type": "linear", "out": 5, "init": "he_uniform"}], 4)
    assert custom.layers[0].init == "he_uniform"


def test_init_functions_have_torch_scales():
    rng = np.random.default_rng(0)
    shape = (400, 600)
    assert abs(init.he_normal(rng, 400, 600, shape).std() - np.sqrt(2 / 400)) < 1e-3
    assert abs(init.glorot_normal(rng, 400, 600, shape).std() - np.sqrt(2 / 1000)) < 1e-3
    assert abs(init.he_uniform(rng, 400, 600, shape).max() - np.sqrt(6 / 400)) < 1e-3
    assert abs(init.glorot_uniform(rng, 400, 600, shape).max() - np.sqrt(6 / 1000)) < 1e-3


def test_dropout_mask_is_independent_of_the_rank_split():
    rng = np.random.default_rng(8)
    model = model64("relu", dropout=0.5)
    x, dout = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    model.ctx.rows = np.arange(100, 112)
    whole = model.forward(x)
    model.zero_grad()
    model.backward(dout)
    whole_grads = model.grads.copy()
    model.zero_grad()
    halves = []
    for lo, hi in ((0, 5), (5, 12)):  # two "ranks" with their global row positions
        model.ctx.rows = np.arange(100 + lo, 100 + hi)
        halves.append(model.forward(x[lo:hi]))
        model.backward(dout[lo:hi])
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    np.testing.assert_allclose(model.grads, whole_grads, rtol=1e-12, atol=1e-14)


def test_dropout_keep_fraction_scale_and_dependence_on_counters():
    layer = LAYER_TYPES["dropout"].build({"type": "dropout", "p": 0.3}, (500,), 1, 9)
    layer.ctx = Context()
    x = np.ones((400, 500), np.float32)
    y = layer.forward(x)
    assert y.dtype == np.float32 and set(np.unique(y)) == {0, np.float32(1 / 0.7)}
    assert abs((y > 0).mean() - 0.7) < 0.005
    mask = layer.keep_mask(400)
    assert abs(mask.mean(axis=0) - 0.7).max() < 0.1 and abs(mask.mean(axis=1) - 0.7).max() < 0.1
    layer.ctx.step = 1
    assert (layer.keep_mask(400) != mask).mean() > 0.3
    other = LAYER_TYPES["dropout"].build({"type": "dropout", "p": 0.3}, (500,), 2, 9)
    assert (other.keep_mask(400) != mask).mean() > 0.3
    layer.ctx.rows = np.arange(1, 401)
    layer.ctx.step = 0
    np.testing.assert_array_equal(layer.keep_mask(400)[:-1], mask[1:])


def test_dropout_eval_is_identity_and_model_modes_propagate():
    rng = np.random.default_rng(9)
    model = model64("relu", dropout=0.5)
    plain = model64("relu")
    plain.params[:] = model.params  # same sizes in the same order, different layer indices
    x = rng.standard_normal((6, 5))
    assert not np.allclose(model.forward(x), plain.forward(x))
    assert model.eval() is model and not any(layer.training for layer in model.layers)
    np.testing.assert_array_equal(model.forward(x), plain.forward(x))
    dout = rng.standard_normal((6, 3))
    model.zero_grad()
    model.backward(dout)
    plain.zero_grad()
    plain.backward(dout)
    np.testing.assert_array_equal(model.grads, plain.grads)
    assert all(layer.training for layer in model.train().layers)


def test_model_does_not_modify_caller_arrays_and_can_skip_dx():
    rng = np.random.default_rng(10)
    model = model64("sigmoid", dropout=0.2)
    x, dout = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    x0, dout0 = x.copy(), dout.copy()
    model.forward(x)
    model.zero_grad()
    dx = model.backward(dout)
    grads = model.grads.copy()
    model.zero_grad()
    assert model.backward(dout, need_dx=False) is None
    np.testing.assert_array_equal(model.grads, grads)
    assert model.backward(dout).shape == dx.shape
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, dout0)


def test_small_mlp_learns_with_gradient_descent():
    rng = np.random.default_rng(11)
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = rng.integers(0, 3, 300)
    x = centers[y] + 0.5 * rng.standard_normal((300, 2))
    model = Sequential(mlp_specs([2, 16, 3], "tanh"), 2, seed=0)
    loss = make_loss("classification")
    history = []
    for step in range(100):
        model.ctx.step = step
        out = model.forward(x)
        history.append(loss.forward(out, y) / len(x))
        model.zero_grad()
        model.backward(loss.backward() / len(x), need_dx=False)
        model.params -= 0.5 * model.grads
    assert history[-1] < 0.3 * history[0]
    assert loss.correct(model.forward(x), y) > 0.95 * len(x)


def test_bad_specs_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown type 'dense'"):
        Sequential([{"type": "dense", "out": 3}], 4)
    with pytest.raises(ValueError, match="unknown key"):
        Sequential([{"type": "linear", "out": 3, "units": 3}], 4)
    with pytest.raises(ValueError, match="flat input"):
        Sequential([{"type": "linear", "out": 3}], (1, 4, 4))
    with pytest.raises(ValueError, match=r"p=1.0 must be a float in \[0, 1\)"):
        Sequential([{"type": "dropout", "p": 1.0}], 4)
    with pytest.raises(ValueError, match="activation='swish'"):
        mlp_specs([4, 3, 2], "swish")
    model = Sequential(mlp_specs([4, 3, 2], "relu", 0.5), 4)
    with pytest.raises(ValueError, match="does not match the model's input shape"):
        model.forward(np.zeros((2, 5)))
    model.ctx.rows = np.arange(3)
    with pytest.raises(ValueError, match="ctx.rows has 3 entries"):
        model.forward(np.zeros((2, 4)))


@pytest.mark.parametrize("spec, match", [
    ({"type": "linear", "out": [10]}, r"out=\[10\] must be an int >= 1"),
    ({"type": "linear", "out": 10.9}, "out=10.9 must be an int"),
    ({"type": "linear", "out": 10, "bias": "false"}, "bias='false' must be a bool"),
    ({"type": "linear", "out": 10, "init": "he"}, "init='he' must be a str in"),
    ({"type": "linear"}, "out=missing must be an int"),
    ({"type": "dropout", "p": [0.1]}, r"p=\[0.1\] must be a float"),
    ({"type": "leaky_relu", "slope": "0.1"}, "slope='0.1' must be a float"),
    ({"type": "softplus", "beta": 0}, "beta=0 must be a float > 0"),
    ({"type": "softplus", "threshold": float("inf")}, "threshold=inf must be a float that is finite"),
])
def test_spec_values_of_the_wrong_type_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        Sequential([spec], 4)


def test_softplus_matches_torch_beta_and_threshold():
    torch = import_torch()
    x = np.linspace(-30, 30, 241).reshape(1, -1)  # both sides of beta x = threshold
    for beta, threshold in [(1.0, 20.0), (2.0, 5.0), (0.5, 1.0)]:
        model = Sequential([{"type": "softplus", "beta": beta, "threshold": threshold}], x.shape[1],
                           dtype=np.float64)
        t_x = torch.tensor(x, requires_grad=True)
        t_y = torch.nn.Softplus(beta, threshold)(t_x)
        t_y.backward(torch.ones_like(t_y))
        np.testing.assert_allclose(model.forward(x), t_y.detach().numpy(), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(model.backward(np.ones_like(x)), t_x.grad.numpy(), rtol=1e-12)


def test_context_defaults_and_describe():
    model = Sequential(mlp_specs([4, 3, 2], "gelu", 0.5), 4)
    model.forward(np.zeros((5, 4)))
    assert model.ctx.step == 0 and model.ctx.comm is None and model.ctx.global_rows == 5
    np.testing.assert_array_equal(model.ctx.rows, np.arange(5))
    model.ctx.global_rows = 64
    assert model.ctx.global_rows == 64
    lines = model.describe()
    assert len(lines) == len(model.layers) + 1 and "dropout" in lines[2] and "p=0.5" in lines[2]
    assert "23 params" in lines[-1]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_torch_on_the_same_weights(activation):
    torch = import_torch()
    rng = np.random.default_rng(12)
    model = model64(activation, sizes=(5, 9, 8, 4))
    model.params += 0.1 * rng.standard_normal(model.num_params)
    x, y = rng.standard_normal((10, 5)), rng.integers(0, 4, 10)
    acts = {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.01), "tanh": torch.nn.Tanh(),
            "sigmoid": torch.nn.Sigmoid(), "gelu": torch.nn.GELU(approximate="tanh"),
            "softplus": torch.nn.Softplus()}
    linears = [layer for layer in model.layers if layer.kind == "linear"]
    modules = []
    for layer in linears:
        lin = torch.nn.Linear(layer.d_in, layer.d_out, dtype=torch.float64)
        lin.weight.data = torch.tensor(layer.W.T.copy())
        lin.bias.data = torch.tensor(layer.b.copy())
        modules += [lin, acts[activation]]
    reference = torch.nn.Sequential(*modules[:-1])
    t_x = torch.tensor(x, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(reference(t_x), torch.tensor(y))
    t_loss.backward()
    loss = make_loss("classification")
    value = loss.forward(model.forward(x), y) / len(x)
    model.zero_grad()
    dx = model.backward(loss.backward() / len(x))
    assert value == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(dx, t_x.grad.numpy(), rtol=1e-9, atol=1e-13)
    for layer, lin in zip(linears, modules[::2]):
        np.testing.assert_allclose(layer.dW, lin.weight.grad.numpy().T, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(layer.db, lin.bias.grad.numpy(), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
def test_a_rank_with_zero_rows_gets_zero_loss_and_grads(task):
    model = Sequential(mlp_specs([4, 6, 3], "relu", 0.5), 4)
    model.ctx.rows = np.zeros(0, np.int64)
    loss = make_loss(task)
    y = np.zeros(0, np.int64) if task == "classification" else np.zeros((0, 3))
    assert loss.forward(model.forward(np.zeros((0, 4))), y) == 0
    model.zero_grad()
    assert model.backward(loss.backward()).shape == (0, 4)
    assert not model.grads.any() and loss.correct(np.zeros((0, 3)), y) == 0


def test_zero_grad_skip_written_gives_the_same_gradient_as_a_full_zeroing():
    rng = np.random.default_rng(12)
    specs = [{"type": "linear", "out": 6}, {"type": "layernorm"}, {"type": "relu"}, {"type": "linear", "out": 3}]
    model = Sequential(specs, (5,), np.float64, 2)
    x, dout = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    model.forward(x)
    model.zero_grad()
    model.backward(dout, need_dx=False)
    want = model.grads.copy()
    model.grads[:] = np.nan  # stale values the skipped layers must overwrite, the others must zero
    model.zero_grad(skip_written=True)
    assert np.isnan(model.views(model.grads)["0.linear.W"]).all()
    assert not np.isnan(model.views(model.grads)["1.layernorm.W"]).any()
    model.forward(x)
    model.backward(dout, need_dx=False)
    np.testing.assert_array_equal(model.grads, want)
