"""Exact resume: bitwise continuation, elastic rank counts, damaged files, retention, cadence, RNG attrs."""
import datetime
import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp import __version__
from distbp.files import checkpoint as ckpt
from distbp.parallel.comm import SerialComm
from distbp.config import config_from_dict, load_config
from distbp.parallel.sampler import epoch_order
from distbp.errors import UserError
from conftest import job_env, metrics, run_distbp

trainlib = importlib.import_module("distbp.training.loop")  # the loop's module: distbp.train is the API function

PER_EPOCH = 23  # the shipped digits: 1437 train rows in batches of 64, the last one of 29
VARIANTS = {
    "adam-dropout": ["optim.name='adam'", "optim.lr=0.003", "model.dropout=0.2"],
    "sgd-nesterov-batchnorm": ["optim.nesterov=true", "optim.momentum=0.9", "optim.weight_decay=0.0001",
                               'model.layers=[{type="linear", out=32}, {type="batchnorm"}, {type="relu"}, '
                               '{type="linear", out=10}]'],
    "rmsprop-step-schedule": ["optim.name='rmsprop'", "optim.lr=0.001", "optim.momentum=0.5",
                              "optim.schedule='step'", "optim.step_size=20", "optim.gamma=0.5"],
}


@pytest.fixture(params=["serial", pytest.param("world", marks=pytest.mark.mpi(min_size=2))])
def wcomm(request, comm):
    """A SerialComm under plain pytest, the world Comm under mpirun."""
    return SerialComm() if request.param == "serial" else comm


@pytest.fixture
def run_root(wcomm, tmp_path) -> Path:
    """A tmp folder every rank of wcomm sees."""
    return Path(wcomm.bcast_obj(str(tmp_path)))


def train(comm, run_dir, *overrides, resume="auto") -> int:
    """distbp train in this process on comm, logging every step."""
    cfg = load_config(None, ["train.log_every=1", *overrides])
    return trainlib.run(cfg, comm, run_dir, resume)["exit_code"]


def on_root(comm, fn):
    """fn() evaluated on rank 0 (after every rank got here), the same value on every rank."""
    comm.barrier()  # rank 0's final checkpoint is sealed before it returns; the others return earlier
    value = None
    if comm.is_root:
        try:
            value = fn()
        except Exception as e:  # every rank fails the test instead of waiting for rank 0
            value = f"rank 0 raised {e!r}"
    return comm.bcast_obj(value)


def final(run_dir, step: int) -> Path:
    """The checkpoint written after `step` steps in run_dir."""
    return Path(run_dir) / "checkpoints" / ckpt.checkpoint_name(step)


def state(path) -> dict:
    """Every array, optimizer scalar and position attribute of a checkpoint, as comparable bytes."""
    ck = ckpt.load(path)
    out = {f"params/{k}": v for k, v in ck.params.items()}
    out.update({f"optimizer/{s}/{k}": v for s, d in ck.opt_arrays.items() for k, v in d.items()})
    out.update({f"buffers/{k}": v for k, v in ck.buffers.items()})
    out = {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in out.items()}
    out["optimizer scalars"] = (ck.opt_name, ck.opt_scalars)
    out.update({k: ck.attrs[k] for k in ("step", "epoch", "step_in_epoch", "samples_seen")})
    return out


