"""Optimizers against their update equations written out in float64, state round trips, schedules."""

import numpy as np
import pytest

from distbp import optim
from distbp.optim import SGD, Adam, AdamW, RMSprop, make_optimizer
from conftest import import_torch

LRS = [0.1, 0.05, 0.2]


def ref_sgd(p, grads, lrs, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD written out: params after each step and the final state."""
    out, buf = [], None
    for g, lr in zip(grads, lrs):
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p)
    return out, ({"momentum_buffer": buf} if momentum else {})


def ref_adam(p, grads, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam (decoupled=False) / AdamW (True) written out."""
    (beta1, beta2), m, v, out = betas, np.zeros_like(p), np.zeros_like(p), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out, {"exp_avg": m, "exp_avg_sq": v}


def ref_adamw(p, grads, lrs, weight_decay=0.01, **kw):
    """torch.optim.AdamW written out (its default weight decay is 0.01)."""
    return ref_adam(p, grads, lrs, weight_decay=weight_decay, decoupled=True, **kw)


def ref_rmsprop(p, grads, lrs, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0, centered=False):
    """torch.optim.RMSprop written out."""
    v, buf, g_avg, out = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p), []
    for g, lr in zip(grads, lrs):
        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        if centered:
            g_avg = alpha * g_avg + (1 - alpha) * g
            avg = np.sqrt(v - g_avg * g_avg) + eps
        else:
            avg = np.sqrt(v) + eps
        if momentum:
            buf = momentum * buf + g / avg
            p = p - lr * buf
        else:
            p = p - lr * g / avg
        out.append(p)
    state = {"square_avg": v}
    state.update({"momentum_buffer": buf} if momentum else {})
    state.update({"grad_avg": g_avg} if centered else {})
    return out, state


