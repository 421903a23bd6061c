"""The task objects: each owns its targets' dtype and checks, loss, metrics, best metric, and predictions."""
import numpy as np
import pytest

from distbp.datasets.task import TASKS, BadTarget, Binary, Classification, Regression, TaskError, task_named
from distbp.datasets.normalize import Normalizer
from distbp.nn import MSE, BCEWithLogits, SoftmaxCrossEntropy
from distbp.reporting.scores import monitored


def test_registry_names_each_task_and_refuses_others():
    assert sorted(TASKS) == ["binary", "classification", "regression"]
    assert task_named("classification", 4).num_classes == 4 and str(task_named("binary")) == "binary"
    for bad in ("ranking", ["classification"], None, 3):
        with pytest.raises(TaskError, match="is not one of classification, regression, binary"):
            task_named(bad)


def test_targets_dtype_shape_and_values():
    c, r, b = Classification(3), Regression(), Binary()
    assert c.read_dtype(np.float32) == np.int64 and r.read_dtype(np.float32) == np.float32
    assert c.check_targets(np.zeros(4, np.int64)) is None and "integer class labels" in c.check_targets(np.zeros(4))[0]
    assert r.check_targets(np.zeros((4, 2))) is None and "floats" in r.check_targets(np.zeros(4, np.int64))[0]
    assert list(c.bad_targets(np.array([[0], [3], [-1], [2]]))) == [False, True, True, False]
    assert list(b.bad_targets(np.array([[0.5], [1.5], [np.nan]]))) == [False, True, True]
    assert list(r.bad_targets(np.array([[1e30], [np.inf]]))) == [False, True]
    assert c.output_dim(np.zeros(5)) == 3 and r.output_dim(np.zeros((5, 2))) == 2 and b.output_dim(np.zeros(5)) == 1


def test_convert_targets_labels_and_their_errors():
    c = Classification()
    np.testing.assert_array_equal(c.convert_targets(np.array([[0, 1, 0], [0, 0, 1]])), [1, 2])  # one-hot
    np.testing.assert_array_equal(c.convert_targets(np.array([[2.0], [0.0]])), [2, 0])
    with pytest.raises(BadTarget) as e:
        c.convert_targets(np.array([1.0, 2.5]))
    assert e.value.row == 1 and "not a class index" in e.value.problem.format(row=7)
    with pytest.raises(BadTarget, match="not in \\[0, 1\\]"):
        Binary().convert_targets(np.array([0.2, 1.2]))
    assert Regression().convert_targets(np.array([1, 2])).dtype == np.float32


def test_loss_metrics_and_best():
    assert isinstance(Classification(3).loss(0.1, [1, 2, 3]), SoftmaxCrossEntropy)
    assert isinstance(Regression().loss(), MSE) and isinstance(Binary().loss(), BCEWithLogits)
    with pytest.raises(TaskError, match="apply to classification, but {where} is a regression dataset"):
        Regression().loss(label_smoothing=0.1)
    with pytest.raises(TaskError, match="has 2 weights .* has 3 classes"):
        Classification(3).loss(class_weights=[1.0, 2.0])
    assert monitored("auto", Classification(3)) == ("val_accuracy", "max")
    assert monitored("auto", Regression()) == ("val_loss", "min")
    assert Regression().accuracy is False and Binary().accuracy and Classification().labels


def test_predictions_per_task():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    out = Classification(3).outputs(logits)
    np.testing.assert_array_equal(out["class"], [0, 1])
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-6)
    b = Binary().outputs(np.array([[0.0], [2.0], [-2.0]]))
    np.testing.assert_array_equal(b["class"][:, 0], [0, 1, 0])
    norm = Normalizer({"y_mean": np.array([1.0]), "y_shift": np.array([10.0]), "y_scale": np.array([2.0])})
    np.testing.assert_allclose(Regression().target_units(np.array([[1.0]]), norm), [[12.0]])
    assert Regression().outputs(np.array([[1.0], [2.0]]))["output"].shape == (2,)
    assert (Classification.predicted, Classification.probability) == ("class", "probabilities")
    assert Regression.probability is None