def differences(a: dict, b: dict) -> list[str]:
    """Names whose values are not bitwise identical."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def metrics_lines(run_dir) -> list[dict]:
    """The complete lines of run_dir/metrics.jsonl (a line cut short is left out)."""
    lines = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def after(lines: list[dict], step: int) -> list[tuple]:
    """(step, loss or val_loss) of the train and eval lines past `step`."""
    return [(m["step"], m.get("loss", m.get("val_loss"))) for m in lines
            if "step" in m and not m.get("resume") and m["step"] > step]


def log_text(run_dir) -> str:
    """Everything rank 0 logged in run_dir."""
    return (Path(run_dir) / "train.log").read_text()


_STRAIGHT = {}


def straight_run(comm, root: Path, variant: str, steps: int = 60) -> Path:
    """Run dir of an uninterrupted run (computed once per variant and world size)."""
    key = (variant, comm.size, steps)
    if key not in _STRAIGHT:
        run_dir = root / f"straight-{variant}-{steps}"
        assert train(comm, run_dir, f"train.max_steps={steps}", *VARIANTS[variant]) == 0
        _STRAIGHT[key] = run_dir
    return _STRAIGHT[key]


@pytest.mark.parametrize("variant, stop", [
    ("adam-dropout", 30),  # starts mid-epoch (epoch 2, step 7) and crosses the end of epoch 2
    ("adam-dropout", 23),  # stops exactly at the end of epoch 1
    ("adam-dropout", 50),  # starts mid-epoch 3 and ends inside it
    ("sgd-nesterov-batchnorm", 30),
    ("rmsprop-step-schedule", 30),
])
def test_resume_is_bitwise_exact(wcomm, run_root, tmp_path_factory, variant, stop):
    shared = Path(wcomm.bcast_obj(str(tmp_path_factory.getbasetemp())))
    straight = straight_run(wcomm, shared, variant)
    resumed = run_root / "resumed"
    assert train(wcomm, resumed, f"train.max_steps={stop}", *VARIANTS[variant]) == 0
    assert train(wcomm, resumed, "train.max_steps=60", *VARIANTS[variant]) == 0

    def check():
        lines = metrics(resumed)
        marks = [m for m in lines if m.get("resume")]
        return (differences(state(final(straight, 60)), state(final(resumed, 60))),
                after(lines, stop) == after(metrics(straight), stop),
                marks, f"resumed from {final(resumed, stop)} at step {stop}" in log_text(resumed))
    diff, same_history, marks, said = on_root(wcomm, check)
    assert diff == []
    assert same_history, "losses after the resume differ from the straight run's"
    assert marks == [{"resume": True, "step": stop, "epoch": (stop - 1) // PER_EPOCH + 1, "world_size": wcomm.size}]
    assert said


def test_best_val_accuracy_counts_the_history_before_the_resume(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=30") == 0

    def add_history():  # an earlier eval better than any to come, and one past the resume point
        with open(run_root / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 25, "epoch": 1, "val_loss": 0.1, "val_accuracy": 0.9991}) + "\n")
            f.write(json.dumps({"step": 35, "epoch": 1, "val_loss": 0.1, "val_accuracy": 0.9999}) + "\n")
            f.write('{"step": 36, "val_acc')  # a line cut short by a crash
    on_root(wcomm, add_history)
    assert train(wcomm, run_root, "train.max_steps=40") == 0
    lines = on_root(wcomm, lambda: metrics_lines(run_root))
    assert {"resume": True, "step": 30, "epoch": 2, "world_size": wcomm.size} in lines
    assert lines[-1]["best_val_accuracy"] == 0.9991 and lines[-1]["val_accuracy"] < 0.9991


def test_metrics_continue_and_config_changes_are_logged(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=30", "train.epochs=5", "optim.lr=0.01") == 0
    first = on_root(wcomm, lambda: (run_root / "metrics.jsonl").read_text())
    assert train(wcomm, run_root, "train.max_steps=40", "train.epochs=6", "optim.lr=0.02") == 0

    def check():
        text = (run_root / "metrics.jsonl").read_text()
        rest = [json.loads(line) for line in text[len(first):].splitlines()]
        return text.startswith(first), rest, log_text(run_root)
    kept, rest, log = on_root(wcomm, check)
    assert kept, "metrics.jsonl was not appended to"
    assert rest[0] == {"resume": True, "step": 30, "epoch": 2, "world_size": wcomm.size}
    assert [m["step"] for m in rest if "loss" in m] == list(range(31, 41))
    assert rest[-1]["summary"] and rest[-1]["steps"] == 40
    for line in ("train.max_steps: 30 -> 40", "train.epochs: 5 -> 6", "optim.lr: 0.01 -> 0.02"):
        assert f"config changed on resume: {line}" in log
    assert "world_size" not in log  # same rank count: not reported as a change


def damage(path: Path, how: str):
    """Flip bytes of a parameter, flip a digit of the stored config, or truncate the file."""
    raw = bytearray(path.read_bytes())
    if how == "param bytes":
        with h5py.File(path, "r") as f:
            offset = f["params/0.linear.W"].id.get_offset()
        raw[offset + 100:offset + 104] = bytes(b ^ 0x5A for b in raw[offset + 100:offset + 104])
    elif how == "config attribute":
        at = raw.find(b'"max_steps": 30')
        assert at >= 0
        raw[at + len('"max_steps": ')] = ord("9")  # still a readable file with a plausible config
    else:
        raw = raw[:len(raw) // 2]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["param bytes", "config attribute", "truncated"])
def test_auto_resume_skips_a_damaged_newest_checkpoint(wcomm, run_root, how):
    settings = ("checkpoint.every_steps=10", "checkpoint.keep=5")
    assert train(wcomm, run_root, "train.max_steps=30", *settings) == 0
    newest, previous = final(run_root, 30), final(run_root, 20)
    on_root(wcomm, lambda: damage(newest, how))
    assert train(wcomm, run_root, "train.max_steps=40", *settings) == 0
    log, position = on_root(wcomm, lambda: (log_text(run_root), ckpt.load(final(run_root, 40)).attrs["step"]))
    assert f"skipping damaged checkpoint: checkpoint {newest}" in log
    assert f"resumed from {previous} at step 20" in log
    assert position == 40


def test_resume_from_a_damaged_path_fails_on_every_rank(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=10") == 0
    path = final(run_root, 10)
    on_root(wcomm, lambda: damage(path, "param bytes"))
    with pytest.raises(UserError, match=f"checkpoint {path} fails its checksum"):
        train(wcomm, run_root / "other", "train.max_steps=20", resume=str(path))
    with pytest.raises(UserError, match="does not exist"):
        train(wcomm, run_root / "other", "train.max_steps=20", resume=str(run_root / "none.h5"))


def test_architecture_mismatch_lists_names_and_shapes_on_every_rank(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=5", "model.hidden=[32]") == 0
    with pytest.raises(UserError) as info:
        train(wcomm, run_root, "train.max_steps=10", "model.hidden=[48, 16]")
    message = str(info.value)
    assert f"checkpoint {final(run_root, 5)} is from a different architecture" in message
    for line in ("0.linear.W: checkpoint (64, 32) vs model (64, 48)", "0.linear.b: checkpoint (32,) vs model (48,)",
                 "2.linear.W: checkpoint (32, 10) vs model (48, 16)", "4.linear.W: checkpoint missing vs model (16, 10)"):
        assert line in message
    assert "--resume never" in message


def test_retention_keeps_newest_and_never_the_last_valid_one(wcomm, run_root):
    settings = ("checkpoint.every_steps=10", "checkpoint.keep=2")
    assert train(wcomm, run_root, "train.max_steps=45", *settings) == 0
    names = on_root(wcomm, lambda: [p.name for p in ckpt.list_checkpoints(run_root / "checkpoints")])
    assert names == [ckpt.checkpoint_name(s) for s in (40, 45)]
    # a damaged file named as if newer: keep=1 must still keep the valid checkpoint just written
    junk = run_root / "checkpoints" / ckpt.checkpoint_name(99999999)
    on_root(wcomm, lambda: junk.write_bytes(b"\0" * 4096))
    assert train(wcomm, run_root, "train.max_steps=60", "checkpoint.every_steps=10", "checkpoint.keep=1") == 0
    names, newest = on_root(wcomm, lambda: ([p.name for p in ckpt.list_checkpoints(run_root / "checkpoints")],
                                            ckpt.latest_valid(run_root / "checkpoints", log=lambda m: None).path))
    assert names == [ckpt.checkpoint_name(s) for s in (60, 99999999)]
    assert newest == str(final(run_root, 60))


def test_every_steps_cadence_and_final_checkpoint(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=35", "checkpoint.every_steps=10", "checkpoint.keep=10") == 0
    names = on_root(wcomm, lambda: [p.name for p in ckpt.list_checkpoints(run_root / "checkpoints")])
    assert names == [ckpt.checkpoint_name(s) for s in (10, 20, 30, 35)]


class FakeClock:
    """time.monotonic stand-in advancing one second per call; everything else from time."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("seconds", [2.5, 3600.0])
