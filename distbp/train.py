"""The training loop: run(cfg, comm) reads in the order of DESIGN.md's data flow."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from . import checkpoint as ckpt
from . import faults
from . import slurm
from .comm import set_thread_budget
from . import trackers
from .config import Config, ConfigError, config_from_dict, config_to_dict, config_to_json, config_to_toml
from .data import Dataset, batch_rows, digits_path, epoch_order, shard, steps_per_epoch
from .determinism import DeterministicStep, check_consistent, param_hash, pin_blas_threads
from .errors import EXIT_OK, EXIT_RESUMABLE, NonFiniteError, UserError, agree
from .metrics import RunLog, StepTimer, format_summary
from .progress import Progress
from .nn import Sequential, make_loss, mlp_specs
from .optim import make_optimizer, make_schedule
from .watchdog import Watchdog, rank_table


@dataclass
class Position:
    """Where a run is: optimizer steps taken and the global data position."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0

    @property
    def epoch_number(self) -> int:
        """The 1-based number of the epoch the last step belonged to, as logs, metrics and ckpt inspect count."""
        return self.epoch + 1


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


def build_optimizer(cfg: Config, model: Sequential):
    """The optimizer and LR schedule the config names, on the flat vectors."""
    o = cfg.optim
    return make_optimizer(o.name, model.params.size, model.params.dtype, **o.optimizer_options())


def schedule_of(cfg: Config, total: int):
    """The learning rate as a function of the step, over optim.schedule_steps if set, else the run's total."""
    o = cfg.optim
    try:
        return make_schedule(o.schedule, o.lr, total_steps=o.schedule_steps or total, **o.schedule_options())
    except ValueError as e:
        raise UserError(f"optim schedule settings: {e}") from None


def open_data(cfg: Config) -> tuple[Dataset, object, object]:
    """The dataset file and its train and validation splits (validated)."""
    data = Dataset(cfg.data.path or digits_path())
    train = data.split(cfg.data.train_split)
    val = data.split(cfg.data.val_split) if cfg.data.val_split else None
    train.check_batch_size(cfg.train.batch_size, cfg.train.drop_last)
    return data, train, val


def evaluate(model, loss, split, comm, classification: bool, chunk: int = 1024) -> dict:
    """Exact global loss (and accuracy) over a split, each rank on a contiguous slice."""
    lo, hi = shard(split.n, comm.rank, comm.size)
    sums = np.zeros(3)  # loss sum, correct, rows
    model.eval()
    for a in range(lo, hi, chunk):
        idx = np.arange(a, min(a + chunk, hi))
        x, y = split.read(idx, model.params.dtype)
        out = model.forward(x)
        sums += (loss.forward(out, y), loss.correct(out, y), len(idx))
    model.train()
    comm.allreduce_sum(sums)
    result = {"val_loss": sums[0] / max(sums[2], 1)}
    if classification:
        result["val_accuracy"] = sums[1] / max(sums[2], 1)
    return result


