"""Conv2D and Flatten (MaxPool2D in a conv stack): naive-loop references and finite-difference gradients."""

import numpy as np
import pytest

from distbp.nn import conv
from distbp.nn.conv import Conv2D
from distbp.nn.pool import MaxPool2D
from distbp.nn.reshape import Flatten
from conftest import bind_random, check_grads, check_model_gradients, import_torch, rel_err


def conv_naive(x, W, b, stride, padding):
    """Direct 7-loop convolution (cross-correlation) for reference."""
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, Wd = x.shape
    F, _, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
    y = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    y[n, f, i, j] = np.sum(xp[n, :, i * sh : i * sh + kh, j * sw : j * sw + kw] * W[f]) + b[f]
    return y


CONV_CASES = [  # spec, in_shape
    ({"out_channels": 4, "kernel": 3, "padding": 1}, (3, 6, 5)),
    ({"out_channels": 2, "kernel": [3, 2], "stride": [2, 1], "padding": [1, 2]}, (2, 7, 5)),
    ({"out_channels": 3, "kernel": 2, "stride": 2}, (1, 5, 5)),
    ({"out_channels": 2, "kernel": 1, "bias": False}, (3, 3, 4)),
    ({"out_channels": 3, "kernel": [2, 3], "padding": [2, 1]}, (2, 4, 5)),  # padding wider than the kernel
    ({"out_channels": 2, "kernel": 3, "stride": [1, 3], "padding": 1}, (2, 5, 8)),
]


@pytest.fixture(params=["views", "row copies", "winograd"])
def conv_path(request, monkeypatch):
    """Run a test on the three ways Conv2D multiplies: kw matmuls on views of the input per output row,
    one matmul on a copy of the row's windows (what thin windows take, see THIN_RATIO), and Winograd's
    F(4x4, 3x3) for every 3x3 stride-1 convolution whatever its channels and type (nn/winograd.py)."""
    ratio = 0 if request.param == "views" else float("inf")
    monkeypatch.setattr(conv, "THIN_RATIO", dict.fromkeys(conv.THIN_RATIO, ratio))
    monkeypatch.setattr(conv, "WINOGRAD_CHANNELS", 1 if request.param == "winograd" else 1 << 30)
    monkeypatch.setattr(conv, "WINOGRAD_DTYPES", (np.dtype(np.float32), np.dtype(np.float64)))
    return request.param


@pytest.mark.parametrize("spec,in_shape", CONV_CASES)
def test_conv2d_forward_matches_naive_loops(spec, in_shape, conv_path):
    rng = np.random.default_rng(0)
    layer = Conv2D.build({"type": "conv2d", **spec}, in_shape, 0, 0)
    params, _ = bind_random(layer, rng)
    x = rng.standard_normal((3, *in_shape))
    b = params.get("b", np.zeros(spec["out_channels"]))
    ref = conv_naive(x, params["W"], b, (layer.sh, layer.sw), (layer.ph, layer.pw))
    y = layer.forward(x)
    assert layer.out_shape == ref.shape[1:]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec,in_shape", CONV_CASES)
def test_conv2d_gradients_match_finite_differences(spec, in_shape, conv_path):
    rng = np.random.default_rng(1)
    layer = Conv2D.build({"type": "conv2d", **spec}, in_shape, 0, 0)
    params, grads = bind_random(layer, rng)
    check_grads(layer, rng.standard_normal((2, *in_shape)), params, grads, rng)


def test_conv2d_backward_adds_into_grads(conv_path):
    rng = np.random.default_rng(2)
    layer = Conv2D.build({"type": "conv2d", "out_channels": 2, "kernel": 3}, (1, 4, 4), 0, 0)
    params, grads = bind_random(layer, rng)
    x, dy = rng.standard_normal((2, 1, 4, 4)), rng.standard_normal((2, 2, 2, 2))
    layer.forward(x)
    layer.backward(dy)
    once = {n: g.copy() for n, g in grads.items()}
    layer.backward(dy)
    for n in grads:
        np.testing.assert_allclose(grads[n], 2 * once[n])


