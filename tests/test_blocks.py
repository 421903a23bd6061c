"""Container layers (residual, concat): parameter layout and names, gradients against finite differences and
PyTorch, the copy-saving flags inside blocks, and the build-time shape checks."""
import numpy as np
import pytest

from conftest import import_torch, numeric_grad, rel_err
from distbp.nn import LAYER_TYPES, Layer, Residual, Sequential, register
from distbp.nn.blocks import Chain, Fork, nested_specs
from distbp.nn.resnet import resnet_specs
from torch_twin import flat, twin


def conv(f, k=3, s=1, bias=True):
    return {"type": "conv2d", "out_channels": f, "kernel": k, "stride": s, "padding": (k - 1) // 2, "bias": bias}


IDENTITY = [conv(4), {"type": "relu"},
            {"type": "residual", "body": [conv(4), {"type": "batchnorm"}, {"type": "relu"}, conv(4)]},
            {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out": 3}]
PROJECTION = [conv(4), {"type": "residual", "body": [conv(6, s=2), {"type": "batchnorm"}, {"type": "relu"}, conv(6)],
                        "shortcut": [conv(6, k=1, s=2), {"type": "batchnorm"}]},
              {"type": "relu"}, {"type": "global_avgpool"}, {"type": "flatten"}, {"type": "linear", "out": 3}]
NESTED = [conv(4), {"type": "residual", "body": [
              {"type": "relu"},  # pre-activation: the body's first layer would overwrite x, which the shortcut needs
              {"type": "residual", "body": [conv(4), {"type": "tanh"}]},
              {"type": "concat", "branches": [[conv(2, k=1)], [], [conv(3), {"type": "relu"}]]},
              conv(4, k=1)]},
          {"type": "tanh"}, {"type": "flatten"}, {"type": "linear", "out": 3}]
MLP_BLOCKS = [{"type": "linear", "out": 6}, {"type": "residual", "body": [{"type": "relu"}, {"type": "linear", "out": 6}]},
              {"type": "concat", "branches": [[{"type": "linear", "out": 2}], [{"type": "tanh"}]]},
              {"type": "linear", "out": 3}]
MODELS = {"identity": (IDENTITY, (2, 5, 5)), "projection": (PROJECTION, (2, 6, 6)), "nested": (NESTED, (3, 5, 5)),
          "mlp": (MLP_BLOCKS, (4,))}


def make(name, seed=0):
    """The model, perturbed so BatchNorm's gamma and beta and every bias are non-trivial."""
    specs, shape = MODELS[name]
    model = Sequential(specs, shape, dtype=np.float64, seed=seed)
    model.params += 0.1 * np.random.default_rng(seed + 1).standard_normal(model.num_params)
    return model


def test_parameters_are_views_of_the_flat_vector_in_depth_first_spec_order():
    model = Sequential(NESTED, (3, 5, 5), seed=0)
    assert model.names == [
        "0.conv2d.W", "0.conv2d.b",
        "1.residual.body.1.residual.body.0.conv2d.W", "1.residual.body.1.residual.body.0.conv2d.b",
        "1.residual.body.2.concat.branches.0.0.conv2d.W", "1.residual.body.2.concat.branches.0.0.conv2d.b",
        "1.residual.body.2.concat.branches.2.0.conv2d.W", "1.residual.body.2.concat.branches.2.0.conv2d.b",
        "1.residual.body.3.conv2d.W", "1.residual.body.3.conv2d.b", "4.linear.W", "4.linear.b"]
    inner = model.layers[1].paths[0][1].layers[1].paths[0][1].layers[0]  # 1.residual.body.1.residual.body.0
    assert np.shares_memory(inner.W, model.params) and np.shares_memory(inner.dW, model.grads)
    a, b = model.offsets["1.residual.body.1.residual.body.0.conv2d.W"]
    assert np.array_equal(model.params[a:b], inner.W.ravel())
    assert [path for path, _ in nested_specs(NESTED)][:5] == ["0", "1", "1.residual.body.0", "1.residual.body.1",
                                                               "1.residual.body.1.residual.body.0"]


def test_init_draws_each_sub_layer_from_its_own_key_and_top_level_layers_as_before():
    plain = Sequential([conv(4), {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out": 3}], (2, 5, 5))
    blocks = Sequential(IDENTITY, (2, 5, 5))
    assert np.array_equal(plain.views(plain.params)["0.conv2d.W"], blocks.views(blocks.params)["0.conv2d.W"])
    v = blocks.views(blocks.params)
    assert not np.array_equal(v["2.residual.body.0.conv2d.W"], v["2.residual.body.3.conv2d.W"])
    again = Sequential(IDENTITY, (2, 5, 5))
    assert np.array_equal(again.params, blocks.params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_match_finite_differences(name):
    model = make(name)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, *model.input_shape))
    R = rng.standard_normal((3, *model.out_shape))
    x0 = x.copy()

    def loss():
        return float(np.sum(model.forward(x) * R))
    model.zero_grad()
    model.forward(x)
    dx = model.backward(R.copy())
    assert np.array_equal(x, x0), "forward changed the caller's input"
    assert rel_err(dx, numeric_grad(loss, x)) < 1e-6
    assert rel_err(model.grads.copy(), numeric_grad(loss, model.params)) < 1e-6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_match_torch_forward_and_backward_in_float64(name):
    torch = import_torch()
    model = make(name)
    reference, pairs = twin(model, torch)
    assert [n for n, _, _ in pairs] == model.names
    rng = np.random.default_rng(5)
    x, R = rng.standard_normal((4, *model.input_shape)), rng.standard_normal((4, *model.out_shape))
    t_x = torch.tensor(x, requires_grad=True)
    t_y = reference(t_x)
    (t_y * torch.tensor(R)).sum().backward()
    model.zero_grad()
    y = model.forward(x)
    dx = model.backward(R)
    assert rel_err(y, t_y.detach().numpy()) < 1e-12
    assert rel_err(dx, t_x.grad.numpy()) < 1e-12
    assert rel_err(model.grads, flat(pairs, "grad")) < 1e-12


def test_resnet8_matches_torch_in_float64():
    torch = import_torch()
    model = Sequential(resnet_specs(8, 10, width=4), (3, 16, 16), dtype=np.float64, seed=1)
    model.params += 0.05 * np.random.default_rng(0).standard_normal(model.num_params)
    reference, pairs = twin(model, torch)
    rng = np.random.default_rng(2)
    x, R = rng.standard_normal((5, 3, 16, 16)), rng.standard_normal((5, 10))
    t_x = torch.tensor(x, requires_grad=True)
    (reference(t_x) * torch.tensor(R)).sum().backward()
    model.zero_grad()
    model.forward(x)
    dx = model.backward(R)
    assert rel_err(dx, t_x.grad.numpy()) < 1e-12
    assert rel_err(model.grads, flat(pairs, "grad")) < 1e-12


def test_fan_out_adds_the_gradients_of_both_paths():
    model = Sequential([{"type": "residual", "body": [{"type": "linear", "out": 3, "bias": False}]}], (3,),
                       dtype=np.float64)
    W = model.views(model.params)["0.residual.body.0.linear.W"]
    model.forward(np.ones((1, 3)))
    dy = np.array([[1.0, 2.0, 3.0]])
    assert np.allclose(model.backward(dy), dy @ W.T + dy)  # body's dx plus the identity's, never one of them


def test_copy_saving_flags_inside_blocks():
    model = Sequential(NESTED, (3, 5, 5), dtype=np.float64)
    block = model.layers[1]
    body = block.paths[0][1]
    assert model.layers[0].private_output and not body.layers[0].overwrite_x  # x is shared with the shortcut
    assert not body.layers[-1].overwrite_dy  # dy is shared with the shortcut
    assert body.layers[3].overwrite_x and not body.layers[1].overwrite_x  # inside a chain the neighbour rules hold
    assert block.private_output and block.private_dx and model.layers[2].overwrite_x
    concat = body.layers[2]
    assert all(not chain.layers[0].overwrite_x for _, chain in concat.paths if chain.layers)
    assert all(chain.layers[-1].overwrite_dy == concat.overwrite_dy for _, chain in concat.paths if chain.layers)


def test_need_dx_off_skips_the_layers_before_the_first_parameters_inside_a_block():
    model = make("nested")
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5))
    model.zero_grad()
    model.forward(x)
    want = model.backward(np.ones((2, 3))) is not None and model.grads.copy()
    model.zero_grad()
    model.forward(x)
    assert model.backward(np.ones((2, 3)), need_dx=False) is None
    assert np.array_equal(model.grads, want)


@pytest.mark.parametrize("spec, words", [
    ({"type": "residual", "body": [conv(4, s=2)]},
     ["layer 1 (residual)", "(4, 4, 4)", "(4, 8, 8)", "projection shortcut",
      'shortcut = [{ type = "conv2d", out_channels = 4, kernel = 1, stride = 2 }']),
    ({"type": "residual", "body": []}, ["layer 1 (residual): body is empty"]),
    ({"type": "residual", "body": [conv(4)], "shortcut": [conv(5, k=1)]},
     ["layer 1 (residual)", "shortcut gives (5, 8, 8)", "make the shortcut's last layer output (4, 8, 8)"]),
    ({"type": "concat", "branches": [[conv(2)], [conv(2, s=2)]]},
     ["layer 1 (concat): branch 1 gives shape (2, 4, 4)", "same spatial size", "stride 1"]),
    ({"type": "concat", "branches": [[conv(2)]]}, ["two or more lists"]),
    ({"type": "residual", "body": [{"type": "residual", "body": [{**conv(4), "out_channels": 0}]}]},
     ["layer 1.residual.body.0.residual.body.0 (conv2d)"]),
    ({"type": "residual", "body": [{"type": "residual", "body": [{"type": "nope"}]}]},
     ["layer 1.residual.body.0.residual.body.0: type 'nope'"]),
    ({"type": "residual", "body": {"type": "relu"}}, ["body={'type': 'relu'} must be a list of layer tables"]),
])
def test_bad_blocks_are_refused_naming_the_block_path_and_the_fix(spec, words):
    with pytest.raises(ValueError) as e:
        Sequential([conv(4), spec], (2, 8, 8))
    for w in words:
        assert w in str(e.value)


class ScaledResidual(Fork):
    """A user-written block: y = body(x) + 0.5 x."""

    @classmethod
    def build(cls, spec, in_shape, index, seed):
        body = Chain.build(spec["body"], in_shape, seed, f"{index}.{cls.kind}.body")
        return cls([("body", body)], body.out_shape)

    def join(self, outs):
        return outs[0] + 0.5 * self.x

    def forward(self, x):
        self.x = x
        return super().forward(x)

    def backward(self, dy):
        dx = super().backward(dy)
        return None if dx is None else dx + 0.5 * dy

    def split(self, dy):
        return [dy]


@pytest.fixture
def scaled_residual():
    """ScaledResidual registered for one test: the registry is global, and CONFIG.md lists what it holds."""
    register("scaled_residual")(ScaledResidual)
    yield
    LAYER_TYPES.pop("scaled_residual")


def test_a_user_block_registers_like_a_user_layer(scaled_residual):
    model = Sequential([{"type": "linear", "out": 4},
                        {"type": "scaled_residual", "body": [{"type": "tanh"}, {"type": "linear", "out": 4}]},
                        {"type": "linear", "out": 2}], (3,), dtype=np.float64)
    assert "1.scaled_residual.body.1.linear.W" in model.names
    x, R = np.random.default_rng(0).standard_normal((2, 3)), np.ones((2, 2))

    def loss():
        return float(np.sum(model.forward(x) * R))
    model.zero_grad()
    model.forward(x)
    model.backward(R)
    assert rel_err(model.grads.copy(), numeric_grad(loss, model.params)) < 1e-6
    assert issubclass(ScaledResidual, Layer) and not issubclass(ScaledResidual, Residual)


def test_resnet_depths_and_sizes():
    sizes = {d: Sequential(resnet_specs(d, 10), (3, 32, 32)).num_params for d in (8, 14, 20)}
    assert sizes == {8: 78042, 14: 175258, 20: 272474}  # ResNet-20: 0.27M as in He et al. table 6
    with pytest.raises(ValueError, match="6n"):
        resnet_specs(10, 10)


@pytest.mark.mpi(min_size=2)
def test_a_resnet_split_across_ranks_equals_the_whole_batch(comm):
    """BatchNorm inside the blocks reaches its peers through the shared ctx: the summed local gradients are
    the whole batch's."""
    specs, N = resnet_specs(8, 4, width=4), 7
    whole = Sequential(specs, (3, 8, 8), dtype=np.float64, seed=2)
    part = Sequential(specs, (3, 8, 8), dtype=np.float64, seed=2)
    part.ctx.comm = comm
    rng = np.random.default_rng(3)  # the same global batch on every rank
    x, R = rng.standard_normal((N, 3, 8, 8)), rng.standard_normal((N, 4))
    whole.zero_grad()
    y = whole.forward(x)
    whole.backward(R)
    lo, hi = N * comm.rank // comm.size, N * (comm.rank + 1) // comm.size
    part.ctx.global_rows, part.ctx.rows = N, np.arange(lo, hi)
    part.zero_grad()
    np.testing.assert_allclose(part.forward(x[lo:hi]), y[lo:hi], rtol=1e-10, atol=1e-12)
    part.backward(R[lo:hi])
    grads = part.grads.copy()
    comm.allreduce_sum(grads)
    assert rel_err(grads, whole.grads) < 1e-10
    assert rel_err(part.buffers, whole.buffers) < 1e-12  # the running statistics
