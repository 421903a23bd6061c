"""log.tensorboard and log.mlflow: what the trackers wrote, read back, equals metrics.jsonl; a missing extra
stops the run before it starts."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from distbp import cli
from conftest import MPIRUN, job_env

pytestmark = pytest.mark.timeout(400)


def train(run_dir: Path, *sets: str, ranks: int = 2, cwd: Path, code: int = 0, **env) -> str:
    """`mpirun -n ranks distbp train` on the digits with trackers on; its output (fails on another exit code)."""
    argv = [MPIRUN, "-n", str(ranks), sys.executable, "-m", "distbp", "train", "--run-dir", str(run_dir),
            "--set", "log.tensorboard=true", "--set", "log.mlflow=true", "--set", "train.log_every=7",
            *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in job_env(**env).items() if not k.startswith("MLFLOW_")}  # MLflow's default store in cwd
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == code, f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def jsonl_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of the train and eval records of metrics.jsonl."""
    series = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step" in r and not r.get("resume") and not r.get("summary"):
            for k, v in r.items():
                if k != "step" and not isinstance(v, bool):
                    series.setdefault(k, []).append((r["step"], float(v)))
    return series


def tensorboard_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] as TensorBoard's own reader sees the event files of run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_and_mlflow_hold_the_records_of_metrics_jsonl_across_a_resume(serial, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    out = train(run_dir, "train.epochs=2", cwd=tmp_path)
    assert "summary:" in out
    out = train(run_dir, "train.epochs=3", ranks=1, cwd=tmp_path)  # resumed: the same MLflow run goes on
    assert "resumed from" in out
    train(tmp_path / "nan", ranks=1, cwd=tmp_path, code=3, DISTBP_FAULT="rank=0,step=5,kind=nan")
    expected = jsonl_series(run_dir)
    assert {"loss", "lr", "grad_norm", "accuracy", "samples_per_s", "epoch", "val_loss", "val_accuracy", "val_f1_macro",
            "train_loss", "train_accuracy"} == set(expected)
    assert [s for s, _ in expected["val_loss"]] == [23, 46, 69]

    # TensorBoard: the same steps, values rounded to float32 (its scalar type); one writer, rank 0
    board = tensorboard_series(run_dir)
    assert set(board) == set(expected)
    for key, series in expected.items():
        assert [s for s, _ in board[key]] == [s for s, _ in series]
        assert np.array_equal(np.float32([v for _, v in board[key]]), np.float32([v for _, v in series])), key
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # one per invocation, none from rank 1

    # MLflow, read through its client from the default store of the directory the runs started in
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("distbp").experiment_id])}
    assert runs.keys() == {"run", "nan"} and runs["nan"].info.status == "FAILED"  # stopped by a NaN (exit 3)
    run = runs["run"]
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key, series in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == sorted(series), key
    params, tags = run.data.params, run.data.tags
    assert params["train.epochs"] == "2" and params["optim.lr"] == "0.05" and params["log.mlflow"] == "True"
    assert tags["distbp.resume_changed.train.epochs"] == "2 -> 3"
    final = run_dir / "checkpoints" / "step-00000069.h5"
    assert tags["distbp.checkpoint"] == str(final) and final.is_file()
    assert tags["distbp.exit_code"] == "0"


@pytest.mark.parametrize("key, module, extra", [("tensorboard", "tensorboardX", "tensorboard"),
                                                 ("mlflow", "mlflow", "mlflow")])
def test_a_missing_extra_is_named_and_nothing_starts(serial, tmp_path, monkeypatch, capsys, key, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    code = cli.main(["train", "--set", f"log.{key}=true", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install 'distbp[{extra}]'" in err and f"log.{key}=true" in err
    assert not (tmp_path / "run").exists()  # stopped before the run directory, let alone training


class Blocking:
    """A tracker whose close() never returns (a tracking server that stopped answering)."""

    def __init__(self):
        self.closing = threading.Event()

    def record(self, record: dict):
        pass

    def close(self, exit_code):
        self.closing.set()
        threading.Event().wait()


def test_a_tracker_that_blocks_in_close_is_left_behind_with_a_warning(tmp_path, monkeypatch):
    from distbp.config import load_config
    from distbp.parallel.comm import SerialComm
    from distbp.reporting import trackers
    from distbp.training.loop import run
    blocking = Blocking()
    monkeypatch.setattr(trackers, "CLOSE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(trackers, "open_trackers", lambda *args: [blocking])
    start = time.monotonic()
    assert run(load_config(None, ["train.max_steps=2"]), SerialComm(), tmp_path / "run", "never")["exit_code"] == 0
    assert blocking.closing.is_set() and time.monotonic() - start < 30
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING: Blocking did not close cleanly (still closing after 0.5 s" in log, log
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
