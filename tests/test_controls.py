"""Training controls, the math alone: clipping against torch.nn.utils, the early-stopping counter."""

import numpy as np
import pytest

from distbp.training.clip import clip_by_norm, clip_by_value
from distbp.training.early_stop import EarlyStopping
from conftest import import_torch


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_clip_by_norm_matches_torch(max_norm):
    torch = import_torch()
    rng = np.random.default_rng(1)
    shapes = [(4, 3), (3,), (3, 2)]
    grads = [rng.standard_normal(s) for s in shapes]
    tensors = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    t_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    flat = np.concatenate([g.ravel() for g in grads])
    norm = float(np.linalg.norm(flat))
    clip_by_norm(flat, max_norm, norm)
    assert norm == pytest.approx(t_norm.item(), rel=1e-14)
    np.testing.assert_allclose(flat, np.concatenate([t.grad.numpy().ravel() for t in tensors]), rtol=1e-15)


def test_clip_by_value_matches_torch():
    torch = import_torch()
    g = np.random.default_rng(2).standard_normal(50)
    t = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_([t], 0.7)
    clip_by_value(g, 0.7)
    np.testing.assert_array_equal(g, t.grad.numpy())


def test_clipping_keeps_dtype_and_leaves_small_gradients_alone():
    g = np.array([3.0, 4.0], np.float32)
    clip_by_norm(g, 10.0, 5.0)
    np.testing.assert_array_equal(g, [3.0, 4.0])
    clip_by_norm(g, 1.0, 5.0)
    assert g.dtype == np.float32 and np.linalg.norm(g) == pytest.approx(1.0, rel=1e-6)


def test_early_stopping_counts_evaluations_without_improvement_by_min_delta():
    stop = EarlyStopping("val_accuracy", "max", patience=2, min_delta=0.01)
    assert not stop.update(0.50, 10)
    assert not stop.update(0.505, 20)        # not more than min_delta: no improvement
    assert stop.wait == 1 and stop.best == 0.50
    assert not stop.update(0.52, 30)         # improvement resets the counter
    assert (stop.wait, stop.best, stop.best_step) == (0, 0.52, 30)
    assert not stop.update(float("nan"), 40)  # NaN never improves
    assert stop.update(0.40, 50)
    assert "val_accuracy did not improve by more than 0.01 for 2 evaluation(s)" in stop.reason()
    assert "best 0.52 at step 30" in stop.reason()


def test_early_stopping_in_min_mode_and_off():
    stop = EarlyStopping("val_loss", "min", patience=1)
    assert not stop.update(1.0, 1) and not stop.update(0.9, 2)
    assert stop.update(0.9, 3)               # equal is no improvement with min_delta 0
    off = EarlyStopping("val_loss", "min", patience=0)
    assert not any(off.update(1.0, s) for s in range(5))


def test_early_stopping_state_round_trips_through_checkpoint_attrs():
    stop = EarlyStopping("val_accuracy", "max", patience=3)
    assert stop.state() == {}
    stop.update(0.7, 5)
    stop.update(0.6, 6)
    again = EarlyStopping("val_accuracy", "max", patience=3)
    again.load(stop.state())
    assert (again.best, again.best_step, again.wait) == (0.7, 5, 1)
    nan_first = EarlyStopping("val_loss", "min", patience=3)
    nan_first.update(float("nan"), 1)
    restored = EarlyStopping("val_loss", "min", patience=3)
    restored.load(nan_first.state())
    assert (restored.best, restored.wait) == (None, 1)
    assert not restored.update(float("nan"), 2) and restored.update(float("inf"), 3)
    assert restored.reason().endswith("for 3 evaluation(s) (train.early_stop_patience=3); no finite value")
    untouched = EarlyStopping("val_loss", "min", patience=3)
    untouched.load({})
    assert (untouched.best, untouched.wait) == (None, 0)
