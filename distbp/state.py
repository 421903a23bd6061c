"""A run's state (model, optimizer, position) and how it moves between memory, ranks and checkpoints."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_to_dict, config_to_json
from .data import Dataset
from .errors import UserError, agree, on_root
from .nn import Sequential, mlp_specs
from .normalize import Normalizer
from .optim import make_optimizer
from .zero import ShardedOptimizer


@dataclass
class Position:
    """Where a run is: optimizer steps taken and the global data position."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0


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


def build_optimizer(cfg: Config, model: Sequential, comm):
    """The optimizer the config names, on the flat vectors: whole, or this rank's slice (train.shard_optimizer)."""
    o, n, dtype = cfg.optim, model.params.size, model.params.dtype

    def make(size: int):
        return make_optimizer(o.name, size, dtype, **o.optimizer_options())
    if cfg.train.shard_optimizer and 1 < comm.size <= n:
        return ShardedOptimizer(make, n, dtype, comm.rank, comm.size)
    return make(n)


def make_checkpoint(model, opt, states: dict, pos: Position, cfg: Config, world_size: int, lr: float,
                    norm: Normalizer) -> ckpt.Checkpoint:
    """The full training state as a Checkpoint (views, no copies); states are opt's whole state arrays."""
    attrs = {"step": pos.step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
             "samples_seen": pos.samples_seen, "world_size": world_size, "lr": lr,
             "config": config_to_json(cfg),
             "rng": json.dumps({"init": {"seed": cfg.train.seed},
                                "sampler": {"seed": cfg.train.seed, "epoch": pos.epoch,
                                            "stream": "PCG64(SeedSequence([seed, epoch]))"},
                                "dropout": {"seed": cfg.train.seed, "counter": "(step, layer, row, column)",
                                            "step": pos.step}})}
    return ckpt.Checkpoint(params=model.views(model.params),
                           opt_name=cfg.optim.name,
                           opt_arrays={k: model.views(a) for k, a in states.items()},
                           opt_scalars=opt.state_scalars(),
                           buffers=model.buffer_views(model.buffers),
                           normalization=norm.arrays,
                           attrs=attrs)


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


def find_resume(resume: str, ckpt_dir: Path, log) -> ckpt.Checkpoint | None:
    """The checkpoint to resume from (rank 0 only), or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = ckpt.latest_valid(ckpt_dir, log)
        if found is None:
            log(f"no valid checkpoint in {ckpt_dir}: starting fresh")
        return found
    return ckpt.load(resume)


def config_changes(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every key that differs."""
    return [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}"
            for s, values in new.items() for k, v in values.items() if old.get(s, {}).get(k) != v]


def check_same_batch(ck: ckpt.Checkpoint, cfg: Config):
    """Raise unless the global batch size is the one the checkpoint's data position counts in."""
    old = ck.config.get("train", {}).get("batch_size", cfg.train.batch_size)
    if old != cfg.train.batch_size:
        raise ckpt.CheckpointError(
            f"train.batch_size={cfg.train.batch_size} differs from {old} in {ck.path}, whose data "
            f"position counts steps of {old} rows; HINT: resume with --set train.batch_size={old}, "
            "or start fresh with --resume never")


def check_same_normalization(ck: ckpt.Checkpoint, cfg: Config):
    """Raise unless data.normalize and data.normalize_targets are those the checkpoint was trained with."""
    old = ck.config.get("data", {})  # a version-1 checkpoint has neither key: it had no normalization
    was = (old.get("normalize", "none"), old.get("normalize_targets", False))
    now = (cfg.data.normalize, cfg.data.normalize_targets)
    if was != now:
        raise ckpt.CheckpointError(
            f"data.normalize={now[0]!r}, data.normalize_targets={str(now[1]).lower()} differ from "
            f"{was[0]!r}, {str(was[1]).lower()} that {ck.path} was trained with; HINT: resume with --set "
            f"data.normalize={was[0]} --set data.normalize_targets={str(was[1]).lower()}, or start fresh "
            "with --resume never")


