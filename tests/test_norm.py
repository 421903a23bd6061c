"""BatchNorm (synchronized across ranks) and LayerNorm: references, finite differences, n ranks vs 1."""

import numpy as np
import pytest

from distbp.parallel.comm import SerialComm
from distbp.nn.layers import Context
from distbp.nn.norm import BatchNorm, LayerNorm
from conftest import bind_random, check_grads, numeric_grad, rel_err


def make_bn(in_shape, comm=None, rng=None, dtype=np.float64, momentum=0.1):
    """A bound BatchNorm with random gamma/beta (from rng), fresh running stats and a ctx."""
    layer = BatchNorm.build({"type": "batchnorm", "momentum": momentum}, in_shape, 0, 0)
    params, grads = bind_random(layer, rng or np.random.default_rng(0), dtype, around_one=True)
    layer.bind_buffers({n: np.zeros(s, dtype) for n, s in layer.buffer_shapes()})
    layer.init_buffers()
    layer.ctx = Context()
    layer.ctx.comm = comm
    return layer, params, grads


def bn_reference(x, gamma, beta, eps=1e-5):
    """Plain batch norm over every axis but 1, returning (y, mean, biased var)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    y = xhat * gamma.reshape(shape) + beta.reshape(shape)
    return y, mean, var


BN_SHAPES = [(6, (3,)), (3, (2, 4, 3)), (1, (2, 3, 3))]  # (N, in_shape)


@pytest.mark.parametrize("N,in_shape", BN_SHAPES)
def test_batchnorm_forward_and_running_stats(N, in_shape):
    rng = np.random.default_rng(0)
    layer, params, _ = make_bn(in_shape, rng=rng)
    x = 3 + 2 * rng.standard_normal((N, *in_shape))
    ref, mean, var = bn_reference(x, params["W"], params["b"])
    np.testing.assert_allclose(layer.forward(x), ref, rtol=1e-10, atol=1e-12)
    M = x.size // in_shape[0]
    np.testing.assert_allclose(layer.running_mean, 0.1 * mean)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * var * M / (M - 1))


@pytest.mark.parametrize("N,in_shape", BN_SHAPES[:2])
def test_batchnorm_train_gradients_match_finite_differences(N, in_shape):
    rng = np.random.default_rng(1)
    layer, params, grads = make_bn(in_shape, rng=rng)
    check_grads(layer, 1 + rng.standard_normal((N, *in_shape)), params, grads, rng)


@pytest.mark.parametrize("N,in_shape", BN_SHAPES[:2])
def test_batchnorm_eval_uses_running_stats(N, in_shape):
    rng = np.random.default_rng(2)
    layer, params, grads = make_bn(in_shape, rng=rng)
    layer.running_mean[...] = rng.standard_normal(in_shape[0])
    layer.running_var[...] = rng.uniform(0.5, 2, in_shape[0])
    layer.training = False
    x = rng.standard_normal((N, *in_shape))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    ref = ((x - layer.running_mean.reshape(shape)) / np.sqrt(layer.running_var.reshape(shape) + 1e-5)
           * params["W"].reshape(shape) + params["b"].reshape(shape))
    before = layer.running_var.copy()
    np.testing.assert_allclose(layer.forward(x), ref, rtol=1e-12)
    np.testing.assert_array_equal(layer.running_var, before)
    check_grads(layer, x, params, grads, rng)


class MirrorComm:
    """A fake 2-rank comm whose other rank holds the same rows: allreduce doubles; records calls."""

    size = 2

    def __init__(self):
        self.calls = []

    def allreduce_sum(self, buf):
        """Double buf in place, noting its size and layout."""
        self.calls.append((buf.size, buf.dtype, buf.flags.c_contiguous))
        buf *= 2


def test_batchnorm_one_allreduce_each_way_and_global_math():
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    single, params, grads1 = make_bn((3, 2, 2), rng=np.random.default_rng(9))
    comm = MirrorComm()
    mirrored, _, grads2 = make_bn((3, 2, 2), comm=comm, rng=np.random.default_rng(9))
    y1, y2 = single.forward(x), mirrored.forward(x)
    assert comm.calls == [(4, np.float64, True), (3, np.float64, True)]  # [sum x, count], sum (x-mean)^2
    np.testing.assert_allclose(y2, y1, rtol=1e-12)
    M = 2 * 4 * 2 * 2  # the doubled batch: unbiased correction uses the global count
    _, _, var = bn_reference(x, params["W"], params["b"])
    np.testing.assert_allclose(mirrored.running_var, 0.9 + 0.1 * var * M / (M - 1))
    np.testing.assert_allclose(mirrored.backward(dy), single.backward(dy), rtol=1e-12)
    assert comm.calls[2:] == [(6, np.float64, True)]  # [sum dy, sum dy*xhat]
    for n in grads1:  # local sums only: the trainer's gradient allreduce adds the ranks
        np.testing.assert_allclose(grads2[n], grads1[n], rtol=1e-12)


def test_batchnorm_float32():
    rng = np.random.default_rng(4)
    x, dy = 5 + rng.standard_normal((8, 4, 3, 3)), rng.standard_normal((8, 4, 3, 3))
    results = {}
    for dtype in (np.float64, np.float32):
        layer, _, grads = make_bn((4, 3, 3), rng=np.random.default_rng(9), dtype=dtype)
        y, dx = layer.forward(x.astype(dtype)), layer.backward(dy.astype(dtype))
        assert y.dtype == dx.dtype == grads["W"].dtype == layer.running_var.dtype == dtype
        results[dtype] = (y, dx, grads["W"], grads["b"], layer.running_mean, layer.running_var)
    for a, b in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("N,in_shape", [(10, (3,)), (7, (2, 3, 3)), (1, (2, 3, 3))])
def test_batchnorm_split_across_ranks_equals_whole_batch(comm, N, in_shape):
    rng = np.random.default_rng(5)  # same global batch on every rank
    x, dy = 2 + rng.standard_normal((N, *in_shape)), rng.standard_normal((N, *in_shape))
    whole, _, grads1 = make_bn(in_shape, rng=np.random.default_rng(9))
    y1, dx1 = whole.forward(x), whole.backward(dy)
    lo, hi = N * comm.rank // comm.size, N * (comm.rank + 1) // comm.size  # may be empty
    part, _, grads2 = make_bn(in_shape, comm=comm, rng=np.random.default_rng(9))
    part.ctx.global_rows, part.ctx.rows = N, np.arange(lo, hi)
    y2, dx2 = part.forward(x[lo:hi]), part.backward(dy[lo:hi])
    np.testing.assert_allclose(y2, y1[lo:hi], rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(part, name), getattr(whole, name), rtol=1e-12)
    dx_sum = np.zeros(dx1.shape)  # C-contiguous for the allreduce, whatever layout dx1 has
    dx_sum[lo:hi] = dx2
    comm.allreduce_sum(dx_sum)
    np.testing.assert_allclose(dx_sum, dx1, rtol=1e-10, atol=1e-12)
    for n, g in grads2.items():
        comm.allreduce_sum(g)
        np.testing.assert_allclose(g, grads1[n], rtol=1e-10, atol=1e-12)


def large_offset_batch(offset, N=32, C=3):
    """(N, C, 2, 2) float64 with per-channel mean offset*c-ish and spread ~1: mean/std about offset."""
    rng = np.random.default_rng(6)
    return offset * np.array([1.0, -2.0, 3.0])[:C].reshape(1, C, 1, 1) + rng.standard_normal((N, C, 2, 2))


def two_pass_stats(x):
    """Float64 reference mean and biased variance per channel: numpy's two-pass var."""
    axes = (0, 2, 3)
    return x.mean(axis=axes), x.var(axis=axes)