def test_flatten_shapes_and_gradients():
    rng = np.random.default_rng(4)
    layer = Flatten.build({"type": "flatten"}, (2, 3, 4), 0, 0)
    assert layer.out_shape == (24,)
    x = rng.standard_normal((3, 2, 3, 4))
    np.testing.assert_array_equal(layer.forward(x), x.reshape(3, 24))
    check_grads(layer, x, {}, {}, rng)


def test_conv_stack_float32_matches_float64(conv_path):
    rng = np.random.default_rng(5)
    conv = Conv2D.build({"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, (2, 6, 6), 0, 0)
    pool = MaxPool2D.build({"type": "maxpool2d", "kernel": 2}, conv.out_shape, 1, 0)
    flat = Flatten.build({"type": "flatten"}, pool.out_shape, 2, 0)
    params64, grads64 = bind_random(conv, rng)
    x64, dy64 = rng.standard_normal((5, 2, 6, 6)), rng.standard_normal((5, *flat.out_shape))
    out, dx = {}, {}
    for dtype in (np.float64, np.float32):
        grads = {n: np.zeros_like(g, dtype=dtype) for n, g in grads64.items()}
        conv.bind({n: p.astype(dtype) for n, p in params64.items()}, grads)
        y = flat.forward(pool.forward(conv.forward(x64.astype(dtype))))
        d = conv.backward(pool.backward(flat.backward(dy64.astype(dtype))))
        assert y.dtype == d.dtype == grads["W"].dtype == dtype
        out[dtype], dx[dtype] = (y, grads["W"], grads["b"]), d
    for a, b in zip(out[np.float32], out[np.float64]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx[np.float32], dx[np.float64], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec,in_shape,match", [
    ({"type": "conv2d", "kernel": 3}, (1, 8, 8), "out_channels"),
    ({"type": "conv2d", "out_channels": 4, "kernel": 5}, (1, 3, 3), "kernel"),
    ({"type": "conv2d", "out_channels": 4, "kernel": [3]}, (1, 8, 8), "kernel"),
    ({"type": "conv2d", "out_channels": 4, "kernel": 3}, (64,), r"\(C, H, W\)"),
    ({"type": "maxpool2d"}, (1, 8, 8), "kernel"),
    ({"type": "maxpool2d", "kernel": 2, "padding": 1}, (1, 8, 8), "unknown key"),
])
def test_bad_specs_name_the_key(spec, in_shape, match):
    cls = Conv2D if spec["type"] == "conv2d" else MaxPool2D
    with pytest.raises(ValueError, match=match):
        cls.build(spec, in_shape, 0, 0)


CNN = [{"type": "conv2d", "out_channels": 3, "kernel": 3, "padding": 1}, {"type": "relu"},
       {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out": 4}]


def test_cnn_in_sequential_names_init_and_gradients():
    from distbp.nn import Sequential

    model = Sequential(CNN, (2, 6, 6), dtype=np.float64, seed=0)
    assert model.names == ["0.conv2d.W", "0.conv2d.b", "4.linear.W", "4.linear.b"]
    assert model.out_shape == (4,) and model.shapes["0.conv2d.W"] == (3, 2, 3, 3)
    np.testing.assert_array_equal(model.params, Sequential(CNN, (2, 6, 6), np.float64, seed=0).params)
    rng = np.random.default_rng(6)
    x, R = rng.standard_normal((3, 2, 6, 6)), rng.standard_normal((3, 4))
    grads = check_model_gradients(model, x, R)
    model.zero_grad()
    model.forward(x)
    assert model.backward(R, need_dx=False) is None
    np.testing.assert_allclose(model.grads, grads, rtol=1e-12)


def test_conv2d_he_init_scale():
    spec = {"type": "conv2d", "out_channels": 64, "kernel": 3, "init": "he_normal"}
    layer = Conv2D.build(spec, (32, 8, 8), 0, 0)
    params, _ = bind_random(layer, np.random.default_rng(0))
    layer.init_params(np.random.default_rng(0))
    assert abs(params["W"].std() / np.sqrt(2 / (32 * 9)) - 1) < 0.02
    assert not params["b"].any()


def test_cnn_zero_local_rows():
    from distbp.nn import Sequential

    model = Sequential(CNN, (2, 6, 6), dtype=np.float32, seed=0)
    out = model.forward(np.zeros((0, 2, 6, 6), np.float32))
    assert out.shape == (0, 4)
    assert model.backward(np.zeros((0, 4), np.float32)).shape == (0, 2, 6, 6)
    assert not model.grads.any()


@pytest.mark.parametrize("shape,in_shape,out", [([1, -1, -1], (64,), (1, 8, 8)), ([1, 8, 8], (64,), (1, 8, 8)),
                                                ([1, -1, -1], (1, 28, 28), (1, 28, 28)), ([-1, 4], (1, 28, 28), (196, 4))])
def test_reshape_infers_minus_one_sizes(shape, in_shape, out):
    from distbp.nn.reshape import Reshape
    layer = Reshape.build({"type": "reshape", "shape": shape}, in_shape, 0, 0)
    x = np.arange(2 * np.prod(in_shape)).reshape(2, *in_shape)
    assert layer.out_shape == out and np.array_equal(layer.backward(layer.forward(x)), x)


@pytest.mark.parametrize("shape,match", [([1, -1, -1], "cannot hold the 3072 values.*square"),
                                         ([-1, -1, -1], "at most two -1"), ([0, 8], "positive ints")])
def test_reshape_refuses_sizes_it_cannot_infer(shape, match):
    from distbp.nn.reshape import Reshape
    with pytest.raises(ValueError, match=match):
        Reshape.build({"type": "reshape", "shape": shape}, (3, 32, 32), 0, 0)


TORCH_CNN = [  # W5/W6's layer kinds at small sizes, plus a strided and an unpadded convolution
    {"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, {"type": "batchnorm"}, {"type": "relu"},
    {"type": "conv2d", "out_channels": 5, "kernel": 5, "padding": 2}, {"type": "relu"},
    {"type": "maxpool2d", "kernel": 2},
    {"type": "conv2d", "out_channels": 6, "kernel": 3, "stride": 2, "padding": 1}, {"type": "batchnorm"},
    {"type": "relu"}, {"type": "conv2d", "out_channels": 3, "kernel": 2}, {"type": "maxpool2d", "kernel": 2},
    {"type": "flatten"}, {"type": "linear", "out": 7}]


def torch_twin(model, torch):
    """The same network in torch.nn with model's parameters (float64)."""
    modules = []
    for layer, (shape, _) in zip(model.layers, model.shapes_io):
        if layer.kind == "conv2d":
            m = torch.nn.Conv2d(layer.C, layer.F, (layer.kh, layer.kw), (layer.sh, layer.sw), (layer.ph, layer.pw),
                                dtype=torch.float64)
            m.weight.data, m.bias.data = torch.tensor(layer.W.copy()), torch.tensor(layer.b.copy())
        elif layer.kind == "batchnorm":
            m = torch.nn.BatchNorm2d(layer.C, dtype=torch.float64)
            m.weight.data, m.bias.data = torch.tensor(layer.W.copy()), torch.tensor(layer.b.copy())
        elif layer.kind == "linear":
            m = torch.nn.Linear(layer.d_in, layer.d_out, dtype=torch.float64)
            m.weight.data, m.bias.data = torch.tensor(layer.W.T.copy()), torch.tensor(layer.b.copy())
        elif layer.kind == "maxpool2d":
            m = torch.nn.MaxPool2d((layer.kh, layer.kw), (layer.sh, layer.sw))
        else:
            m = {"relu": torch.nn.ReLU, "flatten": torch.nn.Flatten}[layer.kind]()
        modules.append(m)
    return torch.nn.Sequential(*modules)


def test_cnn_matches_torch_on_the_same_weights(conv_path):
    torch = import_torch()
    from distbp.nn import Sequential

    model = Sequential(TORCH_CNN, (3, 18, 18), dtype=np.float64, seed=3)
    rng = np.random.default_rng(7)
    model.params += 0.1 * rng.standard_normal(model.num_params)  # non-trivial BatchNorm gamma and beta
    x, R = rng.standard_normal((6, 3, 18, 18)), rng.standard_normal((6, 7))
    reference = torch_twin(model, torch)
    t_x = torch.tensor(x, requires_grad=True)
    t_y = reference(t_x)
    (t_y * torch.tensor(R)).sum().backward()
    model.zero_grad()
    y = model.forward(x)
    dx = model.backward(R)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-6, atol=1e-12)
    assert rel_err(dx, t_x.grad.numpy()) < 1e-6
    modules = [m for m in reference if any(True for _ in m.parameters())]
    for (i, layer), m in zip([(i, l) for i, l in enumerate(model.layers) if l.param_shapes()], modules, strict=True):
        dW = layer.dW.T if layer.kind == "linear" else layer.dW
        assert rel_err(dW, m.weight.grad.numpy()) < 1e-6, (i, layer.kind)
        # a bias before BatchNorm has a zero gradient: compare it up to rounding
        np.testing.assert_allclose(layer.db, m.bias.grad.numpy(), rtol=1e-6, atol=1e-12, err_msg=f"{i} {layer.kind}")


def test_small_dW_products_are_cut_into_chunks_of_K_added_in_order():
    """A first layer's dW product (few rows, long K) in equal chunks of at most SMALL_PRODUCT multiply-adds, the
    columns left over last: each chunk's product as one call on it gives, added in order."""
    from distbp.nn.conv import SMALL_PRODUCT, SMALL_ROWS, _dW_product
    rng = np.random.default_rng(0)
    for M, K, F, dtype in [(27, 4096, 32, np.float64), (9, 4099, 32, np.float32), (25, 3584, 16, np.float32),
                           (96, 2048, 32, np.float32)]:
        a, g = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((F, K)).astype(dtype)
        out, scratch = np.empty((M, F), dtype), np.empty((M, F), dtype)
        _dW_product(a, g, out, scratch)
        if M > SMALL_ROWS:  # one call, as before
            assert out.tobytes() == np.matmul(a, g.T).tobytes()
            continue
        n = -(-K // (SMALL_PRODUCT // (M * F) // 64 * 64))
        c = K // n
        want = np.matmul(a[:, :c], g[:, :c].T)
        for s in range(c, n * c, c):
            want += np.matmul(a[:, s : s + c], g[:, s : s + c].T)
        if n * c < K:
            want += np.matmul(a[:, n * c :], g[:, n * c :].T)
        assert out.tobytes() == want.tobytes() and n > 1 and M * F * c <= 100**3  # OpenBLAS's small-matrix limit
        np.testing.assert_allclose(out, a @ g.T, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3)


def test_row_products_are_cut_into_blocks_of_columns_with_the_same_sums():
    """Stacks of (rows, depth) @ (depth, columns) products (a row's kernel columns, or one product) in blocks of
    columns within OpenBLAS's small-matrix limit, two calls in all: each block as one call on it gives, so every
    output element is the same sum; products whose blocks would be narrower than MIN_COLUMNS stay whole."""
    from distbp.nn.conv import MIN_COLUMNS, SMALL_PRODUCT, _products
    rng = np.random.default_rng(1)
    for stack, rows, depth, cols, dtype in [((), 16, 25, 3584, np.float32), ((5,), 32, 80, 1792, np.float32),
                                            ((3,), 16, 27, 4100, np.float64), ((), 64, 576, 2048, np.float32),
                                            ((3,), 8, 4, 200, np.float64)]:
        a = rng.standard_normal((*stack, rows, depth)).astype(dtype)
        b = rng.standard_normal((*stack, depth, cols + 7)).astype(dtype)[..., 3 : 3 + cols]  # strided, as _window
        out = np.full((*stack, rows, cols), np.nan, dtype)
        _products(a, b, out)
        step = SMALL_PRODUCT // (rows * depth) // 64 * 64
        ends = list(range(step, cols, step)) + [cols] if MIN_COLUMNS <= step < cols else [cols]
        assert (len(ends) > 1) == ((rows, depth) in [(16, 25), (32, 80), (16, 27)])
        for c, end in zip([0] + ends[:-1], ends):
            assert out[..., c:end].tobytes() == np.matmul(a, b[..., c:end]).tobytes()
        np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-3 if dtype == np.float32 else 1e-12)
    a, b, out = rng.standard_normal((3, 16, 25)), rng.standard_normal((25, 3000)), np.empty((3, 16, 3000))
    _products(a, b, out)  # one b for a stack of a (a strided convolution's W^T dy)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
