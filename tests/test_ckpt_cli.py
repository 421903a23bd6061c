"""distbp ckpt inspect | verify | export and distbp eval on checkpoints of a real run; no pickles in them."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.cli import main
from distbp.parallel.comm import SerialComm
from distbp.config import config_from_dict
from distbp.datasets.dataset import Dataset, digits_path, write_dataset
from distbp.training.loop import run
from conftest import run_distbp

LAYERS = [{"type": "linear", "out": 32}, {"type": "batchnorm"}, {"type": "relu"}, {"type": "dropout", "p": 0.2},
          {"type": "linear", "out": 10}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Run dir of 40 Adam steps on the digits (checkpoints at 20 and 40) with batchnorm and dropout."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config_from_dict({"model": {"layers": LAYERS}, "optim": {"name": "adam", "lr": 0.003},
                            "train": {"max_steps": 40, "log_every": 100}, "checkpoint": {"every_steps": 20}})
    assert run(cfg, SerialComm(), run_dir, "never")["exit_code"] == 0
    return run_dir


def newest(run_dir) -> Path:
    """The final checkpoint of the run."""
    return run_dir / "checkpoints" / ckpt.checkpoint_name(40)


def distbp(*args, n: int = 1) -> subprocess.CompletedProcess:
    """python -m distbp ARGS on n ranks (n == 1: no launcher)."""
    return run_distbp(args, n if n > 1 else 0, timeout=60)


def summary(run_dir) -> dict:
    """The run's last metrics line."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def flipped_copy(src: Path, dst: Path) -> Path:
    """A copy of src with four bytes of one parameter's data inverted."""
    with h5py.File(src, "r") as f:
        offset = f["params/0.linear.W"].id.get_offset()
    raw = bytearray(src.read_bytes())
    raw[offset + 40:offset + 44] = bytes(b ^ 0xFF for b in raw[offset + 40:offset + 44])
    dst.write_bytes(bytes(raw))
    return dst


def test_inspect_shows_position_config_shapes_and_sizes(trained):
    done = distbp("ckpt", "inspect", str(newest(trained)))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("step: 40", "epoch: 2 (17 steps into it; stored 0-based as epoch=1)", "step_in_epoch: 17", "samples_seen: 2525", "world_size: 1",
                 "optimizer: adam {'t': 40}"):
        assert line in out.splitlines()
    for name, shape, kib in (("params/0.linear.W", "(64, 32)", "8.0"), ("params/4.linear.b", "(10,)", "0.0"),
                             ("optimizer/exp_avg_sq/0.linear.W", "(64, 32)", "8.0"),
                             ("buffers/1.batchnorm.running_var", "(32,)", "0.1")):
        assert re.search(rf"^{re.escape(name)} +{re.escape(shape)} +float32 {kib} KiB$", out, re.M), name
    config = json.loads(out.split("config: ", 1)[1])
    assert config["optim"]["name"] == "adam" and config["model"]["layers"] == LAYERS


def test_verify_exit_codes(trained, tmp_path):
    good = newest(trained)
    done = distbp("ckpt", "verify", str(good))
    assert done.returncode == 0 and done.stdout.startswith(f"OK: {good} step 40 checksum crc32:")
    bad = flipped_copy(good, tmp_path / "flipped.h5")
    done = distbp("ckpt", "verify", str(bad))
    assert done.returncode == 1 and f"INVALID: checkpoint {bad} fails its checksum" in done.stdout