def restore_root(ck: ckpt.Checkpoint, model, opt, flats: dict, cfg: Config, log) -> dict:
    """Copy a checkpoint's parameters into model and its optimizer state into flats (rank 0); what to broadcast."""
    check_same_batch(ck, cfg)
    check_same_normalization(ck, cfg)
    load_params(ck, model)
    scalars = None
    if ck.opt_name == cfg.optim.name and set(ck.opt_arrays) == set(flats):
        for state, flat in flats.items():
            for name, view in model.views(flat).items():
                view[...] = ck.opt_arrays[state][name]
        scalars = dict(ck.opt_scalars)
    else:
        log(f"optimizer changed from {ck.opt_name} {sorted(ck.opt_arrays)} to {cfg.optim.name} "
            f"{sorted(flats)}: its state starts fresh")
    return {"scalars": scalars, "attrs": {k: ck.attrs[k] for k in ckpt.POSITION_KEYS},
            "config": ck.config, "path": ck.path, "normalization": ck.normalization}


def resume_state(resume: str, run_dir: Path, model, opt, cfg: Config, comm, log) -> tuple[Position, Normalizer | None]:
    """Load (rank 0), check and broadcast the resume state: (position, stored normalization), or (Position(), None)."""
    flats = {k: np.zeros_like(model.params) for k in opt.state_arrays()}  # whole vectors, sharded or not

    def load():
        found = find_resume(resume, run_dir / "checkpoints", log)
        return None if found is None else restore_root(found, model, opt, flats, cfg, log)
    info = comm.bcast_obj(on_root(comm, load))
    if info is None:
        return Position(), None
    for a in (model.params, model.buffers, *flats.values()):
        comm.bcast(a)
    if info["scalars"] is not None:
        agree(comm, opt.load_state, flats, info["scalars"])
    a = info["attrs"]
    log(f"resumed from {info['path']} at step {a['step']} (epoch {a['epoch']}, "
        f"step {a['step_in_epoch']} of it), written by {a['world_size']} rank(s), now {comm.size}")
    changes = config_changes(info["config"], config_to_dict(cfg))
    if a["world_size"] != comm.size:
        changes.append(f"world_size: {a['world_size']} -> {comm.size}")
    for line in changes:
        log(f"config changed on resume: {line}")
    return Position(a["step"], a["epoch"], a["step_in_epoch"], a["samples_seen"]), Normalizer(info["normalization"])


def save_checkpoint(saver, path: Path, make, keep: int, log, final: bool, best: bool = False):
    """Rank 0 writes make() at path (to disk in the background), marks it best if so, prunes; only a failed
    final save raises."""
    def after_seal():
        if best:
            ckpt.mark_best(path)
        ckpt.prune(path.parent, keep, path)

    errors = []
    try:
        errors.append(saver.wait())  # the previous save's error, reported even if this write fails too
        errors.append(saver.save(path, make(), then=after_seal))
        if final:
            errors.append(saver.wait())
    except (OSError, RuntimeError) as e:  # h5py reports some failures as RuntimeError
        errors.append(e)
    final_error = errors.pop() if final else None
    for e in filter(None, errors):
        log(f"WARNING: a checkpoint could not be written ({e}); the previous one is intact, "
            "training continues")
    if final_error:
        raise ckpt.CheckpointError(f"checkpoint {path} could not be written ({final_error}); "
                                   "the previous checkpoint is intact")


# ---- the cross-rank check (train.check_every) ----

class DivergenceError(UserError):
    """The parameters differ between ranks."""

    agreed = True  # every rank raises it from the same gathered hashes


def param_hash(params: np.ndarray) -> int:
    """CRC-32 of the parameter bytes: equal only if (almost surely) bitwise equal."""
    return zlib.crc32(memoryview(params).cast("B"))


def rank_groups(hashes) -> list[list[int]]:
    """Ranks grouped by equal hash, groups ordered by their first rank."""
    groups: dict[int, list[int]] = {}
    for r, h in enumerate(hashes):
        groups.setdefault(int(h), []).append(r)
    return sorted(groups.values())


def check_consistent(comm, params: np.ndarray, step: int):
    """Compare the parameter hash across ranks (one int each); raise DivergenceError naming the ranks."""
    hashes = np.zeros(comm.size, np.int64)
    hashes[comm.rank] = param_hash(params)
    comm.allgatherv(hashes, [1] * comm.size)
    groups = rank_groups(hashes)
    if len(groups) > 1:
        which = "; ".join(f"rank(s) {', '.join(map(str, g))} have crc32 {int(hashes[g[0]]):08x}" for g in groups)
        raise DivergenceError(f"parameters differ across ranks after step {step}: {which}. HINT: every rank "
                              "must run the same distbp, numpy and BLAS build; a rank's memory or an "
                              "interconnect may be faulty. Resume from the last checkpoint")