def check_large_offset(comm, offset):
    """BatchNorm on a rank's slice of a large-offset batch matches the float64 two-pass reference to 1e-8."""
    x = large_offset_batch(offset)
    mean, var = two_pass_stats(x)
    lo, hi = len(x) * comm.rank // comm.size, len(x) * (comm.rank + 1) // comm.size
    layer, params, _ = make_bn((3, 2, 2), comm=comm, rng=np.random.default_rng(9), momentum=1.0)
    layer.ctx.global_rows, layer.ctx.rows = len(x), np.arange(lo, hi)
    y = layer.forward(x[lo:hi])
    M = x.size // 3
    np.testing.assert_allclose(layer.running_var, var * M / (M - 1), rtol=1e-8)  # momentum 1: the batch's
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-8)
    shape = (1, 3, 1, 1)
    ref = (x[lo:hi] - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * params["W"].reshape(shape) \
        + params["b"].reshape(shape)
    # y = gamma (x - mean) / std + beta: x itself only resolves spacing(|x|) (3e-8 at 2e8), and the
    # mean, summed in another order over ranks, differs from numpy's by a few such steps
    np.testing.assert_allclose(y, ref, rtol=1e-8, atol=8 * np.spacing(np.abs(x).max()))


@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_batchnorm_variance_survives_a_large_offset(offset):
    check_large_offset(SerialComm(), offset)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_batchnorm_variance_survives_a_large_offset_across_ranks(comm, offset):
    check_large_offset(comm, offset)


@pytest.mark.parametrize("in_shape,dims", [((6,), None), ((2, 3, 4), None), ((2, 3, 4), 1), ((3, 4), 2)])
def test_layernorm_forward_and_gradients(in_shape, dims):
    rng = np.random.default_rng(6)
    spec = {"type": "layernorm"} | ({"dims": dims} if dims else {})
    layer = LayerNorm.build(spec, in_shape, 0, 0)
    params, grads = bind_random(layer, rng, around_one=True)
    x = 1 + 3 * rng.standard_normal((3, *in_shape))
    axes = tuple(range(-(dims or len(in_shape)), 0))
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    ref = (x - mean) / np.sqrt(var + 1e-5) * params["W"] + params["b"]
    np.testing.assert_allclose(layer.forward(x), ref, rtol=1e-10, atol=1e-12)
    check_grads(layer, x, params, grads, rng)


def test_layernorm_float32():
    rng = np.random.default_rng(7)
    layer = LayerNorm.build({"type": "layernorm"}, (8,), 0, 0)
    params, grads = bind_random(layer, rng, around_one=True)
    x, dy = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    y64, dx64, dW64 = layer.forward(x), layer.backward(dy), grads["W"].copy()
    layer.bind({n: p.astype(np.float32) for n, p in params.items()},
               {n: np.zeros_like(g, dtype=np.float32) for n, g in grads.items()})
    y32, dx32 = layer.forward(x.astype(np.float32)), layer.backward(dy.astype(np.float32))
    assert y32.dtype == dx32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.dW, dW64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,spec,in_shape,match", [
    (BatchNorm, {"type": "batchnorm", "momentum": 2}, (3,), "momentum"),
    (BatchNorm, {"type": "batchnorm", "eps": 0}, (3,), "eps"),
    (BatchNorm, {"type": "batchnorm"}, (3, 4), r"\(C,\)"),
    (LayerNorm, {"type": "layernorm", "dims": 3}, (3, 4), "dims"),
])
def test_bad_norm_specs_name_the_key(cls, spec, in_shape, match):
    with pytest.raises(ValueError, match=match):
        cls.build(spec, in_shape, 0, 0)


