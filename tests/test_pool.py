"""MaxPool2D, AvgPool2D and GlobalAvgPool: naive loops, finite differences, and torch on the same inputs."""

import numpy as np
import pytest

from distbp.nn import Sequential
from distbp.nn.pool import AvgPool2D, GlobalAvgPool, MaxPool2D
from conftest import check_grads, check_model_gradients, import_torch, rel_err


def maxpool_naive(x, kernel, stride):
    """Direct loop max pooling for reference."""
    (kh, kw), (sh, sw) = kernel, stride
    N, C, H, Wd = x.shape
    Ho, Wo = (H - kh) // sh + 1, (Wd - kw) // sw + 1
    y = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[:, :, i, j] = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].max(axis=(2, 3))
    return y


POOL_CASES = [  # spec, in_shape
    ({"kernel": 2}, (3, 6, 5)),
    ({"kernel": 3, "stride": 2}, (2, 7, 7)),
    ({"kernel": [2, 3], "stride": [1, 2]}, (1, 4, 7)),
]


@pytest.mark.parametrize("spec,in_shape", POOL_CASES)
def test_maxpool2d_forward_and_gradients(spec, in_shape):
    rng = np.random.default_rng(3)
    layer = MaxPool2D.build({"type": "maxpool2d", **spec}, in_shape, 0, 0)
    assert layer.param_shapes() == []
    x = rng.standard_normal((2, *in_shape))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, maxpool_naive(x, (layer.kh, layer.kw), (layer.sh, layer.sw)))
    assert y.shape[1:] == layer.out_shape
    check_grads(layer, x, {}, {}, rng)


def test_maxpool2d_routes_gradient_to_the_max_only():
    layer = MaxPool2D.build({"type": "maxpool2d", "kernel": 2}, (1, 2, 2), 0, 0)
    layer.forward(np.array([[[[1.0, 5.0], [3.0, 2.0]]]]))
    dx = layer.backward(np.array([[[[7.0]]]]))
    np.testing.assert_array_equal(dx, [[[[0.0, 7.0], [0.0, 0.0]]]])


