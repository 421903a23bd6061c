"""Losses: values and gradients vs finite differences, stability, torch reduction="mean"."""

import numpy as np
import pytest

from distbp.nn import MSE, BCEWithLogits, SoftmaxCrossEntropy, make_loss
from distbp.nn.losses import balanced_weights
from conftest import import_torch, numeric_grad, rel_err


def targets(task, rng, n, k):
    """Labels for classification, floats for regression, 0/1 and soft labels for binary."""
    if task == "classification":
        return rng.integers(0, k, n)
    if task == "regression":
        return rng.standard_normal((n, k))
    return np.where(rng.uniform(size=(n, k)) < 0.5, 0.0, rng.uniform(size=(n, k)))


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
def test_loss_backward_matches_finite_differences(task):
    rng = np.random.default_rng(0)
    out = 2 * rng.standard_normal((6, 4))
    y = targets(task, rng, 6, 4)
    loss = make_loss(task)
    loss.forward(out, y)
    dout = loss.backward()
    assert dout.shape == out.shape and dout.dtype == out.dtype
    assert rel_err(dout, numeric_grad(lambda: loss.forward(out, y), out)) < 1e-6


def test_loss_values_are_row_sums_of_the_textbook_formulas():
    rng = np.random.default_rng(1)
    out, labels = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    p = np.exp(out) / np.exp(out).sum(axis=1, keepdims=True)
    ce = -np.log(p[np.arange(5), labels]).sum()
    assert SoftmaxCrossEntropy().forward(out, labels) == pytest.approx(ce, rel=1e-12)
    t = rng.standard_normal((5, 3))
    assert MSE().forward(out, t) == pytest.approx(((out - t) ** 2).mean(axis=1).sum(), rel=1e-12)
    b = rng.uniform(size=(5, 3))
    s = 1 / (1 + np.exp(-out))
    bce = -(b * np.log(s) + (1 - b) * np.log(1 - s)).mean(axis=1).sum()
    assert BCEWithLogits().forward(out, b) == pytest.approx(bce, rel=1e-12)


def test_losses_are_stable_for_huge_logits():
    out = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 2e4]], dtype=np.float32)
    ce = SoftmaxCrossEntropy()
    value = ce.forward(out, np.array([1, 2]))
    assert value == pytest.approx(2e4 + np.log(2), rel=1e-6)
    assert np.all(np.isfinite(ce.backward()))
    bce = BCEWithLogits()
    assert np.isfinite(bce.forward(out, np.ones_like(out)))
    assert np.all(np.isfinite(bce.backward()))


def test_vector_targets_for_single_output_and_dtype():
    out = np.array([[0.5], [-1.0], [2.0]], dtype=np.float32)
    y = np.array([1, 0, 0])
    for loss in (MSE(), BCEWithLogits()):
        loss.forward(out, y)
        assert loss.backward().dtype == np.float32
    assert BCEWithLogits().correct(out, y) == 2
    assert MSE().correct(out, y) == 0
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert SoftmaxCrossEntropy().correct(logits, np.array([0, 1, 1])) == 2


def test_loss_errors_name_the_problem():
    ce = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        ce.forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        ce.forward(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="do not match"):
        MSE().forward(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(RuntimeError, match="before forward"):
        MSE().backward()
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        make_loss("ranking")


@pytest.mark.parametrize("task", ["classification", "regression", "binary"])
def test_sum_over_rows_divided_by_n_is_torch_mean(task):
    torch = import_torch()
    rng = np.random.default_rng(2)
    out, y = rng.standard_normal((7, 4)), targets(task, rng, 7, 4)
    reference = {"classification": torch.nn.CrossEntropyLoss, "regression": torch.nn.MSELoss,
                 "binary": torch.nn.BCEWithLogitsLoss}[task]()
    t_out = torch.tensor(out, requires_grad=True)
    t_loss = reference(t_out, torch.tensor(y))
    t_loss.backward()
    loss = make_loss(task)
    assert loss.forward(out, y) / 7 == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(loss.backward() / 7, t_out.grad.numpy(), rtol=1e-10, atol=1e-14)


SMOOTH_WEIGHT_CASES = [(0.1, None), (0.0, [0.5, 2.0, 1.0, 0.25]), (0.3, [1.0, 0.0, 3.0, 0.5]), (1.0, None)]


@pytest.mark.parametrize("eps,weights", SMOOTH_WEIGHT_CASES)
def test_smoothed_weighted_cross_entropy_backward_matches_finite_differences(eps, weights):
    rng = np.random.default_rng(3)
    out, y = 2 * rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    loss = SoftmaxCrossEntropy(eps, weights)
    loss.forward(out, y)
    dout = loss.backward()
    assert dout.shape == out.shape and dout.dtype == out.dtype
    assert rel_err(dout, numeric_grad(lambda: loss.forward(out, y), out)) < 1e-6


@pytest.mark.parametrize("eps,weights", SMOOTH_WEIGHT_CASES)
def test_smoothed_weighted_cross_entropy_matches_torch(eps, weights):
    torch = import_torch()
    rng = np.random.default_rng(4)
    out, y = 3 * rng.standard_normal((9, 4)), rng.integers(0, 4, 9)
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=eps)
    t_out = torch.tensor(out, requires_grad=True)
    t_loss = reference(t_out, torch.tensor(y))
    t_loss.backward()
    loss = SoftmaxCrossEntropy(eps, weights)
    norm = loss.total_weight(y)
    assert loss.forward(out, y) / norm == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(loss.backward() / norm, t_out.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_smoothing_and_weights_keep_the_plain_loss_when_neutral_and_are_stable():
    rng = np.random.default_rng(5)
    out, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    plain, neutral = SoftmaxCrossEntropy(), SoftmaxCrossEntropy(0.0, [1.0, 1.0, 1.0])
    assert neutral.forward(out, y) == pytest.approx(plain.forward(out, y), rel=1e-14)
    np.testing.assert_allclose(neutral.backward(), plain.backward(), rtol=1e-14, atol=1e-16)
    assert neutral.total_weight(y) == plain.total_weight(y) == 5
    huge = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 2e4]], dtype=np.float32)
    smooth = SoftmaxCrossEntropy(0.1, [1.0, 2.0, 1.0])
    assert np.isfinite(smooth.forward(huge, np.array([1, 2])))
    assert np.all(np.isfinite(smooth.backward())) and smooth.dout is None


def test_balanced_weights_are_scikit_learns_n_over_classes_times_count():
    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(balanced_weights(np.bincount(y)), [6 / 9, 6 / 3, 6 / 6], rtol=1e-15)
    with pytest.raises(ValueError, match="class 1 has no rows"):
        balanced_weights([3, 0, 2])


def test_bad_smoothing_and_weights_name_the_problem():
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        SoftmaxCrossEntropy(1.5)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        SoftmaxCrossEntropy(0.0, [1.0, -1.0])
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        SoftmaxCrossEntropy(0.0, [1.0, 1.0]).forward(np.zeros((2, 3)), np.array([0, 1]))
