"""A run's state (model, optimizer, position) and how it moves between memory, ranks and checkpoints."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import checkpoint as ckpt
from ..config import Config, config_to_dict, config_to_json
from .early_stop import EARLY_STOP_KEYS
from ..schedules import PLATEAU_KEYS
from ..errors import agree, on_root
from ..inference.builders import load_params
from ..nn import Sequential
from ..datasets.normalize import Normalizer
from ..optim import make_optimizer
from ..parallel import faults
from ..parallel.zero import ShardedOptimizer, sharded


@dataclass
class Position:
    """Where a run is: optimizer steps taken, the global data position, forward/backward passes taken."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    micro_steps: int = 0

    @property
    def epoch_number(self) -> int:
        """The 1-based number of the epoch the last step belonged to, as logs, metrics and ckpt inspect count."""
        return self.epoch + 1


def build_optimizer(cfg: Config, model: Sequential, comm):
    """The optimizer the config names, on the flat vectors: whole, or this rank's slice (train.shard_optimizer)."""
    o, n, dtype = cfg.optim, model.params.size, model.params.dtype

    def make(size: int):
        return make_optimizer(o.name, size, dtype, **o.optimizer_options())
    if sharded(cfg.train.shard_optimizer, comm.size, n, cfg.train.overlap):
        return ShardedOptimizer(make, n, dtype, comm.rank, comm.size)
    return make(n)


