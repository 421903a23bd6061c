"""Experiment trackers (TensorBoard, MLflow) fed, on rank 0, with the records that go into metrics.jsonl."""
from __future__ import annotations

import importlib
import os
import threading
import time
from pathlib import Path

from ..errors import UserError

CLOSE_TIMEOUT_S = 60.0  # a tracker's close() (queued metrics, the run's end) may take this long, no longer
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def check_installed(log_cfg) -> None:
    """Raise a UserError naming the extra to install for each enabled tracker whose library is missing."""
    for name, (module, extra) in EXTRAS.items():
        if getattr(log_cfg, name):
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"log.{name}=true needs {module}; HINT: pip install 'distbp[{extra}]' "
                                f"(or set log.{name}=false)") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a train or eval record by their metrics.jsonl names (step is the x axis, not a value)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_params(config: dict) -> dict[str, str]:
    """The config as 'section.key' -> value text."""
    return {f"{s}.{k}": str(v) for s, values in config.items() for k, v in values.items()}


class TensorBoard:
    """Scalars as TensorBoard event files in the run directory (tensorboard --logdir runs)."""

    def __init__(self, run_dir: Path, config_toml: str):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(logdir=str(run_dir))
        self.writer.add_text("config", "```toml\n" + config_toml + "\n```")

    def record(self, record: dict):
        """Add each number of a train or eval record at its step (queued; a writer thread writes)."""
        if "step" in record and not record.get("resume") and not record.get("summary"):
            for key, value in scalars(record).items():
                self.writer.add_scalar(key, value, record["step"])

    def close(self, exit_code: int | None):
        """Flush and close the event file."""
        self.writer.close()


class MLflow:
    """One MLflow run per run directory (continued on resume): params, metrics, final checkpoint path."""

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, run_dir: Path, config: dict):
        from mlflow.tracking import MlflowClient  # MLFLOW_TRACKING_URI, else MLflow's default store in the cwd
        self.client, self.pending = MlflowClient(), []
        self.run_id = self._existing_run(run_dir) or self._new_run(run_dir)
        self._log_params(flat_params(config))

    def _existing_run(self, run_dir: Path) -> str | None:
        """The run a previous invocation in run_dir started in this tracking store, if any."""
        path = run_dir / self.RUN_ID_FILE
        if not path.is_file():
            return None
        from mlflow.exceptions import MlflowException
        try:
            run_id = path.read_text().strip()
            self.client.get_run(run_id)
        except (OSError, MlflowException):
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _new_run(self, run_dir: Path) -> str:
        """Start a run named after the run directory in experiment $MLFLOW_EXPERIMENT_NAME (default distbp)."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "distbp"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                     tags={"distbp.run_dir": str(run_dir.resolve())})
        (run_dir / self.RUN_ID_FILE).write_text(run.info.run_id + "\n")
        return run.info.run_id

    def _log_params(self, params: dict[str, str]):
        """Log new params; a value changed on resume becomes a tag (MLflow params cannot change)."""
        from mlflow.entities import Param
        old = self.client.get_run(self.run_id).data.params
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in old])
        for k, v in params.items():
            if k in old and old[k] != v:
                self.client.set_tag(self.run_id, f"distbp.resume_changed.{k}", f"{old[k]} -> {v}")

    def record(self, record: dict):
        """Queue the numbers of a train or eval record as metrics at its step; the summary's results as tags."""
        from mlflow.entities import Metric
        if record.get("summary"):
            for key in ("checkpoint", "exit_code", "params_crc32"):
                if record.get(key) is not None:
                    self.client.set_tag(self.run_id, f"distbp.{key}", str(record[key]))
            return
        if "step" not in record or record.get("resume"):
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in scalars(record).items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def close(self, exit_code: int | None):
        """Wait for queued metrics, then end the run: FINISHED (exit 0), KILLED (stopped, resumable) or FAILED."""
        for op in self.pending:
            op.wait()
        status = {0: "FINISHED", 75: "KILLED"}.get(exit_code, "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def close_within(tracker, exit_code: int | None, seconds: float) -> str | None:
    """Close a tracker in a daemon thread given `seconds`; None if it closed, else what went wrong (a tracker
    blocked on an unreachable server is left behind: the run's files are complete and the process exits)."""
    errors = []

    def close():
        try:
            tracker.close(exit_code)
        except Exception as e:  # noqa: BLE001 - any tracker library's failure is a warning, not a failed run
            errors.append(f"{type(e).__name__}: {e}")
    thread = threading.Thread(target=close, name=f"distbp-close-{type(tracker).__name__}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return f"still closing after {seconds:g} s (its server does not answer?); left behind"
    return errors[0] if errors else None


def open_trackers(log_cfg, run_dir: Path, config: dict, config_toml: str) -> list:
    """The enabled trackers (rank 0); a tracker that cannot start is a UserError naming it."""
    makers = {"tensorboard": lambda: TensorBoard(run_dir, config_toml), "mlflow": lambda: MLflow(run_dir, config)}
    trackers = []
    for name, make in makers.items():
        if getattr(log_cfg, name):
            try:
                trackers.append(make())
            except Exception as e:  # e.g. an unreachable MLFLOW_TRACKING_URI: say so before training starts
                raise UserError(f"log.{name}=true: the tracker could not start ({type(e).__name__}: {e}); "
                                "HINT: check MLFLOW_TRACKING_URI and the run directory, or set "
                                f"log.{name}=false") from None
    return trackers
