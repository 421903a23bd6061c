"""distbp.sklearn: scikit-learn's estimator checks, Pipeline, cross_val_score, GridSearchCV, DataFrames, and the
same model in one process and data-parallel under mpirun."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

from conftest import run_distbp
from distbp.sklearn import MLPClassifier, MLPRegressor

ESTIMATORS = [MLPClassifier(max_iter=15, random_state=0), MLPRegressor(max_iter=15, random_state=0)]
# Every check of scikit-learn's check_estimator runs and passes but check_array_api_input, which needs
# SCIPY_ARRAY_API=1 before SciPy is first imported and the array-api-strict package (scikit-learn skips it
# without them): distbp computes in NumPy and converts other arrays with check_array, as MLPClassifier does.
NOT_RUN = {"check_array_api_input"}


def check_name(check) -> str:
    """The name of an estimator check (a function or a functools.partial of one)."""
    return getattr(check, "func", check).__name__


CHECKS = [(estimator, check) for e in ESTIMATORS for estimator, check in estimator_checks_generator(e)
          if check_name(check) not in NOT_RUN]


@pytest.mark.parametrize("estimator, check", CHECKS, ids=lambda x: x if isinstance(x, str) else
                         type(x).__name__ if hasattr(x, "fit") else check_name(x))
def test_scikit_learn_estimator_checks(serial, estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_classifier_on_iris_next_to_scikit_learns_mlp(serial):
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]  # labels of any kind come back as given
    xt, xv, yt, yv = train_test_split(x, names, test_size=0.25, random_state=0, stratify=y)
    model = MLPClassifier(random_state=0).fit(xt, yt)
    assert set(model.predict(xv)) <= set(names) and model.predict_proba(xv).shape == (38, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = make_pipeline(StandardScaler(), SkMLPClassifier(random_state=0)).fit(xt, yt).score(xv, yv)
    assert model.score(xv, yv) >= theirs - 0.03, (model.score(xv, yv), theirs)
    assert model.n_iter_ == 30 and model.loss_ > 0


def test_pipeline_cross_val_score_and_grid_search(serial):
    x, y = load_wine(return_X_y=True)
    scores = cross_val_score(make_pipeline(StandardScaler(), MLPClassifier(max_iter=10, random_state=0)), x, y,
                             cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.85
    grid = GridSearchCV(MLPClassifier(max_iter=10, random_state=0),
                        {"hidden_layer_sizes": [(16,), (64,)], "learning_rate_init": [0.01, 0.05]}, cv=2).fit(x, y)
    assert set(grid.best_params_) == {"hidden_layer_sizes", "learning_rate_init"} and grid.best_score_ > 0.85
    model = MLPClassifier(config={"optim": {"name": "adamw"}}).set_params(max_iter=3, random_state=1)
    assert model.get_params()["max_iter"] == 3 and model.fit(x, y).n_iter_ == 3


def test_regressor_and_data_frames_keep_feature_names(serial):
    pandas = pytest.importorskip("pandas")
    data = load_diabetes(as_frame=True)
    xt, xv, yt, yv = train_test_split(data.data, data.target, test_size=0.25, random_state=0)
    model = MLPRegressor(random_state=0).fit(xt, yt)
    # scikit-learn's MLPRegressor (standardized, max_iter=2000): R^2 0.283-0.287 on this split; distbp 0.281-0.307
    assert list(model.feature_names_in_) == list(data.data.columns) and model.score(xv, yv) > 0.26
    assert model.predict(xv).shape == (len(xv),)
    two = MLPRegressor(max_iter=5, random_state=0).fit(xt, pandas.DataFrame({"y": yt, "twice": yt * 2}))
    assert two.predict(xv).shape == (len(xv), 2)


SCRIPT = """
import json, sys
from sklearn.datasets import load_wine
from distbp import rank
from distbp.sklearn import MLPClassifier
x, y = load_wine(return_X_y=True)
model = MLPClassifier(max_iter=5, random_state=0, config={{"train": {{"deterministic": True, "micro_batch": 8}}}})
proba = model.fit(x, y).predict_proba(x)
if rank() == 0:
    json.dump(proba.tolist(), open(sys.argv[1], "w"))
"""


def test_same_model_in_one_process_and_under_mpirun(serial, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT.format())
    for n in (1, 2):
        proc = run_distbp([tmp_path / f"p{n}.json"], n, script=script)
        assert proc.returncode == 0, proc.stderr
    one, two = (np.array(json.loads(Path(tmp_path / f"p{n}.json").read_text())) for n in (1, 2))
    np.testing.assert_array_equal(one, two)