def make_checkpoint(model, opt, opt_name, pos: Position, cfg: Config, comm, lr: float) -> ckpt.Checkpoint:
    """The full training state as a Checkpoint (views, no copies)."""
    attrs = {"step": pos.step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
             "samples_seen": pos.samples_seen, "world_size": comm.size, "lr": lr,
             "config": config_to_json(cfg),
             "rng": json.dumps({"init": {"seed": cfg.train.seed},
                                "sampler": {"seed": cfg.train.seed, "epoch": pos.epoch,
                                            "stream": "PCG64(SeedSequence([seed, epoch]))"},
                                "dropout": {"seed": cfg.train.seed, "counter": "(step, layer, row, column)",
                                            "step": pos.step}})}
    return ckpt.Checkpoint(params=model.views(model.params),
                           opt_name=opt_name,
                           opt_arrays={k: model.views(a) for k, a in opt.state_arrays().items()},
                           opt_scalars=opt.state_scalars(),
                           buffers=model.buffer_views(model.buffers),
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


def restore_root(ck: ckpt.Checkpoint, model, opt, opt_name: str, log) -> dict:
    """Copy a checkpoint into model and optimizer on rank 0; return what to broadcast."""
    load_params(ck, model)
    scalars = {}
    if ck.opt_name == opt_name and set(ck.opt_arrays) == set(opt.state_arrays()):
        for state, flat in opt.state_arrays().items():
            for name, view in model.views(flat).items():
                view[...] = ck.opt_arrays[state][name]
        scalars = dict(ck.opt_scalars)
    else:
        log(f"optimizer changed from {ck.opt_name} {sorted(ck.opt_arrays)} to {opt_name} "
            f"{sorted(opt.state_arrays())}: its state starts fresh")
    return {"scalars": scalars, "attrs": {k: ck.attrs[k] for k in ckpt.POSITION_KEYS},
            "config": ck.config, "path": ck.path}


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


def resume_state(resume, run_dir, model, opt, cfg, comm, log) -> tuple[Position, dict | None]:
    """Load (rank 0), check and broadcast the resume state: its Position and config (fresh: Position(), None)."""
    def on_root():
        if not comm.is_root:
            return None
        found = find_resume(resume, run_dir / "checkpoints", log)
        if found is None:
            return None
        check_same_batch(found, cfg)
        return restore_root(found, model, opt, cfg.optim.name, log)
    info = comm.bcast_obj(agree(comm, on_root))
    for a in (model.params, model.buffers, *opt.state_arrays().values()):
        comm.bcast(a)
    if info is None:
        return Position(), None
    if info["scalars"]:
        opt.load_state(opt.state_arrays(), info["scalars"])
    a = info["attrs"]
    log(f"resumed from {info['path']} at step {a['step']} (epoch {a['epoch'] + 1}, "
        f"{a['step_in_epoch']} steps into it), written by {a['world_size']} rank(s), now {comm.size}")
    changes = config_changes(info["config"], config_to_dict(cfg))
    if a["world_size"] != comm.size:
        changes.append(f"world_size: {a['world_size']} -> {comm.size}")
    for line in changes:
        log(f"config changed on resume: {line}")
    return Position(a["step"], a["epoch"], a["step_in_epoch"], a["samples_seen"]), info["config"]


def total_steps(cfg: Config, per_epoch: int) -> int:
    """Optimizer steps of the whole run: train.epochs of per_epoch steps, capped by train.max_steps."""
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps >= 0 else total


def schedule_change(old_config: dict, cfg: Config, per_epoch: int, step: int) -> str | None:
    """A warning when a resume moves the schedule's horizon: the learning rate at step before and now."""
    try:
        old = config_from_dict(old_config)
        old_total, total = total_steps(old, per_epoch), total_steps(cfg, per_epoch)
        before, now = schedule_of(old, old_total)(step), schedule_of(cfg, total)(step)
    except UserError:  # the checkpoint's settings make no schedule here (say, another dataset size)
        return None
    if math.isclose(before, now, rel_tol=1e-6):
        return None
    was, span = old.optim.schedule_steps or old_total, cfg.optim.schedule_steps or total
    return (f"WARNING: the {cfg.optim.schedule} learning-rate schedule now spans {span} steps instead of {was}, "
            f"so the rate at the resumed step {step} changes from {before:.3g} to {now:.3g}; HINT: "
            f"--set optim.schedule_steps={was} keeps the original horizon (the rate then stays at its final "
            "value after it)")


def prepare_run_dir(run_dir: Path, cfg: Config, comm):
    """Create the run directory, its checkpoints folder and config.toml (rank 0)."""
    if not comm.is_root:
        return
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(run_dir / "checkpoints")
        (run_dir / "config.toml").write_text(config_to_toml(cfg))
    except OSError as e:
        raise UserError(f"run directory {run_dir} cannot be written ({e.strerror}); "
                        "choose another with --run-dir") from None


def save_checkpoint(saver, run_dir, model, opt, pos, cfg, comm, lr, log, timer, final: bool):
    """Rank 0 writes (sealed in the background) and prunes; only a failed final save raises."""
    if not comm.is_root:
        return
    timer.start()
    path = run_dir / "checkpoints" / ckpt.checkpoint_name(pos.step)
    errors = []
    try:
        errors.append(saver.wait())  # the previous save's error, reported even if this write fails too
        errors.append(saver.save(path, make_checkpoint(model, opt, cfg.optim.name, pos, cfg, comm, lr),
                                 then=lambda: ckpt.prune(path.parent, cfg.checkpoint.keep, path)))
        if final:
            errors.append(saver.wait())
    except (OSError, RuntimeError) as e:  # h5py reports a write that failed at close as RuntimeError
        errors.append(e)
    timer.lap("checkpoint")
    if final and errors[-1]:
        raise ckpt.CheckpointError(f"checkpoint {path} could not be written ({errors[-1]}); "
                                   "the previous checkpoint is intact")
    for e in filter(None, errors):
        log(f"WARNING: a checkpoint could not be written ({e}); the previous one is intact, "
            "training continues")


def run(cfg: Config, comm, run_dir: str | Path, resume: str = "auto", progress: str = "auto") -> int:
    """Train data-parallel as DESIGN.md describes; return the process exit code."""
    trainer = Trainer(cfg, comm, run_dir, resume, progress)
    try:
        return trainer.train()
    except BaseException:
        trainer.runlog.close()  # the trackers end their runs as failed
        raise


class Trainer:
    """One run: its data, model, optimizer and position, set up (or resumed) by __init__; train() is the loop."""

    def __init__(self, cfg: Config, comm, run_dir: str | Path, resume: str, progress: str = "auto"):
        self.cfg, self.comm, self.wall0 = cfg, comm, time.perf_counter()
        self.run_dir = run_dir = Path(comm.bcast_obj(str(run_dir)))
        self.data, self.train_split, self.val_split = agree(comm, open_data, cfg)
        self.model = model = agree(comm, build_model, cfg, self.data)
        self.loss = make_loss(self.data.task)
        self.opt = build_optimizer(cfg, model)
        self.per_epoch = steps_per_epoch(self.train_split.n, cfg.train.batch_size, cfg.train.drop_last)
        self.total = total_steps(cfg, self.per_epoch)
        self.lr_at = agree(comm, schedule_of, cfg, self.total)
        agree(comm, lambda: comm.is_root and trackers.check_installed(cfg.log))
        agree(comm, prepare_run_dir, run_dir, cfg, comm)  # after the input checks: a bad input leaves no run dir
        self.runlog = RunLog(run_dir, comm.is_root, self._progress(progress))
        self.log = self.runlog.info
        self._describe()
        self.pos, old_config = resume_state(resume, run_dir, model, self.opt, cfg, comm, self.log)
        self.best = None  # best val_accuracy of the run, resumes included
        if self.pos.step:
            self.best = self.runlog.best("val_accuracy", self.pos.step)
            self.runlog.record(resume=True, step=self.pos.step, epoch=self.pos.epoch_number, world_size=comm.size)
            if comm.is_root and (warning := schedule_change(old_config, cfg, self.per_epoch, self.pos.step)):
                self.log(warning)
        for split in (self.train_split, self.val_split):
            if split is not None:
                agree(comm, split.load, cfg.data.memory_mb * 2**20, comm)
        self.runlog.trackers = agree(comm, self._trackers)  # last: a run that fails to start leaves none behind
        self.timer, self.saver = StepTimer(), ckpt.BackgroundSaver()
        self.scalars = np.zeros(5)  # rows, loss sum, correct, stop flag, checkpoint-by-time flag
        self.result, self.lr, self.det = {}, self.lr_at(self.pos.step), None
        self._order, self._order_epoch = None, -1
        self._last_ckpt_time = time.monotonic()

    def _progress(self, mode: str) -> Progress | None:
        """Rank 0's progress display in the given mode (auto, bar, lines, none)."""
        if not self.comm.is_root:
            return None
        return Progress(mode, self.total, self.per_epoch, self.cfg.train.log_every, lambda msg: self.log(msg))

    def _trackers(self) -> list:
        """The trackers log.* enables, on rank 0."""
        if not self.comm.is_root:
            return []
        return trackers.open_trackers(self.cfg.log, self.run_dir, config_to_dict(self.cfg), config_to_toml(self.cfg))

    def _describe(self):
        """The run's first log lines: ranks, threads, SLURM, data, model."""
        comm, log = self.comm, self.log
        set_thread_budget(comm, log)
        log(f"distbp {__version__}: {comm.size} rank(s), run dir {self.run_dir}")
        if comm.size > 1:
            log(rank_table(comm))
        if slurm.describe():
            log(slurm.describe())
        val = self.val_split
        log(f"data {self.data.path}: {self.train_split.n} train rows, {val.n if val else 0} val rows, "
            f"task {self.data.task}")
        log(f"model: {self.model.num_params} parameters ({self.cfg.train.dtype})\n  "
            + "\n  ".join(self.model.describe()))

    def train(self) -> int:
        """The loop in DESIGN.md's data-flow order, then the final checkpoint and the summary."""
        cfg, pos, timer = self.cfg, self.pos, self.timer
        stop = slurm.StopRequest().install()
        stall = Watchdog(self.comm, cfg.train.stall_timeout, lambda: pos.step).start()
        self.comm = stall.watched()  # a rank that never arrives at the loop's collectives ends the job
        self.model.ctx.comm = self.comm
        if cfg.train.deterministic:
            self.det = DeterministicStep(self.model, self.loss, self.comm, cfg.train.micro_batch)
            self.log(pin_blas_threads())
            self.log(self.det.describe(cfg.train.batch_size))
        exit_code = EXIT_OK
        self.runlog.start_progress(pos.step, pos.samples_seen)
        try:
            while pos.step < self.total:
                t_step = time.perf_counter()
                timer.start()
                x, y, rows, global_rows = self.read_batch()
                timer.lap("data")
                self.forward_backward(x, y, rows, global_rows, stop.requested)
                timer.lap("backward")
                self.allreduce()
                timer.lap("allreduce")
                train_loss, skipped = self.optimizer_step()
                timer.lap("optimizer")
                self.advance()
                timer.step_done(time.perf_counter() - t_step, int(self.scalars[0]))
                self.report(train_loss, skipped)
                if self.scalars[3] > 0:
                    self.log(f"stop signal received: checkpoint at step {pos.step}, exit {EXIT_RESUMABLE} "
                             "(resumable)")
                    exit_code = EXIT_RESUMABLE
                    break
                self.checkpoint_if_due()
        finally:
            stall.stop()
            stop.restore()
            self.saver.wait()
        agree(self.comm, self.save, final=True)
        return self.finish(exit_code)

    def read_batch(self):
        """(x, y, global rows, global batch size) of this rank's slice of the step's global batch."""
        pos, cfg, n = self.pos, self.cfg, self.train_split.n
        if pos.step_in_epoch >= self.per_epoch:
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        if self._order_epoch != pos.epoch:
            self._order, self._order_epoch = epoch_order(cfg.train.seed, pos.epoch, n), pos.epoch
        B = cfg.train.batch_size
        if self.det:  # whole micro-shards, so each shard's math is the same on any rank
            idx, rows = self.det.batch_rows(self._order, pos.step_in_epoch, B, n)
        else:
            idx, rows = batch_rows(self._order, pos.step_in_epoch, B, self.comm.rank, self.comm.size)
        global_rows = min(B, n - pos.step_in_epoch * B)
        x, y = self.train_split.read(idx, self.model.params.dtype)
        return x, y, rows, global_rows

    def forward_backward(self, x, y, rows, global_rows: int, stop_requested: bool):
        """Forward, loss (a sum over local rows), backward of the global mean; the step's scalars."""
        model, loss = self.model, self.loss
        model.ctx.step, model.ctx.rows, model.ctx.global_rows = self.pos.step, rows, global_rows
        if self.det:  # forward and backward per micro-shard, timed together as backward
            self.scalars[:] = (len(y), 0, self.det.forward_backward(x, y, rows, global_rows), stop_requested, 0)
        else:
            model.zero_grad(skip_written=True)  # the backward below writes what it skips
            out = model.forward(x)
            self.scalars[:] = (len(y), loss.forward(out, y), loss.correct(out, y), stop_requested, 0)
            self.timer.lap("forward")
            dout = loss.backward()
            dout /= global_rows
            model.backward(dout, need_dx=False)
        faults.inject(self.comm.rank, self.pos.step, model.grads)  # inert unless DISTBP_FAULT is set (tests)

    def allreduce(self):
        """One allreduce of the flat gradient and one of the step's scalars (the fixed tree if deterministic)."""
        every = self.cfg.checkpoint.every_seconds
        if self.comm.is_root and every:
            self.scalars[4] = time.monotonic() - self._last_ckpt_time >= every
        if self.det:
            self.det.allreduce(self.model.grads, self.scalars)
        else:
            self.comm.allreduce_sum(self.model.grads)
            self.comm.allreduce_sum(self.scalars)

    def optimizer_step(self) -> tuple[float, bool]:
        """The same step on every rank unless the gradient is not finite; (train loss, skipped)."""
        train_loss = self.scalars[1] / self.scalars[0]
        skipped = not check_finite(train_loss, self.model, self.pos.step, self.cfg.train.nonfinite, self.log)
        self.lr = self.lr_at(self.pos.step)
        if not skipped:
            self.opt.step(self.model.params, self.model.grads, self.lr)
        return train_loss, skipped

    def advance(self):
        """Count the step and its rows; compare parameters across ranks when due."""
        pos, every = self.pos, self.cfg.train.check_every
        pos.step += 1
        pos.step_in_epoch += 1
        pos.samples_seen += int(self.scalars[0])
        if every and pos.step % every == 0:
            check_consistent(self.comm, self.model.params, pos.step)

    def report(self, train_loss: float, skipped: bool):
        """Progress and metrics records; evaluation at the end of an epoch, of the run, or when due."""
        pos, cfg, timer = self.pos, self.cfg, self.timer
        self.runlog.progress(pos.step, pos.epoch_number, pos.samples_seen, {"loss": train_loss, "lr": self.lr})
        if pos.step % cfg.train.log_every == 0 or pos.step == self.total:
            extra = {"accuracy": self.scalars[2] / self.scalars[0]} if self.data.task == "classification" else {}
            if skipped:
                extra["skipped"] = True
            self.runlog.record(step=pos.step, epoch=pos.epoch_number, loss=train_loss, lr=self.lr,
                               samples_per_s=timer.samples_per_s(), **extra)
        due = cfg.train.eval_every and pos.step % cfg.train.eval_every == 0
        if self.val_split is None or not (pos.step_in_epoch == self.per_epoch or pos.step == self.total or due):
            return
        timer.start()
        self.result = evaluate(self.model, self.loss, self.val_split, self.comm, self.data.task == "classification")
        timer.lap("eval")
        self.best = max(self.best or 0.0, self.result.get("val_accuracy", 0.0))
        self.runlog.record(step=pos.step, epoch=pos.epoch_number, **self.result)
        self.log(f"eval step {pos.step} epoch {pos.epoch_number}: "
                 + " ".join(f"{k}={v:.4f}" for k, v in self.result.items()))

    def checkpoint_if_due(self):
        """A periodic checkpoint every checkpoint.every_steps, or when rank 0's clock says every_seconds."""
        every = self.cfg.checkpoint.every_steps
        if ((every and self.pos.step % every == 0) or self.scalars[4] > 0) and self.pos.step < self.total:
            self.save(final=False)
            self._last_ckpt_time = time.monotonic()

    def save(self, final: bool):
        """Checkpoint the current state (rank 0 writes; see save_checkpoint)."""
        save_checkpoint(self.saver, self.run_dir, self.model, self.opt, self.pos, self.cfg, self.comm, self.lr,
                        self.log, self.timer, final=final)

    def finish(self, exit_code: int) -> int:
        """The summary record and table; returns exit_code."""
        pos, result = self.pos, self.result
        summary = {"summary": True, "steps": pos.step, "epochs": pos.step / self.per_epoch,
                   "samples_per_s": self.timer.samples_per_s(), "val_loss": result.get("val_loss"),
                   "val_accuracy": result.get("val_accuracy"), "best_val_accuracy": self.best,
                   "world_size": self.comm.size, "wall_time_s": time.perf_counter() - self.wall0,
                   "time_s": {k: round(v, 4) for k, v in self.timer.totals.items()}, "exit_code": exit_code,
                   "params_crc32": f"{param_hash(self.model.params):08x}",
                   "checkpoint": str(self.run_dir / "checkpoints" / ckpt.checkpoint_name(pos.step))}
        self.runlog.end_progress()
        self.runlog.record(**summary)
        self.log("summary:\n" + "\n".join(format_summary(summary)))
        self.log(f"parameters crc32: {summary['params_crc32']}")
        self.runlog.close(exit_code)
        return exit_code


def check_finite(train_loss: float, model, step: int, policy: str, log) -> bool:
    """True if loss and gradient are finite; else abort or (policy 'skip') warn."""
    # g.g is finite unless an entry is NaN/Inf or the squares overflow (then the exact test
    # decides): one BLAS pass, about 3x cheaper than np.sum(g)
    g = model.grads
    grads_ok = np.isfinite(np.dot(g, g)) or np.isfinite(g).all()
    if np.isfinite(train_loss) and grads_ok:
        return True
    bad = [n for n, g in model.views(model.grads).items() if not np.isfinite(g).all()]
    where = f"gradient of {', '.join(bad)}" if bad else "loss"
    msg = f"non-finite {where} at step {step} (loss {train_loss})"
    if policy == "skip":
        log(f"WARNING: {msg}: step skipped (train.nonfinite=skip)")
        return False
    raise NonFiniteError(f"{msg}; the last checkpoint is kept. HINT: lower optim.lr, or set "
                         "train.nonfinite=skip")
