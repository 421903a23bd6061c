"""Checkpoint files: round trip, checksum, atomic writes, the newest valid one, retention."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from distbp.files import atomic
from distbp.files import checkpoint as ckpt


def make(step: int, seed: int = 0) -> ckpt.Checkpoint:
    """A small checkpoint with params, optimizer state and buffers."""
    rng = np.random.default_rng(seed)
    params = {"0.linear.W": rng.standard_normal((4, 3)).astype(np.float32),
              "0.linear.b": rng.standard_normal(3).astype(np.float32)}
    opt = {"exp_avg": {k: v * 0.5 for k, v in params.items()}, "exp_avg_sq": {k: v * v for k, v in params.items()}}
    attrs = {"step": step, "epoch": 1, "step_in_epoch": 2, "samples_seen": 64 * step, "world_size": 2,
             "config": "{}"}
    return ckpt.Checkpoint(params, "adam", opt, {"t": step}, {"1.batchnorm.running_mean": np.zeros(3)}, attrs)


def write(d, step, seed=0):
    """Save make(step) as d/step-XXXXXXXX.h5."""
    return ckpt.save(d / ckpt.checkpoint_name(step), make(step, seed))


def test_round_trip_is_plain_hdf5(tmp_path):
    path = write(tmp_path, 30)
    ck = ckpt.load(path)
    for name, a in make(30).params.items():
        np.testing.assert_array_equal(ck.params[name], a)
        assert ck.params[name].shape == a.shape
    np.testing.assert_array_equal(ck.opt_arrays["exp_avg_sq"]["0.linear.W"], make(30).opt_arrays["exp_avg_sq"]["0.linear.W"])
    assert ck.opt_name == "adam" and ck.opt_scalars == {"t": 30}
    assert ck.attrs["step"] == 30 and ck.attrs["distbp_format"] == "checkpoint" and ck.attrs["version"] == 2
    with h5py.File(path, "r") as f:
        kinds = set()
        f.visititems(lambda n, o: kinds.add(type(o).__name__))
        assert kinds <= {"Group", "Dataset"}
        assert all(f[k].dtype.kind in "fiu" for k in ("params/0.linear.W", "optimizer/exp_avg/0.linear.b"))
    assert not [p for p in tmp_path.iterdir() if ckpt.TMP_MARK in p.name]


def test_flipped_bytes_fail_checksum(tmp_path):
    path = write(tmp_path, 10)
    with h5py.File(path, "r") as f:
        offset = f["params/0.linear.W"].id.get_offset()
    raw = bytearray(path.read_bytes())
    raw[offset + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        ckpt.load(path)


def test_truncated_and_garbage_files(tmp_path):
    path = write(tmp_path, 10)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="unreadable or truncated"):
        ckpt.load(path)
    junk = tmp_path / ckpt.checkpoint_name(11)
    junk.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(ckpt.CheckpointError, match=str(junk)):
        ckpt.load(junk)


def test_latest_valid_skips_damaged(tmp_path):
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:2000])
    seen = []
    ck = ckpt.latest_valid(tmp_path, seen.append)
    assert ck.attrs["step"] == 10
    assert "skipping damaged checkpoint" in seen[0] and str(newest) in seen[0]
    assert ckpt.latest_valid(tmp_path / "none") is None


def test_prune_keeps_newest_and_the_valid_one(tmp_path):
    paths = [write(tmp_path, s) for s in (10, 20, 30, 40)]
    ckpt.prune(tmp_path, 2, paths[-1])
    assert ckpt.list_checkpoints(tmp_path) == paths[2:]
    ckpt.prune(tmp_path, 1, paths[2])
    assert ckpt.list_checkpoints(tmp_path) == paths[2:]  # 30 is kept as the valid one


WRITER = textwrap.dedent("""
    import os, sys, time
    from distbp.files import checkpoint as ckpt
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make
    real = os.write
    def slow(fd, data):
        written = real(fd, data[:1000])
        print("writing", flush=True)
        time.sleep(30)
        return written
    os.write = slow
    ckpt.save({path!r}, make(20, seed=1))