def test_every_seconds_decision_is_shared_by_all_ranks(wcomm, run_root, monkeypatch, seconds):
    # Only rank 0's clock runs (one second per reading); the other ranks checkpoint on the
    # same steps only if the decision rides in the step's allreduce.
    if wcomm.is_root:
        monkeypatch.setattr(trainlib, "time", FakeClock())
    calls = []
    real = trainlib.Trainer.save

    def recording(self, final):
        calls.append((self.pos.step, final))
        return real(self, final)
    monkeypatch.setattr(trainlib.Trainer, "save", recording)
    assert train(wcomm, run_root, "train.max_steps=10", f"checkpoint.every_seconds={seconds}",
                 "checkpoint.keep=20") == 0
    everyone = wcomm.bcast_obj(wcomm.gather_obj(calls))
    assert everyone == [calls] * wcomm.size
    timed = [step for step, last in calls if not last]
    assert calls[-1] == (10, True)
    if seconds == 3600.0:
        assert timed == []
    else:  # 2.5 s between saves at one second per clock reading: steps 3, 6, 9 with one reading a step
        assert 2 <= len(timed) <= 5, timed
    names = on_root(wcomm, lambda: [p.name for p in ckpt.list_checkpoints(run_root / "checkpoints")])
    assert names == [ckpt.checkpoint_name(s) for s in (*timed, 10)]


