"""The Python API: train a config, load a trained model, under mpirun or without it (docs/API.md)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .files import checkpoint as ckpt
from .parallel.comm import SerialComm, world
from .parallel.guard import run_guarded
from .config import Config, config_to_dict, load_config
from .errors import NonFiniteError, UserError, agree
from .datasets.text import Vocabulary
from .inference.evaluate import load_model
from .inference.generate import generate_text
from .inference.predict import check_finite_inputs, model_inputs, normalized
from .files.rundir import default_path, remove_if_empty


def rank() -> int:
    """This process's rank in the launcher's world (0 without a launcher)."""
    return world().rank


def world_size() -> int:
    """Number of ranks the launcher started (1 without a launcher)."""
    return world().size


def _config(config) -> Config:
    """A Config from a Config (checked again: its fields may have been set), a dict of sections, or a
    TOML file path / shipped config name."""
    if isinstance(config, Config):
        return Config(config_to_dict(config))
    if isinstance(config, dict):
        return Config(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config))
    raise UserError(f"config={config!r} must be a distbp.Config, a dict of sections or a TOML file")


def _collective(comm, fn, *args):
    """fn(*args) on every rank: an error all ranks share is raised on each; an error on one rank
    alone prints it and aborts the whole job (as the CLI does) instead of leaving the others waiting."""
    def call():
        try:
            return fn(*args), None
        except (UserError, NonFiniteError) as e:
            if comm.size > 1 and isinstance(e, UserError) and not e.agreed:
                raise
            return None, e
    value, error = run_guarded(call, comm)
    if error is not None:
        raise error
    return value


def train(config, run_dir: str | os.PathLike | None = None, resume: str = "auto", force: bool = False,
          callbacks=(), progress: str = "auto") -> dict:
    """Train data-parallel on every rank of the launcher (one without); return the run's summary record.
    callbacks: distbp.Callback objects (hooks called on every rank); progress: auto, bar, lines or none."""
    from .training.loop import run  # here: inference (load) does not import the training loop
    from .reporting.progress import MODES
    if progress not in MODES:
        raise UserError(f"progress={progress!r} is not one of {', '.join(MODES)}")
    comm = world()

    def go():
        cfg = agree(comm, _config, config)
        where = run_dir or default_path(comm)
        try:
            summary = run(cfg, comm, where, str(resume), force, progress, callbacks=callbacks)
        except BaseException:
            if comm.is_root and not run_dir:  # a failed start leaves no empty runs/<time>
                remove_if_empty(where)
            raise
        return comm.bcast_obj(summary)  # rank 0's record, as in metrics.jsonl, on every rank
    return _collective(comm, go)


class Model:
    """A trained model back from a checkpoint: predict(x), predict_proba(x), and its config."""

    def __init__(self, network, task, x_scale: float | None, normalizer, config: Config, checkpoint: Path,
                 vocabulary=None, class_names: list[str] | None = None):
        self.network, self.task, self.config, self.checkpoint = network, task.name, config, checkpoint
        self.class_names = class_names  # the dataset's (text labels at conversion), else None
        self._task = task
        self.vocabulary = vocabulary  # a sequence model's (datasets.text.Vocabulary), else None
        self.input_shape = network.input_shape
        self._x_scale, self._normalizer = x_scale, normalizer

    def _outputs(self, x, batch: int) -> dict:
        """The task's outputs (as `distbp predict` writes them) of the rows of x, batch rows at a time."""
        x = np.asarray(x)
        if x.ndim == 0 or math.prod(x.shape[1:]) != math.prod(self.input_shape) or x.dtype.kind not in "fiu":
            raise ValueError(f"x of shape {x.shape} and dtype {x.dtype} does not hold rows of the model's input "
                             f"{self.input_shape}; give real numbers shaped (N, "
                             f"{', '.join(map(str, self.input_shape))}) or (N, {math.prod(self.input_shape)})")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a whole number of rows, at least 1")
        scale = (self._x_scale or 1 / 255) if x.dtype == np.uint8 else None  # as the dataset's uint8 rows
        dtype = self.network.params.dtype
        norm, chunks = self._normalizer, [self._task.outputs(np.zeros((0, *self.network.out_shape), dtype))]
        for a in range(0, len(x), batch):  # as distbp predict: the checkpoint's normalization in and out
            rows, k = normalized(norm, model_inputs(x[a:a + batch], self.input_shape, scale, dtype))
            check_finite_inputs("x", None if k is None else a + k)
            out = self.network.forward(rows)
            chunks.append(self._task.outputs(self._task.target_units(out, norm)))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}  # 0 rows: empty arrays

    def predict(self, x, batch: int = 1024) -> np.ndarray:
        """Class labels (classification: the class names where the dataset has them, else 0..K-1; binary: 0/1),
        outputs (regression) or next-token ids (sequence) for the rows of x."""
        out = self._outputs(x, batch)[self._task.predicted]
        return np.asarray(self.class_names)[out] if self.class_names and self._task.labels else out

    def predict_proba(self, x, batch: int = 1024) -> np.ndarray:
        """Class probabilities (classification: (N, K); binary: (N, k)) for the rows of x."""
        if self._task.probability is None:
            raise ValueError(f"predict_proba needs a classification or binary model; this one is {self.task}")
        return self._outputs(x, batch)[self._task.probability]


    def generate(self, prompt: str = "", tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> str:
        """The prompt and `tokens` sampled tokens of a sequence model, as text (the same seed, the same text)."""
        if self.vocabulary is None:
            raise ValueError(f"generate needs a sequence model (trained on `distbp data text` data); this one is "
                             f"{self.task}")
        return generate_text(self.network, self.vocabulary, prompt, tokens, temperature, top_k, seed)


def load(path: str | os.PathLike, data_path: str | None = None) -> Model:
    """The model of a checkpoint file, or of the newest valid checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest = ckpt.latest_valid(folder, log=lambda _: None)
        if newest is None:
            raise ckpt.CheckpointError(f"no valid checkpoint in {folder}")
        path = newest.path
    # this process alone (any rank may call it): rank 0 of a world of one reads and builds
    network, data, cfg, normalizer = load_model(str(path), SerialComm(), data_path)
    with data:
        vocab = Vocabulary.from_attrs(data.attrs, str(data.path)) if data.task.token_ids else None
        names = data.class_names if data.task.labels and "class_names" in data.attrs else None
        return Model(network, data.task, data.x_scale, normalizer, cfg, Path(path), vocab, names)