def test_verify_and_inspect_of_bad_files_in_process(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs the abort-on-error hook
    short = tmp_path / "short.h5"
    short.write_bytes(newest(trained).read_bytes()[:5000])
    assert main(["ckpt", "verify", str(short)]) == 1
    assert "unreadable or truncated" in capsys.readouterr().out
    assert main(["ckpt", "verify", str(digits_path())]) == 1
    assert "is not a distbp checkpoint" in capsys.readouterr().out
    assert main(["ckpt", "verify", str(tmp_path / "none.h5")]) == 1
    assert "does not exist" in capsys.readouterr().out
    bad = flipped_copy(newest(trained), tmp_path / "flipped.h5")
    for action in (["inspect", str(bad)], ["export", str(bad), str(tmp_path / "out.npz")]):
        assert main(["ckpt", *action]) == 2
        assert f"distbp: error: checkpoint {bad} fails its checksum" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_export_gives_plain_arrays_by_name(trained, tmp_path):
    out = tmp_path / "params.npz"
    done = distbp("ckpt", "export", str(newest(trained)), str(out))
    assert done.returncode == 0, done.stderr
    with h5py.File(newest(trained), "r") as f:
        stored = {k: v[()] for k, v in f["params"].items()}
    with np.load(out, allow_pickle=False) as npz:
        exported = {k: npz[k] for k in npz.files}
    assert sorted(stored) == ["0.linear.W", "0.linear.b", "1.batchnorm.W", "1.batchnorm.b", "4.linear.W", "4.linear.b"]
    assert sorted(exported) == sorted([*stored, "normalization.x_shift", "normalization.x_scale", "layers", "config"])
    assert json.loads(str(exported["layers"])) == LAYERS
    for name, a in stored.items():
        assert exported[name].dtype == a.dtype == np.float32 and exported[name].tobytes() == a.tobytes()


def test_export_writes_a_parameter_of_any_name(trained, tmp_path):
    crafted = tmp_path / "crafted.h5"  # np.savez(f, **params) failed on a name of its own arguments
    shutil.copy(newest(trained), crafted)
    with h5py.File(crafted, "r+") as f:
        f.move("params/0.linear.W", "params/file")
    ck = ckpt.load(crafted, verify=False)
    with h5py.File(crafted, "r+") as f:
        f.attrs["checksum"] = ckpt.checksum(ck)
    done = distbp("ckpt", "export", str(crafted), str(tmp_path / "p.npz"))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    with np.load(tmp_path / "p.npz", allow_pickle=False) as npz:
        assert "file" in npz.files and npz["file"].tobytes() == ck.params["file"].tobytes()


def parse_eval(stdout: str) -> dict:
    """The first line 'split=val rows=360 loss=... accuracy=... checkpoint=...' as a dict."""
    return dict(item.split("=", 1) for item in stdout.splitlines()[0].split())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_eval_matches_the_runs_final_val_metrics(trained, n):
    done = distbp("eval", str(newest(trained)), n=n)
    assert done.returncode == 0, done.stderr
    got, want = parse_eval(done.stdout), summary(trained)
    assert (got["split"], got["rows"]) == ("val", "360")
    assert float(got["loss"]) == pytest.approx(want["val_loss"], rel=1e-5)
    assert float(got["accuracy"]) == pytest.approx(want["val_accuracy"], rel=1e-5)


def test_eval_on_another_file_and_split(trained, tmp_path):
    with Dataset(digits_path()) as digits:
        train, val = (digits.split(s).read(np.arange(digits.split(s).n)) for s in ("train", "val"))
    data = write_dataset(tmp_path / "with-test.h5", {"train": train, "val": (val[0][:50], val[1][:50]),
                                                     "test": val}, num_classes=10)
    done = distbp("eval", str(newest(trained)), "--data", str(data), "--split", "test", n=2)
    assert done.returncode == 0, done.stderr
    got = parse_eval(done.stdout)
    assert (got["split"], got["rows"]) == ("test", "360")
    assert float(got["loss"]) == pytest.approx(summary(trained)["val_loss"], rel=1e-5)
    done = distbp("eval", str(newest(trained)), "--split", "test")
    assert done.returncode == 2 and "split 'test': no such split (the file has: train, val)" in done.stderr


def test_checkpoint_files_hold_no_pickles(trained):
    paths = ckpt.list_checkpoints(trained / "checkpoints")
    assert [p.name for p in paths] == [ckpt.checkpoint_name(20), ckpt.checkpoint_name(40)]
    for path in paths:
        found = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.append((name, obj)))
            found.append(("/", f))
            for name, obj in found:
                assert isinstance(obj, (h5py.Group, h5py.Dataset)), (path, name, type(obj))
                if isinstance(obj, h5py.Dataset):
                    assert obj.dtype.kind in "fiu" and h5py.check_vlen_dtype(obj.dtype) is None, (path, name)
                for key in obj.attrs:
                    dtype = obj.attrs.get_id(key).dtype
                    plain = dtype.kind in "fiub" or h5py.check_string_dtype(dtype) is not None
                    assert plain, (path, name, key, dtype)
                    assert isinstance(obj.attrs[key], (str, np.integer, np.floating, np.bool_)), (path, name, key)
            for name in f["/"]:
                assert f.get(name, getlink=True).__class__ is h5py.HardLink, (path, name)