def test_checkpoint_records_position_config_and_rng_streams(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=30", "train.seed=7", *VARIANTS["adam-dropout"]) == 0
    attrs = on_root(wcomm, lambda: ckpt.load(final(run_root, 30)).attrs)
    required = ("step", "epoch", "step_in_epoch", "samples_seen", "world_size", "created", "distbp_version",
                "config", "rng", "checksum")
    assert [k for k in required if k not in attrs] == []
    assert (attrs["step"], attrs["epoch"], attrs["step_in_epoch"]) == (30, 1, 30 - PER_EPOCH)
    assert attrs["samples_seen"] == 29 * 64 + 29 and attrs["world_size"] == wcomm.size
    assert attrs["distbp_version"] == __version__ and attrs["checksum"].startswith("crc32:")
    assert datetime.datetime.fromisoformat(attrs["created"]).tzinfo is not None
    cfg = config_from_dict(json.loads(attrs["config"]))
    assert (cfg.train.seed, cfg.optim.name, cfg.model.dropout, cfg.train.max_steps) == (7, "adam", 0.2, 30)
    rng = json.loads(attrs["rng"])
    assert rng["init"] == {"seed": 7}
    assert (rng["sampler"]["seed"], rng["sampler"]["epoch"], rng["dropout"]["seed"], rng["dropout"]["step"]) == \
        (7, attrs["epoch"], 7, attrs["step"])
    # the sampler state reproduces the epoch's order: the rows of the next step's batch
    order = epoch_order(rng["sampler"]["seed"], rng["sampler"]["epoch"], 1437)
    assert np.array_equal(order, epoch_order(7, 1, 1437)) and not np.array_equal(order, epoch_order(7, 0, 1437))


# Whole-program runs: `python -m distbp train` alone and under mpirun (serial tests only).

def distbp(n: int, *args, timeout=60) -> subprocess.CompletedProcess:
    """python -m distbp ARGS on n ranks (n == 1: no launcher)."""
    return run_distbp(args, n if n > 1 else 0, timeout=timeout)


def cli_train(n: int, run_dir, steps: int, *sets, resume="auto") -> subprocess.CompletedProcess:
    """distbp train on n ranks; fails the test unless it exits 0."""
    args = ["train", "--run-dir", str(run_dir), "--resume", resume, "--set", f"train.max_steps={steps}"]
    for s in ("train.log_every=1000", *sets):
        args += ["--set", s]
    done = distbp(n, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("n", [1, 2])
def test_cli_resume_is_bitwise_exact(tmp_path, n):
    sets = VARIANTS["adam-dropout"]
    cli_train(n, tmp_path / "straight", 60, *sets)
    cli_train(n, tmp_path / "resumed", 30, *sets)
    out = cli_train(n, tmp_path / "resumed", 60, *sets).stdout
    assert f"resumed from {final(tmp_path / 'resumed', 30)} at step 30" in out
    assert differences(state(final(tmp_path / "straight", 60)), state(final(tmp_path / "resumed", 60))) == []


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    return float(np.linalg.norm((a - b).astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))


def test_cli_elastic_resume_4_to_2_and_3(tmp_path):
    sets = VARIANTS["adam-dropout"]  # batch 64: 16 rows per rank at 4 and 2 ranks, 22/21/21 at 3
    cli_train(4, tmp_path / "straight", 60, *sets)
    cli_train(4, tmp_path / "stopped", 30, *sets)
    want = ckpt.load(final(tmp_path / "straight", 60)).params
    for m in (2, 3):
        run_dir = tmp_path / f"resumed-{m}"
        shutil.copytree(tmp_path / "stopped", run_dir)
        out = cli_train(m, run_dir, 60, *sets).stdout
        assert f"written by 4 rank(s), now {m}" in out
        assert f"config changed on resume: world_size: 4 -> {m}" in out
        got = ckpt.load(final(run_dir, 60))
        assert got.attrs["world_size"] == m and got.attrs["samples_seen"] == 1437 * 2 + 14 * 64
        for name, a in want.items():
            assert relative_error(got.params[name], a) <= 1e-5, (m, name)
            np.testing.assert_allclose(got.params[name], a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("n", [1, 3])
def test_cli_bad_resume_exits_2_with_a_clear_message(tmp_path, n):
    cli_train(n, tmp_path / "a", 5, "model.hidden=[32]")
    path = final(tmp_path / "a", 5)
    broken = tmp_path / "broken.h5"
    shutil.copyfile(path, broken)
    damage(broken, "param bytes")
    done = distbp(n, "train", "--run-dir", str(tmp_path / "b"), "--resume", str(broken))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"distbp: error: checkpoint {broken} fails its checksum" in done.stderr
    assert done.stderr.count("distbp: error:") == 1  # said once, by rank 0
    done = distbp(n, "train", "--run-dir", str(tmp_path / "a"), "--set", "model.hidden=[16]")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is from a different architecture" in done.stderr
    assert "0.linear.W: checkpoint (64, 32) vs model (64, 16)" in done.stderr


def test_cli_writer_killed_mid_checkpoint_resumes_from_the_previous_one(tmp_path):
    # A model big enough (about 25 MB per checkpoint) that a save takes a while to catch.
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [sys.executable, "-m", "distbp", "train", "--run-dir", str(run_dir), "--set", "model.hidden=[2000, 1500]",
            "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=10", "--set", "train.max_steps=400"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=job_env())
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if ckpt.list_checkpoints(ckpts) and any(ckpt.TMP_MARK in p.name for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    stale = [p for p in ckpts.iterdir() if ckpt.TMP_MARK in p.name]
    assert stale, "the kill did not land during a save"
    sealed = ckpt.list_checkpoints(ckpts)
    for path in sealed:
        ckpt.load(path)  # every sealed checkpoint is intact
    newest = ckpt.load(sealed[-1]).attrs["step"]
    done = distbp(1, "train", "--run-dir", str(run_dir), "--set", "model.hidden=[2000, 1500]",
                  "--set", f"train.max_steps={newest + 1}", "--set", "train.log_every=1000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {sealed[-1]} at step {newest}" in done.stdout
    assert not [p for p in ckpts.iterdir() if ckpt.TMP_MARK in p.name]
    assert ckpt.load(final(run_dir, newest + 1)).attrs["step"] == newest + 1


def test_resume_keeps_the_normalization_it_was_trained_with(wcomm, run_root):
    assert train(wcomm, run_root, "train.max_steps=10", 'data.normalize="none"') == 0
    with pytest.raises(UserError, match=r"data.normalize='standard', data.normalize_targets=true differ from "
                                        r"'none', true that .* HINT: resume with --set data.normalize=none"):
        train(wcomm, run_root, "train.max_steps=20")
    assert train(wcomm, run_root, "train.max_steps=20", 'data.normalize="none"') == 0
