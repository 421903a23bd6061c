"""The model and loss a config describes for a dataset, and a checkpoint's parameters loaded into that model."""
from __future__ import annotations

import numpy as np

from ..config import Config, ConfigError
from ..datasets.dataset import Dataset
from ..datasets.task import TaskError
from ..errors import UserError, agree, require
from ..files import checkpoint as ckpt
from ..nn import Sequential, mlp_specs
from ..nn.losses import balanced_weights, loss_class
from ..parallel.sampler import shard


def build_model(cfg: Config, data: Dataset) -> Sequential:
    """The model the config describes, sized for the dataset, initialised from the seed."""
    m = cfg.model
    if m.layers:
        specs = [dict(s) for s in m.layers]
    else:
        flatten = [{"type": "flatten"}] if len(data.input_shape) > 1 else []
        specs = flatten + mlp_specs([int(np.prod(data.input_shape)), *m.hidden, data.output_dim],
                                    m.activation, m.dropout)
    try:
        model = Sequential(specs, data.input_shape, dtype=np.dtype(cfg.train.dtype), seed=cfg.train.seed)
    except ValueError as e:
        key = "model.layers" if m.layers else "model.hidden"
        raise ConfigError(f"{key}: {e} (the model for {data.path}, inputs {data.input_shape})") from None
    if model.out_shape != (data.output_dim,):
        raise UserError(f"model.layers ends with output shape {model.out_shape} but {data.path} "
                        f"needs ({data.output_dim},): make the last layer's out {data.output_dim}")
    return model


def label_counts(split, num_classes: int, rank: int, size: int, block: int = 1 << 20) -> np.ndarray:
    """Rows per class in this rank's contiguous part of a split, read block by block (sum them over the ranks)."""
    lo, hi = shard(split.n, rank, size)
    counts = np.zeros(num_classes, np.int64)
    for a in range(lo, hi, block):
        counts += np.bincount(split.labels(np.arange(a, min(a + block, hi))), minlength=num_classes)
    return counts


def build_loss(cfg: Config, data: Dataset, comm):
    """The loss of the dataset's task with loss.* applied; "balanced" class weights counted over the train split."""
    lc = cfg.loss
    if lc.name:
        return loss_class(lc.name)()  # validated with the config (its module imported)
    weights = lc.class_weights or None
    if weights == "balanced" and data.task.labels:
        split = agree(comm, data.split, cfg.data.train_split)
        counts = comm.allreduce_sum(agree(comm, label_counts, split, data.num_classes, comm.rank, comm.size))
        empty = [int(c) for c in np.flatnonzero(counts == 0)]
        agree(comm, require, not empty, f'loss.class_weights="balanced": class(es) {empty[:5]} have no rows in '
              f"split '{cfg.data.train_split}' of {data.path}; give the weights as a list, one per class")
        weights = balanced_weights(counts)
    return agree(comm, _task_loss, data, lc.label_smoothing, weights)


def _task_loss(data: Dataset, label_smoothing: float, class_weights):
    """The task's own loss with these options; UserError naming the dataset when they do not apply."""
    try:
        return data.task.loss(label_smoothing, class_weights)
    except TaskError as e:
        raise UserError(str(e).format(where=data.path)) from None


def check_architecture(ck: ckpt.Checkpoint, model):
    """Raise a CheckpointError listing names/shapes that differ from the model."""
    want = {n: tuple(s) for n, s in model.shapes.items()}
    have = {n: tuple(a.shape) for n, a in ck.params.items()}
    if want != have:
        diff = [f"{n}: checkpoint {have.get(n, 'missing')} vs model {want.get(n, 'missing')}"
                for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
        raise ckpt.CheckpointError(f"checkpoint {ck.path} is from a different architecture:\n  "
                                   + "\n  ".join(diff) + "\nHINT: use the model settings of that run, "
                                   "or --resume never (or another --run-dir) to start fresh")


def load_params(ck: ckpt.Checkpoint, model):
    """Copy a checkpoint's parameters and buffers into model, after checking the architecture."""
    check_architecture(ck, model)
    for name, view in model.views(model.params).items():
        view[...] = ck.params[name]
    for name, view in model.buffer_views(model.buffers).items():
        if name in ck.buffers:
            view[...] = ck.buffers[name]
