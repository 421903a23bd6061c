"""A trained model back from its checkpoint, evaluated data-parallel on a split."""
from __future__ import annotations

from . import checkpoint as ckpt
from .config import config_from_dict
from .data import Dataset, digits_path
from .errors import agree
from .nn import make_loss
from .train import build_model, evaluate, load_params


def load_model(path: str, comm, data_path: str | None = None, data_arg: str = "data.path"):
    """(model, dataset, config) from a checkpoint: rank 0 reads, parameters broadcast; data_arg names the
    dataset's argument in messages."""
    def on_root():
        return ckpt.load(path) if comm.is_root else None
    ck = agree(comm, on_root)
    config = comm.bcast_obj(ck.config if comm.is_root else None)
    cfg = agree(comm, config_from_dict, config)
    if data_path:
        cfg.data.path = data_path
    data = agree(comm, Dataset, cfg.data.path or digits_path(), data_arg)
    model = agree(comm, build_model, cfg, data)
    agree(comm, lambda: load_params(ck, model) if comm.is_root else None)
    comm.bcast(model.params)
    comm.bcast(model.buffers)
    model.eval()
    return model, data, cfg


def evaluate_checkpoint(path: str, comm, data_path: str | None = None, split: str = "val") -> dict:
    """Global loss (and accuracy) of a checkpoint's model on one split."""
    model, data, cfg = load_model(path, comm, data_path)
    part = agree(comm, data.split, split)
    part.load(cfg.data.memory_mb * 2**20, comm)
    result = evaluate(model, make_loss(data.task), part, comm, data.task == "classification")
    return {"split": split, "rows": part.n, **{k.replace("val_", ""): v for k, v in result.items()}}
