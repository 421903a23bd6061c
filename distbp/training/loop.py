"""The training loop: run(cfg, comm) reads in the order of DESIGN.md's data flow."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..files import checkpoint as ckpt
from ..parallel import faults
from ..files import rundir
from ..parallel import slurm
from .clip import clip_by_norm, clip_by_value
from ..reporting import trackers
from ..parallel import heap
from ..parallel.threads import set_thread_budget, too_small_for_threads
from ..parallel.consistency import check_consistent, param_hash
from ..config import Config, config_to_dict, config_to_toml
from ..datasets.augment import augmenter
from ..datasets.dataset import Dataset, digits_path
from ..datasets.fetch import open_dataset
from .callbacks import Callbacks
from .ending import BestWeights, final_reports, keep_best_on, restore_best
from .early_stop import EarlyStopping
from ..errors import EXIT_OK, EXIT_RESUMABLE, NonFiniteError, agree, on_root
from ..inference.builders import build_loss, build_model
from ..inference.evaluate import evaluate
from ..reporting.metrics import RunLog, StepTimer, format_summary
from ..datasets.normalize import fit as fit_normalizer
from ..reporting.progress import Progress
from .horizon import plateau_of, schedule_change, schedule_of, total_steps
from ..parallel.sampler import GlobalBatches, dropped_rows
from ..reporting.scores import improved, monitored
from .state import EpochSums, EvalState, build_optimizer, make_checkpoint, resume_state, save_checkpoint
from .step import DataParallelStep, DeterministicStep, StepScalars
from ..parallel.buckets import OverlappedReduction, model_buckets
from ..parallel.watchdog import configure as configure_watchdog
from ..parallel.watchdog import rank_table, watching
from ..parallel.zero import state_bytes


def open_data(cfg: Config) -> tuple[Dataset, object, object]:
    """The dataset file and its train and validation splits (validated)."""
    data = open_dataset(cfg.data.path or digits_path())
    train = data.split(cfg.data.train_split)
    val = data.split(cfg.data.val_split) if cfg.data.val_split else None
    train.check_batch_size(cfg.train.batch_size * cfg.train.accumulate_steps, cfg.train.drop_last)
    return data, train, val


def run(cfg: Config, comm, run_dir: str | Path, resume: str = "auto", force: bool = False,
        progress: str = "auto", keep_stop_handlers: bool = False, config_file: str | None = None,
        callbacks=(), lr_at=None) -> dict:
    """Train data-parallel as DESIGN.md describes; return this rank's summary record (exit_code included).
    keep_stop_handlers: a stop signal after the run only sets a flag until the process ends (the CLI);
    config_file: the TOML file cfg was read from (never overwritten);
    lr_at: the learning rate by step, in place of the config's schedule (lr-find's sweep)."""
    with watching(comm, cfg.train.stall_timeout) as comm:  # a rank that never arrives at a collective ends the job
        trainer = Trainer(cfg, comm, run_dir, resume, force, progress, config_file, callbacks, lr_at)
        stop = slurm.StopRequest()
        try:
            trainer.train(stop.install())
            return trainer.summary
        except BaseException:
            trainer.runlog.close()  # the trackers end their runs as failed
            raise
        finally:
            if not keep_stop_handlers:
                stop.restore()
            trainer.data.close()  # its splits stay in memory; the file is free (say, to be rewritten)
            if trainer.lock:
                trainer.lock.release()


class Trainer:
    """One run: its data, model, optimizer and position, set up (or resumed) by __init__; train() is the loop."""

    def __init__(self, cfg: Config, comm, run_dir: str | Path, resume: str, force: bool = False,
                 progress: str = "auto", config_file: str | None = None, callbacks=(), lr_at=None):
        self.cfg, self.comm, self.wall0 = cfg, comm, time.perf_counter()
        self.run_dir = run_dir = Path(comm.bcast_obj(str(run_dir)))
        self.data, self.train_split, self.val_split = agree(comm, open_data, cfg)
        if cfg.data.path:  # stored absolute, so eval and predict of the run work from any folder
            cfg.data.path = os.path.abspath(cfg.data.path)
        self.model = model = agree(comm, build_model, cfg, self.data)
        self.augment = agree(comm, augmenter, cfg.data.augment, self.data.input_shape, self.data.path)
        self.task = self.data.task
        self.loss = build_loss(cfg, self.data, comm)
        self.metric, self.direction = agree(comm, monitored, cfg.train.best_metric, self.task)
        self.opt = build_optimizer(cfg, model, comm)
        t = cfg.train
        self.early = EarlyStopping(self.metric, self.direction, t.early_stop_patience, t.early_stop_min_delta)
        self.batches = GlobalBatches(self.train_split.n, t.batch_size * t.accumulate_steps, t.seed, t.drop_last)
        self.per_epoch = self.batches.steps_per_epoch
        self.total = total_steps(cfg, self.per_epoch)
        self.lr_at = lr_at or agree(comm, schedule_of, cfg, self.total)
        self.plateau = agree(comm, plateau_of, cfg, self.direction)
        self.epoch_sums = EpochSums()
        self.evaluated = EvalState(self.early, self.plateau, self.epoch_sums)  # kept in checkpoints
        on_root(comm, trackers.check_installed, cfg.log)
        faults.inject_at(comm.rank, "setup")  # inert unless DISTBP_FAULT is set (tests)
        # after the input checks (a bad input leaves no run dir); the lock before any write
        self.lock, notes = agree(comm, rundir.prepare, run_dir, config_to_toml(cfg), resume, force, comm,
                                 config_file=config_file)
        agree(comm, rundir.check_seen, run_dir)
        self.runlog = agree(comm, RunLog, run_dir, comm.is_root, self._progress(progress))
        self.log = self.runlog.info
        for note in notes:
            self.log(note)
        self._describe()
        self.pos, old_config, self.norm = resume_state(resume, run_dir, model, self.opt, self.evaluated, cfg, comm,
                                                       self.log)
        self.best = None  # (value, step) of the best train.best_metric of the run, resumes included
        self.done_before = self.pos.step >= self.total or self.early.should_stop  # a finished run, run again
        if self.pos.step and not self.done_before:
            self.best = comm.bcast_obj(self.runlog.best(self.metric, self.pos.step, self.direction))
            self.runlog.record(resume=True, step=self.pos.step, epoch=self.pos.epoch_number, world_size=comm.size)
            if comm.is_root and (warning := schedule_change(old_config, cfg, self.per_epoch, self.pos.step)):
                self.log(warning)
        for split in (self.train_split, self.val_split):
            if split is not None:
                agree(comm, split.load, cfg.data.memory_mb * 2**20, comm)
        if self.norm is None:  # fresh: statistics of the train split; resumed: those stored in the checkpoint
            kind = "none" if self.task.token_ids else cfg.data.normalize  # token ids are not features
            self.norm = fit_normalizer(self.train_split, comm, kind, cfg.data.normalize_targets,
                                       self.task.normalizes_targets)
        self.log(self.norm.describe())
        # the trackers last: a run that fails to start leaves no tracker run behind, a finished one run again
        # touches none (nothing is trained or written)
        if not self.done_before:
            self.runlog.trackers = on_root(comm, trackers.open_trackers, cfg.log, run_dir, config_to_dict(cfg),
                                           config_to_toml(cfg)) or []
        self.timer, self.saver = StepTimer(), ckpt.BackgroundSaver()
        self.scalars = StepScalars()
        self.result, self.lr, self.grad_step = {}, self.lr_now(), None
        self.divisor, self.grad_norm, self.stopped_early = 1.0, 0.0, self.early.should_stop
        self._last_ckpt_time, self._saved_step = time.monotonic(), None
        self.last_epoch = {}  # the latest epoch's train means
        self.best_weights, self.keep_best, self.restored = BestWeights(), keep_best_on(cfg), False
        self.callbacks = Callbacks(callbacks, self)

    def lr_now(self) -> float:
        """The learning rate of the next step: the schedule's, scaled by the plateau schedule's reductions."""
        lr, o = self.lr_at(self.pos.step), self.cfg.optim
        if self.plateau is None:
            return lr
        return lr * self.plateau.lr / o.lr if self.pos.step < o.warmup_steps else self.plateau.lr

    def _progress(self, mode: str) -> Progress | None:
        """Rank 0's progress display in the given mode (auto, bar, lines, none)."""
        if not self.comm.is_root:
            return None
        return Progress(mode, self.total, self.per_epoch, self.cfg.train.log_every, lambda msg: self.log(msg))

    def _describe(self):
        """The run's first log lines: ranks, threads, SLURM, data, model."""
        comm, log = self.comm, self.log
        small = too_small_for_threads(self.model.num_params, [spec.get("type") for spec in self.cfg.model.layers])
        set_thread_budget(comm, log, self.cfg.train.deterministic, small)
        heap.keep_freed_memory()
        log(f"distbp {__version__}: {comm.size} rank(s), run dir {self.run_dir}")
        if comm.size > 1:
            log(rank_table(comm))
        if slurm.describe():
            log(slurm.describe())
        val, t = self.val_split, self.cfg.train
        log(f"data {self.data.path}: {self.train_split.n} train rows, {val.n if val else 0} val rows, "
            f"task {self.data.task}")
        if warning := drop_warning(self.train_split.n, t.batch_size * t.accumulate_steps, t.drop_last):
            log(warning)
        log(f"model: {self.model.num_params} parameters ({self.cfg.train.dtype})\n  "
            + "\n  ".join(self.model.describe()))
        if unused := self.cfg.optim.unused_options():
            log(f"WARNING: {', '.join(unused)}: not an option of optim.name={self.opt.name!r}, so ignored; HINT: "
                f"remove {'it' if len(unused) == 1 else 'them'}, or choose an optimizer that takes "
                f"{'it' if len(unused) == 1 else 'them'} (momentum: sgd, rmsprop)")
        shared = f", 1/{comm.size} of it (train.shard_optimizer)" if self.opt.owned is not None else ""
        log(f"optimizer {self.opt.name}: {state_bytes(self.opt) / 2**20:.1f} MB of state per rank{shared}")

    def make_step(self):
        """The step object train.deterministic chooses, on the (watched) comm."""
        cfg, lap = self.cfg, self.timer.lap
        if cfg.train.deterministic:
            return DeterministicStep(self.model, self.loss, self.comm, cfg.train.micro_batch, lap, self.opt.owned)
        overlap = None
        if cfg.train.overlap:
            overlap = OverlappedReduction(self.comm, model_buckets(self.model, cfg.train.bucket_mb), self.opt.owned)
        return DataParallelStep(self.model, self.loss, self.comm, lap, self.opt.owned, overlap)

    def train(self, stop: slurm.StopRequest | None = None) -> int:
        """The loop in DESIGN.md's data-flow order, then the final checkpoint and the summary. `stop`: the
        installed stop-signal handlers, kept by the caller past the summary (else installed and restored here)."""
        if stop is None:
            stop = slurm.StopRequest().install()
            try:
                return self.train(stop)
            finally:
                stop.restore()
        cfg, pos, timer, s = self.cfg, self.pos, self.timer, self.scalars
        configure_watchdog(self.comm, step_of=lambda: pos.step)
        self.model.ctx.comm = self.comm
        self.grad_step = self.make_step()
        for line in self.grad_step.describe(cfg.train.batch_size * cfg.train.accumulate_steps):
            self.log(line)
        if cfg.train.overlap and cfg.train.deterministic:
            self.log("overlap: not in deterministic mode, whose fixed tree sums the shards' gradients after the "
                     "backward (docs/DETERMINISM.md)")
        if cfg.train.accumulate_steps > 1:
            self.log(f"accumulation: steps of {cfg.train.batch_size * cfg.train.accumulate_steps} rows in "
                     f"{cfg.train.accumulate_steps} forward/backward passes of {cfg.train.batch_size}")
        exit_code = EXIT_OK
        if self.done_before:
            return self.finished_before()
        self.runlog.start_progress(pos.step, pos.samples_seen)
        self.stopped_early |= self.callbacks("on_train_start")
        try:
            while pos.step < self.total and not self.stopped_early:
                t_step = time.perf_counter()
                timer.start()
                s.loss_sum, s.correct, s.rows = self.forward_backward()
                faults.inject(self.comm.rank, pos.step, self.model.grads)  # inert unless DISTBP_FAULT is set
                # the step's scalars, flags included, ride on the step's reduction
                s.stop, s.checkpoint_due = stop.requested, self.checkpoint_clock_due()
                self.grad_step.reduce(self.model.grads, s)
                timer.lap("allreduce")
                train_loss, skipped = self.optimizer_step()
                timer.lap("optimizer")
                self.advance()
                timer.step_done(time.perf_counter() - t_step, int(s.rows))
                self.report(train_loss, skipped)
                if s.stop > 0:
                    self.log(f"stop signal received: checkpoint at step {pos.step}, exit {EXIT_RESUMABLE} "
                             f"(resumable): run the same command (same --run-dir {self.run_dir}) to continue "
                             "from it")
                    exit_code = EXIT_RESUMABLE
                    break
                if self.stopped_early:
                    self.log(f"{self.stop_reason()}: final checkpoint at step {pos.step}")
                    break
                self.checkpoint_if_due()
        except BaseException:
            self.saver.wait()  # a checkpoint being written completes; the final save reports its error otherwise
            raise
        finally:
            configure_watchdog(self.comm, step_of=lambda: -1)
        # the stop handlers are still in place: a signal now (a SLURM time limit arriving at the end)
        # only sets the flag, so the final checkpoint is completed, never left as a temp file
        faults.inject_at(self.comm.rank, "final")
        if self.cfg.train.restore_best:
            restore_best(self)
        agree(self.comm, self.save, final=True)
        if stop.requested and exit_code == EXIT_OK:
            self.log(f"stop signal received after the last step: the final checkpoint at step {pos.step} "
                     f"is written and the run is complete, exit {EXIT_OK}")
        faults.inject_at(self.comm.rank, "summary")
        return self.finish(exit_code, final_reports(self))

    def forward_backward(self) -> tuple[float, int, int]:
        """Each pass of the step's batch on this rank: read, forward, backward into the summed gradient."""
        pos, timer = self.pos, self.timer
        if pos.step_in_epoch >= self.per_epoch:
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        self.model.ctx.step = pos.step  # the dropout counter's step
        indices = self.batches.indices(pos.epoch, pos.step_in_epoch)
        # the mean divides by the batch's rows, or by their summed class weights (the same on every rank)
        # a batch whose class weights sum to 0 has no mean: NaN (no warnings), and check_finite says why
        self.divisor = (self.loss.total_weight(self.train_split.labels(indices)) or math.nan) \
            if self.loss.weighted else len(indices)
        loss_sum, correct, rows = 0.0, 0, 0
        passes = self.grad_step.pass_positions(len(indices), self.cfg.train.batch_size)
        for k, positions in enumerate(passes):
            x, y = self.train_split.read(indices[positions], self.model.params.dtype)
            x, y = self.norm.x(x), self.norm.y(y)
            if self.augment:
                x = self.augment(x, self.cfg.train.seed, pos.epoch, indices[positions])
            timer.lap("data")
            pass_loss, pass_correct = self.grad_step.forward_backward(x, y, positions, len(indices), self.divisor,
                                                                      k == 0, k == len(passes) - 1)
            timer.lap("backward")
            loss_sum, correct, rows = loss_sum + pass_loss, correct + pass_correct, rows + len(y)
        pos.micro_steps += len(passes)
        return loss_sum, correct, rows

    def checkpoint_clock_due(self) -> bool:
        """Rank 0's clock says checkpoint.every_seconds have passed (the reduction tells every rank)."""
        every = self.cfg.checkpoint.every_seconds
        return bool(self.comm.is_root and every and time.monotonic() - self._last_ckpt_time >= every)

    def optimizer_step(self) -> tuple[float, bool]:
        """The same step on every rank unless the gradient is not finite; (train loss, skipped)."""
        s, o = self.scalars, self.cfg.optim
        train_loss = s.loss_sum / self.divisor
        self.grad_norm = math.sqrt(s.grad_sq)  # of the whole summed gradient, before clipping (metrics.jsonl)
        skipped = not check_finite(train_loss, s.grad_sq, self.grad_step.whole_grad, self.model, self.pos.step,
                                   self.cfg.train.nonfinite, self.log, math.isnan(self.divisor))
        self.lr = self.lr_now()
        if not skipped:
            if o.clip_grad_norm:  # on what this rank steps from (a slice if sharded), by the global norm
                clip_by_norm(self.grad_step.grad, o.clip_grad_norm, self.grad_norm)
            if o.clip_grad_value:
                clip_by_value(self.grad_step.grad, o.clip_grad_value)
            self.grad_step.apply(self.opt, self.model.params, self.lr)
        return train_loss, skipped

    def advance(self):
        """Count the step and its rows; compare parameters across ranks when due."""
        pos, every = self.pos, self.cfg.train.check_every
        pos.step += 1
        pos.step_in_epoch += 1
        pos.samples_seen += int(self.scalars.rows)
        if every and pos.step % every == 0:
            check_consistent(self.comm, self.model.params, pos.step)

    def report(self, train_loss: float, skipped: bool):
        """Progress and metrics records; evaluation at the end of an epoch, of the run, or when due."""
        pos, cfg, timer, s = self.pos, self.cfg, self.timer, self.scalars
        self.runlog.progress(pos.step, pos.epoch_number, pos.samples_seen, {"loss": train_loss, "lr": self.lr})
        if not skipped:
            self.epoch_sums.add(s.loss_sum, self.divisor, s.correct, s.rows)
        if pos.step % cfg.train.log_every == 0 or pos.step == self.total:
            extra = {"accuracy": s.correct / s.rows} if self.task.accuracy else {}
            if skipped:
                extra["skipped"] = True
            self.runlog.record(step=pos.step, epoch=pos.epoch_number, loss=train_loss, lr=self.lr,
                               grad_norm=self.grad_norm, samples_per_s=timer.samples_per_s(), **extra)
        due = cfg.train.eval_every and pos.step % cfg.train.eval_every == 0
        epoch_end = pos.step_in_epoch == self.per_epoch
        epoch = self.epoch_sums.means(self.task.accuracy) if epoch_end else {}
        self.last_epoch = epoch or self.last_epoch
        if self.val_split is None or not (epoch_end or pos.step == self.total or due):
            if epoch:
                self.runlog.record(step=pos.step, epoch=pos.epoch_number, **epoch)
                self.stopped_early |= self.callbacks("on_epoch_end", epoch)
            return
        timer.start()
        self.result = evaluate(self.model, self.loss, self.val_split, self.comm, self.task, self.norm)
        timer.lap("eval")
        self.runlog.record(step=pos.step, epoch=pos.epoch_number, **epoch, **self.result)
        self.log(f"eval step {pos.step} epoch {pos.epoch_number}: "
                 + " ".join(f"{k}={v:.4f}" for k, v in {**epoch, **self.result}.items()))
        self.stopped_early |= self.callbacks("on_evaluate", dict(self.result))
        if self.plateau and self.plateau.step(self.result[self.metric]):  # the same allreduced value on every rank
            self.log(f"plateau: {self.metric} did not improve for {cfg.optim.plateau_patience + 1} evaluation(s): "
                     f"learning rate now {self.lr_now():.6g}")
        if epoch:
            self.stopped_early |= self.callbacks("on_epoch_end", {**epoch, **self.result})
        if improved(self.result[self.metric], self.best and self.best[0], self.direction):
            self.best = (self.result[self.metric], pos.step)
            self.best_weights.keep(self.model, self.result)  # for restore_best and the final report
            if self.keep_best and pos.step < self.total:  # the final save marks a best last step
                self.save(final=False)
        if self.early.patience:  # rank 0 decides, so every rank stops after the same step
            stop = self.early.update(self.result[self.early.metric], pos.step)
            self.stopped_early |= self.comm.bcast_obj(stop if self.comm.is_root else None)

    def checkpoint_if_due(self):
        """A periodic checkpoint every checkpoint.every_steps, or when rank 0's clock said every_seconds."""
        every = self.cfg.checkpoint.every_steps
        due = (every and self.pos.step % every == 0) or self.scalars.checkpoint_due > 0
        if due and self.pos.step < self.total and self._saved_step != self.pos.step:
            self.save(final=False)
            self._last_ckpt_time = time.monotonic()

    def save(self, final: bool):
        """Checkpoint the current state: rank 0 writes (see state.save_checkpoint)."""
        states = self.opt.full_state(self.comm)  # a sharded optimizer's slices meet on rank 0
        self._saved_step = self.pos.step  # on every rank: checkpoint_if_due's collective decision
        pos, cfg = self.pos, self.cfg
        path = self.run_dir / "checkpoints" / ckpt.checkpoint_name(pos.step)
        if self.comm.is_root:
            self.timer.start()
            best = self.keep_best and self.best is not None and (self.best[1] == pos.step or self.restored)
            save_checkpoint(self.saver, path,
                            lambda: make_checkpoint(self.model, self.opt, states, pos, cfg, self.comm.size, self.lr,
                                                    self.evaluated, self.norm),
                            cfg.checkpoint.keep, self.log, final, best)
            self.timer.lap("checkpoint")
        self.stopped_early |= self.callbacks("on_checkpoint", str(path))

    def finish(self, exit_code: int, test: dict) -> int:
        """The summary record (test: the test split's metrics, if any) and table; returns exit_code."""
        pos, result = self.pos, self.result
        best = {} if self.best is None else {"best_metric": self.metric, f"best_{self.metric}": self.best[0],
                                             "best_step": self.best[1]}
        summary = {"summary": True, "steps": pos.step, "epochs": pos.step / self.per_epoch,
                   "samples_per_s": self.timer.samples_per_s(), "steady": self.timer.steady, **self.last_epoch,
                   **result, **test, **best,
                   "world_size": self.comm.size, "wall_time_s": time.perf_counter() - self.wall0,
                   "time_s": {k: round(v, 4) for k, v in self.timer.totals.items()}, "exit_code": exit_code,
                   "params_crc32": f"{param_hash(self.model.params):08x}",
                   "checkpoint": str(self.run_dir / "checkpoints" / ckpt.checkpoint_name(pos.step)),
                   "stopped": self.stop_reason() if self.stopped_early else None}
        self.runlog.end_progress()
        self.runlog.record(**summary)
        self.log("summary:\n" + "\n".join(format_summary(summary)))
        self.log(f"parameters crc32: {summary['params_crc32']}")
        self.callbacks("on_train_end", dict(summary))
        self.runlog.close(exit_code)
        self.summary = summary
        return exit_code

    def finished_before(self) -> int:
        """A run directory whose run is over: say so and which key to raise; nothing is trained or written."""
        t, pos = self.cfg.train, self.pos
        if self.early.should_stop:
            why = f"{self.early.reason()}: the run had stopped; HINT: raise train.early_stop_patience to train on"
        else:
            raise_ = (f"train.max_steps (now {t.max_steps})" if 0 <= t.max_steps <= self.per_epoch * t.epochs
                      else f"train.epochs, e.g. --set train.epochs={2 * t.epochs}")
            why = f"the run is finished: step {pos.step} of {self.total}; HINT: raise {raise_} to train on"
        self.log(f"{self.run_dir}: {why}, or start over with --resume never --force (nothing was trained or written)")
        self.summary = self.comm.bcast_obj(self.runlog.last_summary() if self.comm.is_root else None) or {}
        self.runlog.close(EXIT_OK)
        self.summary["exit_code"] = EXIT_OK
        return EXIT_OK

    def stop_reason(self) -> str:
        """Why the run stopped before its end: a callback's reason, or early stopping's."""
        return self.callbacks.stopped or self.early.reason()