CASES = [
    (SGD, ref_sgd, {}),
    (SGD, ref_sgd, {"weight_decay": 0.1}),
    (SGD, ref_sgd, {"momentum": 0.9}),
    (SGD, ref_sgd, {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
    (SGD, ref_sgd, {"momentum": 0.9, "nesterov": True}),
    (SGD, ref_sgd, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (Adam, ref_adam, {}),
    (Adam, ref_adam, {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    (AdamW, ref_adamw, {}),
    (AdamW, ref_adamw, {"weight_decay": 0.0}),
    (AdamW, ref_adamw, {"weight_decay": 0.3, "betas": (0.5, 0.9)}),
    (RMSprop, ref_rmsprop, {}),
    (RMSprop, ref_rmsprop, {"momentum": 0.9, "weight_decay": 0.1}),
    (RMSprop, ref_rmsprop, {"centered": True, "alpha": 0.9}),
    (RMSprop, ref_rmsprop, {"centered": True, "momentum": 0.5, "eps": 1e-3}),
]
IDS = [f"{cls.name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for cls, _, kw in CASES]


def problem(n=23, steps=3, seed=0):
    """Random float64 params and one gradient per step."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), [rng.standard_normal(n) for _ in range(steps)]


def run(opt, p, grads, lrs, dtype):
    """Step opt from p on copies of grads; params (as float64) after each step."""
    p, out = p.astype(dtype), []
    for g, lr in zip(grads, lrs):
        opt.step(p, g.astype(dtype), lr)
        out.append(p.astype(np.float64))
    return out


@pytest.fixture(params=[None, 64], ids=["default-blocks", "64-byte-blocks"])
def blocks(request, monkeypatch):
    """Default blocking, and blocks of 64 bytes so the vector splits with a ragged end."""
    if request.param:
        monkeypatch.setattr(optim, "CHUNK_BYTES", request.param)


@pytest.mark.parametrize("cls, ref, kw", CASES, ids=IDS)
def test_first_steps_match_equations(cls, ref, kw, blocks):
    p, grads = problem()
    want, want_state = ref(p, grads, LRS, **kw)
    opt = cls(p.size, np.float64, **kw)
    got = run(opt, p, grads, LRS, np.float64)
    for step, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")
    assert set(opt.state_arrays()) == set(want_state)
    for k, a in opt.state_arrays().items():
        np.testing.assert_allclose(a, want_state[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert opt.state_scalars() == {"t": 3}


@pytest.mark.parametrize("cls, ref, kw", CASES, ids=IDS)
def test_float32(cls, ref, kw):
    p, grads = problem()
    want, _ = ref(p, grads, LRS, **kw)
    opt = cls(p.size, np.float32, **kw)
    got = run(opt, p, grads, LRS, np.float32)
    assert all(a.dtype == np.float32 for a in opt.state_arrays().values())
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-4, atol=1e-5)


def test_updates_params_in_place():
    p, g = np.ones(5, np.float32), np.ones(5, np.float32)
    view = p[:]
    Adam(5, np.float32).step(p, g, 0.1)
    assert np.all(view < 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, ref, kw", CASES, ids=IDS)
def test_state_round_trip_is_bitwise(cls, ref, kw, dtype, blocks):
    p, grads = problem(steps=4)
    a = cls(p.size, dtype, **kw)
    pa = p.astype(dtype)
    for g, lr in zip(grads[:3], LRS):
        a.step(pa, g.astype(dtype), lr)
    arrays = {k: v.copy() for k, v in a.state_arrays().items()}
    b = cls(p.size, dtype, **kw)
    b.load_state(arrays, a.state_scalars())
    pb = pa.copy()
    a.step(pa, grads[3].astype(dtype), 0.07)
    b.step(pb, grads[3].astype(dtype), 0.07)
    assert pa.tobytes() == pb.tobytes()
    for k, v in a.state_arrays().items():
        assert v.tobytes() == b.state_arrays()[k].tobytes(), k
    assert a.state_scalars() == b.state_scalars() == {"t": 4}


def test_load_state_accepts_its_own_arrays_and_numpy_scalars():
    opt = SGD(4, np.float32, momentum=0.9)
    opt.state_arrays()["momentum_buffer"][...] = 2.0
    opt.load_state(opt.state_arrays(), {"t": np.int64(5)})
    assert opt.t == 5 and type(opt.t) is int
    np.testing.assert_array_equal(opt.state_arrays()["momentum_buffer"], 2.0)


@pytest.mark.parametrize("arrays, scalars, match", [
    ({"exp_avg": np.zeros(4)}, {"t": 1}, r"state arrays are \['exp_avg', 'exp_avg_sq'\]"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(5)}, {"t": 1}, r"'exp_avg_sq' is float64\(5,\).*\(4,\)"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros((2, 2))}, {"t": 1}, r"shape \(4,\)"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(4, int)}, {"t": 1}, "float vector"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(4)}, {}, "scalars must be"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(4)}, {"t": -1}, "scalars must be"),
    ({"exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(4)}, {"t": 1.5}, "scalars must be"),
])
def test_load_state_errors(arrays, scalars, match):
    opt = Adam(4, np.float32)
    with pytest.raises(ValueError, match=match):
        opt.load_state(arrays, scalars)
    assert opt.t == 0 and not opt.state_arrays()["exp_avg"].any()


def test_make_optimizer_names_and_defaults():
    assert type(make_optimizer("sgd", 3, np.float32)) is SGD
    assert make_optimizer("adamw", 3, np.float32).weight_decay == 0.01
    assert make_optimizer("adamw", 3, np.float32, weight_decay=0.0).weight_decay == 0.0
    assert make_optimizer("adam", 3, np.float32).weight_decay == 0.0
    opt = make_optimizer("rmsprop", 3, np.float64, momentum=0.5, alpha=0.9, eps=1e-6, weight_decay=0.1)
    assert (type(opt), opt.momentum, opt.alpha, opt.eps, opt.weight_decay) == (RMSprop, 0.5, 0.9, 1e-6, 0.1)
    assert set(opt.state_arrays()) == {"square_avg", "momentum_buffer"}
    opt = make_optimizer("sgd", 3, np.float32, momentum=0.9, nesterov=True, betas=(0.5, 0.5), alpha=0.5)
    assert opt.nesterov and opt.state_arrays()["momentum_buffer"].dtype == np.float32
    assert make_optimizer("adam", 3, np.float32, betas=(0.8, 0.9), momentum=0.9).betas == (0.8, 0.9)


@pytest.mark.parametrize("name, n, dtype, kw, match", [
    ("sgdx", 3, np.float32, {}, r"optim.name='sgdx' is not one of sgd, adam, adamw, rmsprop"),
    ("sgd", 3, np.float32, {"momentum": 1.0}, r"optim.momentum=1.0 must be in \[0, 1\)"),
    ("sgd", 3, np.float32, {"momentum": -0.1}, "optim.momentum=-0.1"),
    ("sgd", 3, np.float32, {"nesterov": True}, "optim.nesterov=true needs optim.momentum > 0"),
    ("sgd", 3, np.float32, {"weight_decay": -1.0}, "optim.weight_decay=-1.0 must be >= 0"),
    ("adam", 3, np.float32, {"betas": (0.9, 1.0)}, r"optim.beta2=1.0 must be in \[0, 1\)"),
    ("adamw", 3, np.float32, {"betas": (-0.1, 0.9)}, "optim.beta1=-0.1"),
    ("adam", 3, np.float32, {"eps": 0.0}, "optim.eps=0.0 must be > 0"),
    ("rmsprop", 3, np.float32, {"alpha": 1.5}, r"optim.alpha=1.5 must be in \[0, 1\)"),
    ("sgd", 0, np.float32, {}, "n=0 must be a positive number of parameters"),
    ("sgd", 3, np.int32, {}, "dtype=int32 must be a floating type"),
])
def test_make_optimizer_errors(name, n, dtype, kw, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, n, dtype, **kw)


def test_sgd_dampening_and_nesterov_rule():
    with pytest.raises(ValueError, match="optim.dampening=0"):
        SGD(3, np.float32, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"optim.dampening=1.5 must be in \[0, 1\]"):
        SGD(3, np.float32, momentum=0.9, dampening=1.5)


@pytest.mark.parametrize("cls, ref, kw", CASES, ids=IDS)
def test_matches_torch(cls, ref, kw):
    torch = import_torch()
    p, grads = problem(steps=5, seed=1)
    lrs = [0.1, 0.05, 0.2, 0.01, 0.03]
    got = run(cls(p.size, np.float64, **kw), p, grads, lrs, np.float64)
    tp = torch.tensor(p, requires_grad=True)
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop}[cls.name]([tp], lr=lrs[0], **kw)
    for g, lr, mine in zip(grads, lrs, got):
        topt.param_groups[0]["lr"] = lr
        tp.grad = torch.tensor(g)
        topt.step()
        np.testing.assert_allclose(mine, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
