"""Winograd's F(4x4, 3x3) and F(4x4, 5x5) (nn/winograd.py) in Conv2D: the matrices, the path rule, torch's numbers,
float32 error, bits per thread.

test_conv runs its naive-loop, finite-difference and torch tests on this path too (its conv_path fixture)."""

import numpy as np
import pytest

from distbp.nn import Sequential, conv, threads, winograd
from distbp.nn.conv import winograd_path
from conftest import import_torch, rel_err


def test_the_path_rule_takes_3x3_and_5x5_stride_1_products_with_enough_channels():
    assert conv.WINOGRAD_CHANNELS == 16  # scripts/conv_paths.py --winograd's fit (docs/PERFORMANCE.md)
    assert winograd_path((3, 3), (1, 1), 16, 64) and winograd_path([3, 3], [1, 1], 128, 16)
    assert winograd_path((5, 5), (1, 1), 16, 32) and not winograd_path((5, 5), (1, 1), 1, 16)
    assert not winograd_path((3, 3), (1, 1), 8, 64) and not winograd_path((3, 3), (1, 1), 64, 3)
    assert not winograd_path((7, 7), (1, 1), 64, 64) and not winograd_path((3, 3), (2, 2), 64, 64)
    assert not winograd_path((3, 1), (1, 1), 64, 64) and not winograd_path((5, 3), (1, 1), 64, 64)

    def paths(F, C, dtype=np.float32, kernel=3):
        model = Sequential([{"type": "conv2d", "out_channels": F, "kernel": kernel}], (C, 8, 8),
                           dtype=np.dtype(dtype))
        return model.layers[0].winograd, model.layers[0].winograd_dx

    assert paths(8, 32) == (False, False)  # forward and dW from 32 to 8 channels, dx from 8 to 32
    assert paths(16, 48) == (True, True) and paths(32, 16, kernel=5) == (True, True)
    assert paths(16, 48, np.float64) == (False, False)  # float64 (checks against references) keeps the direct sum