def test_batchnorm_in_sequential_buffers_and_gradients():
    from distbp.nn import Sequential

    specs = [{"type": "conv2d", "out_channels": 3, "kernel": 3}, {"type": "batchnorm"}, {"type": "relu"},
             {"type": "flatten"}, {"type": "linear", "out": 4}, {"type": "batchnorm", "momentum": 0.5},
             {"type": "layernorm"}]
    model = Sequential(specs, (2, 5, 5), dtype=np.float64, seed=0)
    assert model.buffer_names == ["1.batchnorm.running_mean", "1.batchnorm.running_var",
                                  "5.batchnorm.running_mean", "5.batchnorm.running_var"]
    buffers = model.buffer_views(model.buffers)
    assert not buffers["1.batchnorm.running_mean"].any() and (buffers["5.batchnorm.running_var"] == 1).all()
    views = model.views(model.params)
    assert (views["1.batchnorm.W"] == 1).all() and not views["6.layernorm.b"].any()
    rng = np.random.default_rng(8)
    model.params[:] += 0.3 * rng.standard_normal(model.params.size)  # gamma, beta away from 1, 0
    x, R = rng.standard_normal((4, 2, 5, 5)), rng.standard_normal((4, 4))
    model.zero_grad()
    model.forward(x)
    dx = model.backward(R)
    loss = lambda: float(np.sum(model.forward(x) * R))  # noqa: E731
    assert rel_err(model.grads.copy(), numeric_grad(loss, model.params)) < 1e-6
    assert rel_err(dx, numeric_grad(loss, x)) < 1e-6
    model.eval()
    running = model.forward(x)
    model.train()
    assert not np.allclose(running, model.forward(x))
