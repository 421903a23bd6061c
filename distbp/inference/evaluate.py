"""Evaluation: a split's exact global loss and task metrics, and a trained model back from its checkpoint."""
from __future__ import annotations

import math

import numpy as np

from ..files import checkpoint as ckpt
from ..parallel import faults
from ..config import ConfigError, config_from_dict
from ..datasets.dataset import digits_path
from ..datasets.fetch import open_dataset
from ..errors import agree, on_root
from ..nn.refs import no_imports
from ..datasets.normalize import Normalizer
from ..parallel.sampler import shard
from .builders import build_loss, build_model, load_params
from ..parallel.watchdog import configure as configure_watchdog


# Activation bytes of one evaluation chunk: a 28x28 CNN (digits-cnn, 530 KB of layer outputs per row) evaluated
# its val split in 1.7-2.1 s in 1024-row chunks and 1.0-1.3 s in 128-256-row ones (load 12-15, one thread).
CHUNK_BYTES = 128 * 2**20


def eval_chunk(model) -> int:
    """Rows per evaluation chunk: a power of two from 16 to 1024 whose layer outputs fit in CHUNK_BYTES."""
    per_row = sum(math.prod(out) for _, out in model.shapes_io) * model.params.dtype.itemsize
    return min(1024, max(16, 2 ** int(math.log2(max(CHUNK_BYTES // max(per_row, 1), 1)))))


def evaluate(model, loss, split, comm, task, norm: Normalizer, class_names: list[str] | None = None,
             chunk: int | None = None) -> dict:
    """Exact global loss (the mean of the training loss) and the Task's metrics over a split, each rank on a
    contiguous slice.

    The loss is in the units the model is trained in; the task's own metrics (RMSE, MAE and R^2) in the
    original target units. With class_names (classification), adds the per-class report as "report".
    """
    lo, hi = shard(split.n, comm.rank, comm.size)
    chunk = chunk or eval_chunk(model)
    sums = np.zeros(4)  # loss sum, correct, rows, what the loss mean divides by (rows or summed class weights)
    scorers = task.scorers(model.out_shape[0], norm, class_names)
    faults.inject_at(comm.rank, "eval")  # inert unless DISTBP_FAULT is set (tests)
    model.eval()
    for a in range(lo, hi, chunk):
        x, y = split.read(np.arange(a, min(a + chunk, hi)), model.params.dtype)
        out = model.forward(norm.x(x))
        y_model = norm.y(y)
        sums += (loss.forward(out, y_model), loss.correct(out, y_model), len(y), loss.total_weight(y_model))
        for scorer in scorers:
            scorer.add_chunk(task.target_units(out, norm), out, y)
    model.train()
    for buf in (sums, *(s.buf for s in scorers)):
        comm.allreduce_sum(buf)
    result = {"val_loss": sums[0] / sums[3] if sums[3] else 0.0}
    if task.accuracy:
        result["val_accuracy"] = sums[1] / max(sums[2], 1)
    for scorer in scorers:
        result.update(scorer.metrics(sums[2]))
    return result


def build_stored_model(cfg, data, path: str):
    """build_model of a checkpoint's stored config; a model the config cannot make (too large for memory, say)
    is an error naming the checkpoint."""
    try:
        return build_model(cfg, data)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"the stored config of checkpoint {path}: {e}") from None


def load_model(path: str, comm, data_path: str | None = None, data_arg: str = "data.path"):
    """(model, dataset, config, normalizer) from a checkpoint: rank 0 reads, the rest is broadcast; data_arg
    names the dataset's argument in messages."""
    ck = on_root(comm, ckpt.load, path)
    config, norm = comm.bcast_obj((ck.config, ck.normalization) if comm.is_root else None)
    with no_imports(path):  # a checkpoint naming module:Class layers finds them only if already imported
        cfg = agree(comm, config_from_dict, config, training=False)
    configure_watchdog(comm, timeout=cfg.train.stall_timeout)  # the run's, from here on
    faults.inject_at(comm.rank, "setup")  # inert unless DISTBP_FAULT is set (tests)
    if data_path:
        cfg.data.path = data_path
    data = agree(comm, open_dataset, cfg.data.path or digits_path(), data_arg)
    model = agree(comm, build_stored_model, cfg, data, path)
    on_root(comm, load_params, ck, model)
    comm.bcast(model.params)
    comm.bcast(model.buffers)
    model.eval()
    return model, data, cfg, Normalizer(norm)


def evaluate_checkpoint(path: str, comm, data_path: str | None = None, split: str = "val") -> dict:
    """Global loss and metrics of a checkpoint's model on one split (with the class report)."""
    model, data, cfg, norm = load_model(path, comm, data_path)
    part = agree(comm, data.split, split, True, f"--split {' | '.join(data.splits)}")
    part.load(cfg.data.memory_mb * 2**20, comm)
    result = evaluate(model, build_loss(cfg, data, comm), part, comm, data.task, norm, data.class_names)
    return {"split": split, "rows": part.n, **{k.replace("val_", ""): v for k, v in result.items()},
            "checkpoint": str(path)}