""")


def test_writer_killed_mid_save_leaves_previous_intact(tmp_path):
    write(tmp_path, 10)
    target = tmp_path / ckpt.checkpoint_name(20)
    code = WRITER.format(tests=os.path.dirname(__file__), path=str(target))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if ckpt.TMP_MARK in p.name]
    assert ckpt.latest_valid(tmp_path).attrs["step"] == 10
    assert ckpt.clean_stale(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ckpt.TMP_MARK in p.name]


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    write(tmp_path, 10)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic, "fsync_path", full)
    with pytest.raises(OSError):
        write(tmp_path, 20)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.checkpoint_name(10)]
    assert ckpt.load(tmp_path / ckpt.checkpoint_name(10)).attrs["step"] == 10


@pytest.mark.timing  # a ratio in one test, but the background writer competes with other load for the cores
def test_save_time_close_to_plain_h5py(tmp_path, capsys):
    rng = np.random.default_rng(0)
    shapes = {"0.linear.W": (784, 1024), "0.linear.b": (1024,), "2.linear.W": (1024, 1024),
              "2.linear.b": (1024,), "4.linear.W": (1024, 10), "4.linear.b": (10,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ck = ckpt.Checkpoint(params, "sgd", {"momentum": params}, {}, {}, make(1).attrs)

    def plain(i):
        with h5py.File(tmp_path / f"plain{i}.h5", "w") as f:
            for k, a in params.items():
                f[f"params/{k}"] = a
                f[f"optimizer/momentum/{k}"] = a

    saver = ckpt.BackgroundSaver()
    t_plain, t_block, t_durable = [], [], []
    for i in range(9):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        plain(i)
        t1 = time.perf_counter()
        assert saver.save(tmp_path / ckpt.checkpoint_name(i), ck) is None
        t2 = time.perf_counter()
        assert saver.wait() is None
        t_plain.append(t1 - t0)
        t_block.append(t2 - t1)
        t_durable.append(time.perf_counter() - t1)
    t_plain, t_block, t_durable = (float(np.median(t)) for t in (t_plain, t_block, t_durable))
    with capsys.disabled():
        print(f"\ncheckpoint of {2 * sum(a.nbytes for a in params.values()) / 1e6:.1f} MB: training blocked "
              f"{t_block * 1e3:.1f} ms, plain h5py write {t_plain * 1e3:.1f} ms ({t_block / t_plain:.2f}x); "
              f"durable (checksum + fsync + rename) {t_durable * 1e3:.1f} ms")
    assert t_block <= 1.5 * t_plain
    assert ckpt.load(tmp_path / ckpt.checkpoint_name(8)).attrs["step"] == 1


def test_best_survives_pruning_and_run_dirs_resolve(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30, 40):
        path = write(d, step)
        if step == 20:
            ckpt.mark_best(path)
        ckpt.prune(d, 1, path)
    assert sorted(p.name for p in d.iterdir()) == [ckpt.BEST, "step-00000040.h5"]
    assert ckpt.load(d / ckpt.BEST).attrs["step"] == 20  # the pruned step-20 file lives on as best.h5
    assert ckpt.find(tmp_path / "run") == ckpt.find(d) == d / "step-00000040.h5"
    assert ckpt.find(tmp_path / "run", best=True) == d / ckpt.BEST
    assert ckpt.find(d / "step-00000040.h5") == d / "step-00000040.h5"
    write(d, 50)
    with open(d / "step-00000050.h5", "r+b") as f:  # a damaged newest: the newest valid one is meant
        f.truncate(100)
    assert ckpt.find(tmp_path / "run") == d / "step-00000040.h5"
    (d / ckpt.BEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no best.h5; HINT: train with checkpoint.keep_best=true"):
        ckpt.find(tmp_path / "run", best=True)
    with pytest.raises(ckpt.CheckpointError, match="holds no valid checkpoint"):
        ckpt.find(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.find(tmp_path / "nothing")