def make_checkpoint(model, opt, states: dict, pos: Position, cfg: Config, world_size: int,
                    lr: float, early, norm: Normalizer) -> ckpt.Checkpoint:
    """The full training state as a Checkpoint (views, no copies); states are opt's whole state arrays."""
    attrs = {"step": pos.step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
             "samples_seen": pos.samples_seen, "micro_steps": pos.micro_steps, **early.state(),
             "world_size": world_size, "lr": lr,
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
    """Raise unless batch_size * accumulate_steps is the step size the checkpoint's data position counts in."""
    t, old = cfg.train, ck.config.get("train", {})
    old_b, old_k = old.get("batch_size", t.batch_size), old.get("accumulate_steps", 1)
    if old_b * old_k != t.batch_size * t.accumulate_steps:
        raise ckpt.CheckpointError(
            f"train.batch_size * train.accumulate_steps = {t.batch_size} * {t.accumulate_steps} differs from "
            f"{old_b} * {old_k} in {ck.path}, whose data position counts steps of {old_b * old_k} rows; HINT: "
            f"resume with --set train.batch_size={old_b} --set train.accumulate_steps={old_k} (or another split "
            f"of {old_b * old_k} rows), or start fresh with --resume never")


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
    attrs = {k: ck.attrs[k] for k in ckpt.POSITION_KEYS}
    attrs["micro_steps"] = ck.attrs.get("micro_steps", attrs["step"])  # one pass per step before accumulation
    attrs.update({k: ck.attrs[k] for k in (*EARLY_STOP_KEYS, *PLATEAU_KEYS, *EPOCH_KEYS) if k in ck.attrs})
    return {"scalars": scalars, "attrs": attrs, "config": ck.config, "path": ck.path,
            "normalization": ck.normalization}


def resume_state(resume: str, run_dir: Path, model, opt, early, cfg: Config, comm,
                 log) -> tuple[Position, dict | None, Normalizer | None]:
    """Load (rank 0), check and broadcast the resume state into model, opt and early (the state evaluations
    move: early stopping's and a plateau schedule's, each with load(attrs)): its Position, the
    checkpoint's config and its stored normalization (fresh: Position(), None, None)."""
    flats = {k: np.zeros_like(model.params) for k in opt.state_arrays()}  # whole vectors, sharded or not

    def load():
        found = find_resume(resume, run_dir / "checkpoints", log)
        return None if found is None else restore_root(found, model, opt, flats, cfg, log)
    info = comm.bcast_obj(on_root(comm, load))
    if info is None:
        return Position(), None, None
    for a in (model.params, model.buffers, *flats.values()):
        comm.bcast(a)
    if info["scalars"] is not None:
        agree(comm, opt.load_state, flats, info["scalars"])
    a = info["attrs"]
    log(f"resumed from {info['path']} at step {a['step']} (epoch {a['epoch'] + 1}, "
        f"{a['step_in_epoch']} steps into it), written by {a['world_size']} rank(s), now {comm.size}")
    changes = config_changes(info["config"], config_to_dict(cfg))
    if a["world_size"] != comm.size:
        changes.append(f"world_size: {a['world_size']} -> {comm.size}")
    for line in changes:
        log(f"config changed on resume: {line}")
    early.load(a)
    return (Position(a["step"], a["epoch"], a["step_in_epoch"], a["samples_seen"], a["micro_steps"]), info["config"],
            Normalizer(info["normalization"]))


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
            faults.inject_at(0, "saving")  # inert unless DISTBP_FAULT is set (tests)
            errors.append(saver.wait())
    except (OSError, RuntimeError) as e:  # h5py reports some failures as RuntimeError
        errors.append(e)
    final_error = errors.pop() if final else None
    kept = previous_checkpoint(path)
    for e in filter(None, errors):
        log(f"WARNING: a checkpoint could not be written ({e}); {kept}, training continues")
    if final_error:
        raise ckpt.CheckpointError(f"checkpoint {path} could not be written ({final_error}); {kept}; "
                                   "HINT: free space or make the run directory writable, then --resume auto")


def previous_checkpoint(path: Path) -> str:
    """'the previous checkpoint (NAME) is intact', or that there is none, for a failed save at path."""
    try:
        earlier = [p for p in ckpt.list_checkpoints(path.parent) if p != path]
    except OSError:  # the folder itself can no longer be read (the permission that failed the save)
        return "the previous checkpoint, if any, is intact"
    return (f"the previous checkpoint ({earlier[-1].name}) is intact" if earlier
            else "no earlier checkpoint exists (checkpoint.every_steps=0 saves only at the end)")


EPOCH_KEYS = ("epoch_loss_sum", "epoch_divisor", "epoch_correct", "epoch_rows")  # checkpoint attributes


class EvalState:
    """The state evaluations move (early stopping's, the plateau schedule's), as one for checkpoints."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if p is not None]

    def state(self) -> dict:
        """Every part's checkpoint attributes."""
        return {k: v for p in self.parts for k, v in p.state().items()}

    def load(self, attrs: dict):
        """Every part continues from a checkpoint's attributes."""
        for p in self.parts:
            p.load(attrs)


class EpochSums:
    """The train loss and accuracy of the steps of one epoch, exact over all its rows and ranks."""

    def __init__(self):
        self.loss_sum, self.divisor, self.correct, self.rows = 0.0, 0.0, 0.0, 0.0

    def add(self, loss_sum: float, divisor: float, correct: float, rows: float):
        """Count one step's reduced sums (the same on every rank)."""
        self.loss_sum, self.divisor = self.loss_sum + loss_sum, self.divisor + divisor
        self.correct, self.rows = self.correct + correct, self.rows + rows

    def means(self, accuracy: bool) -> dict:
        """{train_loss, train_accuracy} of the epoch's steps so far, then start the next epoch from zero."""
        out = {"train_loss": self.loss_sum / self.divisor} if self.divisor else {}
        if accuracy and self.rows:
            out["train_accuracy"] = self.correct / self.rows
        self.__init__()
        return out

    def state(self) -> dict:
        """The sums so far (a checkpoint mid-epoch keeps them, so a resumed epoch's means stay exact)."""
        return dict(zip(EPOCH_KEYS, (self.loss_sum, self.divisor, self.correct, self.rows)))

    def load(self, attrs: dict):
        """Continue from a checkpoint's sums (none in older checkpoints: from zero)."""
        if EPOCH_KEYS[0] in attrs:
            self.loss_sum, self.divisor, self.correct, self.rows = (float(attrs[k]) for k in EPOCH_KEYS)