def drop_warning(n: int, batch: int, drop_last: bool) -> str | None:
    """A warning when train.drop_last discards more than 10% of the n train rows every epoch."""
    dropped = dropped_rows(n, batch, drop_last)
    if dropped <= 0.1 * n:
        return None
    return (f"WARNING: train.drop_last=true drops {dropped} of the {n} train rows ({100 * dropped / n:.0f}%) every "
            f"epoch (global batch {batch}); HINT: train.drop_last=false keeps them in a last, smaller batch")


def check_finite(train_loss: float, grad_sq: float, whole_grad, model, step: int, policy: str, log,
                 weightless: bool = False) -> bool:
    """True if loss and gradient are finite; else abort or (policy 'skip') warn. weightless: the batch's
    rows have class weights summing to 0, so its mean loss is 0/0."""
    # grad_sq = g.g (from the step's reduction) is finite unless an entry is NaN/Inf or the squares
    # overflow; only then is the whole gradient looked at (gathered first if sharded)
    if np.isfinite(train_loss) and np.isfinite(grad_sq):
        return True
    g = whole_grad()
    if np.isfinite(train_loss) and np.isfinite(g).all():
        return True
    bad = [n for n, v in model.views(g).items() if not np.isfinite(v).all()]
    where = f"gradient of {', '.join(bad)}" if bad else "loss"
    msg = f"non-finite {where} at step {step} (loss {train_loss})"
    if weightless:
        msg += ": every row of the batch is of a class weighted 0 in loss.class_weights, so its mean loss is 0/0"
    if policy == "skip":
        log(f"WARNING: {msg}: step skipped (train.nonfinite=skip)")
        return False
    hint = ("give those classes a weight > 0 or use a larger train.batch_size" if weightless else "lower optim.lr")
    raise NonFiniteError(f"{msg}; the last checkpoint is kept. HINT: {hint}, or set train.nonfinite=skip")
