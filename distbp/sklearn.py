"""scikit-learn estimators over distbp.train: MLPClassifier and MLPRegressor on arrays or DataFrames, in one
process, or data-parallel when every rank of a launcher calls fit with the same data (pip install
'distbp[sklearn]')."""
from __future__ import annotations

import contextlib
import io
import numbers
import shutil
import tempfile
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from . import api
from .datasets.dataset import write_dataset
from .files.bounded import written_here
from .parallel.comm import world


class _DistbpMLP(BaseEstimator):
    """The parameters and fit shared by both estimators. Training is in float64, as scikit-learn's MLP on
    float64 input, so a row's prediction does not depend on the other rows it is predicted with."""

    def __init__(self, hidden_layer_sizes=(128,), activation="relu", solver="sgd", learning_rate_init=0.05,
                 momentum=0.9, alpha=0.0, batch_size=64, max_iter=30, random_state=None, config=None,
                 verbose=False):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.momentum = momentum
        self.alpha = alpha
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.random_state = random_state
        self.config = config
        self.verbose = verbose

    def _config(self, data_path: Path, seed: int) -> dict:
        """The distbp config of this estimator: its parameters, then the sections of `config` over them."""
        optim = {"name": self.solver, "lr": float(self.learning_rate_init), "weight_decay": float(self.alpha)}
        if self.solver in ("sgd", "rmsprop"):
            optim["momentum"] = float(self.momentum)
        tables = {"model": {"hidden": [int(h) for h in self.hidden_layer_sizes], "activation": self.activation},
                  "data": {"path": str(data_path), "val_split": ""},
                  "train": {"epochs": int(self.max_iter), "batch_size": int(self.batch_size), "seed": seed,
                            "dtype": "float64"},
                  "optim": optim, "checkpoint": {"keep": 1}}
        for section, values in (self.config or {}).items():
            tables[section] = {**tables.get(section, {}), **values}
        return tables

    def _seed(self, comm) -> int:
        """random_state as distbp's train.seed, drawn on rank 0 when it is None or a RandomState."""
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        seed = int(check_random_state(self.random_state).randint(2**31 - 1)) if comm.is_root else None
        return comm.bcast_obj(seed)

    def _train(self, x: np.ndarray, y: np.ndarray, task: str, num_classes: int | None):
        """distbp.train on (x, y) in a folder of the temporary directory (rank 0 writes; every rank reads)."""
        comm = world()
        seed = self._seed(comm)
        folder = Path(comm.bcast_obj(tempfile.mkdtemp(prefix="distbp-sklearn-") if comm.is_root else None))
        try:
            if comm.is_root:
                write_dataset(folder / "data.h5", {"train": (x, y)}, task, num_classes)
            comm.barrier()
            if not (folder / "data.h5").exists():
                raise api.UserError(f"{folder} (rank 0's temporary folder) is not seen by rank {comm.rank}; "
                                    "HINT: set TMPDIR to a folder every node shares")
            out = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
            with out, written_here(folder):
                summary = api.train(self._config(folder / "data.h5", seed), run_dir=folder / "run",
                                    resume="never", progress="auto" if self.verbose else "none")
                self.model_ = api.load(folder / "run")
            comm.barrier()  # every rank has read the checkpoint before rank 0 removes it
        finally:
            if comm.is_root:
                shutil.rmtree(folder, ignore_errors=True)
        self.n_iter_ = max(1, round(summary["epochs"]))
        self.loss_ = summary.get("train_loss")
        return self

    def _outputs(self, X) -> np.ndarray:
        """Validated rows of X for the fitted model, as float64."""
        check_is_fitted(self, "model_")
        return validate_data(self, X, reset=False, dtype=np.float64)


class MLPClassifier(ClassifierMixin, _DistbpMLP):
    """A distbp MLP classifier (softmax cross-entropy) with scikit-learn's interface; classes_ any labels.
    The defaults are those of `distbp train` (its digits config)."""

    def fit(self, X, y):
        """Train on X (N, D) and labels y (N,); returns self."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"MLPClassifier needs samples of at least 2 classes; the data has 1 class: "
                             f"{self.classes_[0]!r}")
        return self._train(X, codes.astype(np.int64), "classification", len(self.classes_))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, len(classes_)), columns in the order of classes_."""
        x = self._outputs(X)
        return self.model_.predict_proba(x).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, as a label of classes_."""
        best = self.predict_proba(X).argmax(axis=1)
        return self.classes_[best]


class MLPRegressor(RegressorMixin, _DistbpMLP):
    """A distbp MLP regressor (mean squared error on standardized targets) with scikit-learn's interface.
    The defaults are those of examples/regression.toml: Adam at 0.003 for 40 epochs."""

    def __init__(self, hidden_layer_sizes=(64, 64), activation="tanh", solver="adam", learning_rate_init=0.003,
                 momentum=0.9, alpha=0.0, batch_size=64, max_iter=40, random_state=None, config=None,
                 verbose=False):
        super().__init__(hidden_layer_sizes, activation, solver, learning_rate_init, momentum, alpha, batch_size,
                         max_iter, random_state, config, verbose)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Train on X (N, D) and targets y (N,) or (N, k); returns self."""
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True)
        y = np.asarray(y, np.float64)
        self._y_1d = y.ndim == 1
        return self._train(X, y, "regression", None)

    def predict(self, X) -> np.ndarray:
        """Predicted targets: (N,) when fitted on (N,) targets, else (N, k)."""
        x = self._outputs(X)
        out = np.asarray(self.model_.predict(x), np.float64)
        return out.reshape(len(out), -1)[:, 0] if self._y_1d else out.reshape(len(out), -1)