@pytest.mark.parametrize("r", sorted(winograd.FORMS))
def test_the_matrices_are_the_known_ones_and_give_the_correlation_exactly(r):
    """Toom-Cook from the points: F(4x4, 3x3)'s are Lavin and Gray's (rows 1 and 3 of B^T and G negated, the same
    products); A^T [G g . B^T d] equals the correlation of a tile in float64 to rounding."""
    AT, G, BT = winograd.matrices(r)
    m, a = winograd.FORMS[r][0], winograd.FORMS[r][0] + r - 1
    assert AT.shape == (m, a) and G.shape == (a, r) and BT.shape == (a, a)
    assert np.array_equal(AT, np.round(AT)) and np.array_equal(BT, np.round(BT))  # integers: exact in any type
    if r == 3:
        sign = np.array([1, -1, 1, -1, 1, 1])[:, None]
        assert np.array_equal(sign * BT, [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                                          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
        assert np.allclose(sign * G, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], rtol=0, atol=1e-16)
        assert np.array_equal(AT, [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
    rng = np.random.default_rng(r)
    d, g = rng.standard_normal((a, a)), rng.standard_normal((r, r))
    y = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T
    direct = [[np.sum(d[i : i + r, j : j + r] * g) for j in range(m)] for i in range(m)]
    np.testing.assert_allclose(y, direct, rtol=0, atol=1e-13)


CASES = {  # kernel: in (C, H, W), padding, batch: odd and non-multiple-of-4 outputs, padding 0 to kernel + 1
    3: [((3, 9, 10), 1, 5), ((2, 8, 8), 0, 3), ((4, 7, 13), 2, 2), ((1, 3, 3), 1, 4), ((5, 16, 5), 1, 1),
        ((2, 5, 6), 3, 2)],  # padding wider than the kernel: dx's flipped correlation crops dy
    5: [((3, 9, 10), 2, 5), ((2, 8, 8), 0, 3), ((4, 7, 13), 1, 2), ((1, 5, 5), 4, 2), ((5, 14, 6), 2, 1),
        ((2, 3, 4), 6, 2)],
}


# blocks of one tile; of 2 and 1 tiles for the first case's 3 tiles per row (a*a positions x 6 channels x 5 samples
# x 8 bytes a tile); whole rows
@pytest.mark.parametrize("tiles_per_block", [1, 2, None])
@pytest.mark.parametrize("r,shape,padding,batch", [(r, *case) for r, cases in CASES.items() for case in cases])
def test_forward_dW_db_dx_match_torch_in_float64(r, shape, padding, batch, tiles_per_block, monkeypatch):
    torch = import_torch()
    monkeypatch.setattr(conv, "WINOGRAD_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_DTYPES", (np.dtype(np.float64),))
    a = winograd.FORMS[r][0] + r - 1
    block_bytes = {1: 1, 2: 2 * a * a * 6 * 5 * 8, None: 1 << 22}[tiles_per_block]
    monkeypatch.setattr(winograd, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(winograd, "PARTS_BYTES", 1)  # a partial dW per tile row, added in order
    F = 6
    model = Sequential([{"type": "conv2d", "out_channels": F, "kernel": r, "padding": padding}, {"type": "relu"}],
                       shape, dtype=np.float64, seed=1)
    layer = model.layers[0]
    layer.need_dx = True
    assert layer.winograd and layer.winograd_dx
    rng = np.random.default_rng(2)
    model.params += 0.1 * rng.standard_normal(model.num_params)
    x = rng.standard_normal((batch, *shape))
    t_x = torch.tensor(x, requires_grad=True)
    m = torch.nn.Conv2d(shape[0], F, r, padding=padding, dtype=torch.float64)
    m.weight.data, m.bias.data = torch.tensor(layer.W.copy()), torch.tensor(layer.b.copy())
    t_y = torch.relu(m(t_x))
    R = rng.standard_normal(t_y.shape)
    (t_y * torch.tensor(R)).sum().backward()
    model.zero_grad()
    y = model.forward(x)
    dx = model.backward(R)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert rel_err(dx, t_x.grad.numpy()) < 1e-12
    assert rel_err(layer.dW, m.weight.grad.numpy()) < 1e-12
    np.testing.assert_allclose(layer.db, m.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r", sorted(winograd.FORMS))
def test_float32_error_stays_within_a_few_millionths_of_the_largest_output(r, monkeypatch):
    """float32 against the float64 convolution on the same values: Winograd's rounding is larger than the direct
    sum's (transforms with entries up to 8) but small against float32 training's other noise."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 16, 16))
    errors = {}
    for path, channels in (("winograd", 1), ("direct", 1 << 30)):
        monkeypatch.setattr(conv, "WINOGRAD_CHANNELS", channels)
        monkeypatch.setattr(conv, "WINOGRAD_DTYPES", (np.dtype(np.float32), np.dtype(np.float64)))
        out = {}
        for dtype in (np.float32, np.float64):
            model = Sequential([{"type": "conv2d", "out_channels": 64, "kernel": r, "padding": r // 2}], (64, 16, 16),
                               dtype=np.dtype(dtype), seed=0)
            model.layers[0].need_dx = True
            model.zero_grad()
            y = model.forward(x.astype(dtype))
            dx = model.backward(np.ones_like(y) / y.shape[0])
            out[dtype] = y, model.layers[0].dW.copy(), dx
        errors[path] = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(out[np.float32], out[np.float64])]
    assert max(errors["winograd"]) < 3e-5, errors
    assert max(errors["direct"]) < 3e-6 and max(errors["direct"]) < max(errors["winograd"]), errors


@pytest.mark.parametrize("r", sorted(winograd.FORMS))
@pytest.mark.parametrize("F", [32, 40])
def test_bits_do_not_depend_on_the_thread_count(F, r, monkeypatch):
    """forward, dW and dx of Winograd's path at 1, 2 and 4 threads, one tile per block and a partial dW per tile row
    (many work items for the threads), with a fused ReLU: the same bits."""
    monkeypatch.setattr(winograd, "BLOCK_BYTES", 1)
    monkeypatch.setattr(winograd, "PARTS_BYTES", 1)
    monkeypatch.setattr(threads, "SERIAL_BELOW", 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32, 13, 9)).astype(np.float32)
    runs = []
    for n in (1, 2, 4):
        with threads.using(n):
            model = Sequential([{"type": "conv2d", "out_channels": F, "kernel": r, "padding": r // 2},
                                {"type": "relu"}], (32, 13, 9), seed=3)
            layer = model.layers[0]
            layer.need_dx = True
            assert layer.winograd and layer.winograd_dx
            model.zero_grad()
            y = model.forward(x)
            dx = model.backward(np.cos(np.arange(y.size, dtype=np.float32)).reshape(y.shape))
            runs.append(tuple(np.ascontiguousarray(a).tobytes() for a in (y, layer.dW, layer.db, dx)))
    assert runs[0] == runs[1] == runs[2]


def test_a_conv_stacks_activations_are_read_where_they_lie(monkeypatch):
    """The second of two Winograd layers reads the first one's output itself (no padded copy of it, nor of dy for
    dx), with padding wider than its kernel's reach on one side of the stack: the stack matches torch in float64."""
    torch = import_torch()
    monkeypatch.setattr(conv, "WINOGRAD_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_DTYPES", (np.dtype(np.float64),))
    specs = [{"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, {"type": "relu"},
             {"type": "conv2d", "out_channels": 5, "kernel": 5, "padding": 5}]
    model = Sequential(specs, (3, 7, 9), dtype=np.float64, seed=4)
    first, second = model.layers[0], model.layers[2]
    first.need_dx = True
    assert first.winograd and second.winograd and second.winograd_dx
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 7, 9))
    t_x = torch.tensor(x, requires_grad=True)
    convs = [torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), torch.nn.Conv2d(4, 5, 5, padding=5,
                                                                                        dtype=torch.float64)]
    for m, layer in zip(convs, (first, second)):
        m.weight.data, m.bias.data = torch.tensor(layer.W.copy()), torch.tensor(layer.b.copy())
    t_y = convs[1](torch.relu(convs[0](t_x)))
    R = rng.standard_normal(t_y.shape)
    (t_y * torch.tensor(R)).sum().backward()
    model.zero_grad()
    y = model.forward(x)
    assert np.shares_memory(second.xq, first.y)  # the first layer's rectified output, as it lies
    dx = model.backward(R)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert rel_err(dx, t_x.grad.numpy()) < 1e-12
    for m, layer in zip(convs, (first, second)):
        assert rel_err(layer.dW, m.weight.grad.numpy()) < 1e-12
        np.testing.assert_allclose(layer.db, m.bias.grad.numpy(), rtol=1e-12, atol=1e-12)
