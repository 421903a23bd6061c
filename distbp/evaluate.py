"""Evaluation: a split's exact global loss and accuracy, and a trained model back from its checkpoint."""
from __future__ import annotations

import numpy as np

from . import checkpoint as ckpt
from . import faults
from .config import config_from_dict
from .data import Dataset, digits_path
from .errors import agree, on_root
from .nn.refs import no_imports
from .sampler import shard
from .state import build_loss, build_model, load_params
from .watchdog import configure as configure_watchdog


def evaluate(model, loss, split, comm, classification: bool, chunk: int = 1024) -> dict:
    """Exact global loss (the mean of the training loss) and accuracy over a split, each rank on a contiguous slice."""
    lo, hi = shard(split.n, comm.rank, comm.size)
    sums = np.zeros(4)  # loss sum, correct, rows, what the loss mean divides by (rows or summed class weights)
    faults.inject_at(comm.rank, "eval")  # inert unless DISTBP_FAULT is set (tests)
    model.eval()
    for a in range(lo, hi, chunk):
        indices = np.arange(a, min(a + chunk, hi))
        x, y = split.read(indices, model.params.dtype)
        out = model.forward(x)
        sums += (loss.forward(out, y), loss.correct(out, y), len(indices), loss.total_weight(y))
    model.train()
    comm.allreduce_sum(sums)
    result = {"val_loss": sums[0] / sums[3] if sums[3] else 0.0}
    if classification:
        result["val_accuracy"] = sums[1] / max(sums[2], 1)
    return result


def load_model(path: str, comm, data_path: str | None = None, data_arg: str = "data.path"):
    """(model, dataset, config) from a checkpoint: rank 0 reads, parameters broadcast; data_arg names the
    dataset's argument in messages."""
    ck = on_root(comm, ckpt.load, path)
    config = comm.bcast_obj(ck.config if comm.is_root else None)
    with no_imports(path):  # a checkpoint naming module:Class layers finds them only if already imported
        cfg = agree(comm, config_from_dict, config)
    configure_watchdog(comm, timeout=cfg.train.stall_timeout)  # the run's, from here on
    faults.inject_at(comm.rank, "setup")  # inert unless DISTBP_FAULT is set (tests)
    if data_path:
        cfg.data.path = data_path
    data = agree(comm, Dataset, cfg.data.path or digits_path(), data_arg)
    model = agree(comm, build_model, cfg, data)
    on_root(comm, load_params, ck, model)
    comm.bcast(model.params)
    comm.bcast(model.buffers)
    model.eval()
    return model, data, cfg


def evaluate_checkpoint(path: str, comm, data_path: str | None = None, split: str = "val") -> dict:
    """Global loss (and accuracy) of a checkpoint's model on one split."""
    model, data, cfg = load_model(path, comm, data_path)
    part = agree(comm, data.split, split)
    part.load(cfg.data.memory_mb * 2**20, comm)
    result = evaluate(model, build_loss(cfg, data, comm), part, comm, data.task == "classification")
    return {"split": split, "rows": part.n, **{k.replace("val_", ""): v for k, v in result.items()}}