def test_maxpool2d_2x2_ties_go_to_the_first_in_row_order():
    layer = MaxPool2D.build({"type": "maxpool2d", "kernel": 2}, (1, 2, 6), 0, 0)
    x = np.array([[[[3.0, 3.0, 1.0, 4.0, 0.0, 2.0], [3.0, 3.0, 4.0, 2.0, 0.0, 2.0]]]])
    np.testing.assert_array_equal(layer.forward(x), [[[[3.0, 4.0, 2.0]]]])
    dx = layer.backward(np.array([[[[5.0, 6.0, 7.0]]]]))
    np.testing.assert_array_equal(dx, [[[[5.0, 0.0, 0.0, 6.0, 0.0, 7.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]])


def avgpool_naive(x, kernel, stride, padding):
    """Direct loop average pooling over the zero-padded input, dividing by the whole window."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    y = np.zeros((*x.shape[:2], Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[:, :, i, j] = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].mean(axis=(2, 3))
    return y


AVG_CASES = [  # spec, in_shape
    ({"kernel": 2}, (3, 6, 5)),
    ({"kernel": 3, "stride": 2}, (2, 7, 7)),
    ({"kernel": [2, 3], "stride": [1, 2]}, (1, 4, 7)),
    ({"kernel": 3, "stride": 2, "padding": 1}, (2, 5, 6)),
    ({"kernel": [4, 2], "stride": [3, 1], "padding": [2, 1]}, (1, 6, 4)),
]


@pytest.mark.parametrize("spec,in_shape", AVG_CASES)
def test_avgpool2d_forward_and_gradients(spec, in_shape):
    rng = np.random.default_rng(0)
    layer = AvgPool2D.build({"type": "avgpool2d", **spec}, in_shape, 0, 0)
    assert layer.param_shapes() == []
    x = rng.standard_normal((3, *in_shape))
    y = layer.forward(x)
    ref = avgpool_naive(x, (layer.kh, layer.kw), (layer.sh, layer.sw), (layer.ph, layer.pw))
    assert y.shape[1:] == layer.out_shape == ref.shape[1:]
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-15)
    check_grads(layer, x, {}, {}, rng)


@pytest.mark.parametrize("in_shape", [(3, 4, 5), (1, 1, 1), (2, 7, 3)])
def test_global_avgpool_forward_and_gradients(in_shape):
    rng = np.random.default_rng(1)
    layer = GlobalAvgPool.build({"type": "global_avgpool"}, in_shape, 0, 0)
    x = rng.standard_normal((4, *in_shape))
    assert layer.out_shape == (in_shape[0], 1, 1)
    np.testing.assert_allclose(layer.forward(x)[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-14)
    check_grads(layer, x, {}, {}, rng)


@pytest.mark.parametrize("spec,in_shape", AVG_CASES + [({"type": "global_avgpool"}, (3, 5, 4))])
def test_pooling_matches_torch(spec, in_shape):
    torch = import_torch()
    rng = np.random.default_rng(2)
    if spec.get("type") == "global_avgpool":
        layer, reference = GlobalAvgPool.build(spec, in_shape, 0, 0), torch.nn.AdaptiveAvgPool2d(1)
    else:
        layer = AvgPool2D.build({"type": "avgpool2d", **spec}, in_shape, 0, 0)
        reference = torch.nn.AvgPool2d((layer.kh, layer.kw), (layer.sh, layer.sw), (layer.ph, layer.pw))
    x = rng.standard_normal((3, *in_shape))
    dy = rng.standard_normal((3, *layer.out_shape))
    t_x = torch.tensor(x, requires_grad=True)
    t_y = reference(t_x)
    t_y.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.forward(x), t_y.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert rel_err(layer.backward(dy), t_x.grad.numpy()) < 1e-12


HEAD = [{"type": "reshape", "shape": [2, 6, 6]}, {"type": "conv2d", "out_channels": 3, "kernel": 3, "padding": 1},
        {"type": "relu"}, {"type": "avgpool2d", "kernel": 2}, {"type": "conv2d", "out_channels": 4, "kernel": 3},
        {"type": "global_avgpool"}, {"type": "flatten"}, {"type": "linear", "out": 5}]


def test_all_convolutional_net_gradients_and_float32():
    model = Sequential(HEAD, (72,), dtype=np.float64, seed=0)
    assert model.out_shape == (5,)
    rng = np.random.default_rng(3)
    x, R = rng.standard_normal((3, 72)), rng.standard_normal((3, 5))
    check_model_gradients(model, x, R)
    model32 = Sequential(HEAD, (72,), dtype=np.float32, seed=0)
    np.testing.assert_allclose(model32.forward(x.astype(np.float32)), model.forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec,in_shape,match", [
    ({"type": "avgpool2d"}, (1, 8, 8), "kernel"),
    ({"type": "avgpool2d", "kernel": 2, "padding": 2}, (1, 8, 8), "at most half the kernel"),
    ({"type": "avgpool2d", "kernel": 9}, (1, 8, 8), "does not fit"),
    ({"type": "avgpool2d", "kernel": 2, "ceil_mode": True}, (1, 8, 8), "unknown key"),
    ({"type": "avgpool2d", "kernel": 2}, (64,), r"\(C, H, W\)"),
    ({"type": "global_avgpool"}, (64,), r"\(C, H, W\)"),
    ({"type": "global_avgpool", "kernel": 2}, (1, 8, 8), "unknown key"),
])
def test_bad_pool_specs_name_the_key(spec, in_shape, match):
    cls = AvgPool2D if spec["type"] == "avgpool2d" else GlobalAvgPool
    with pytest.raises(ValueError, match=match):
        cls.build(spec, in_shape, 0, 0)
