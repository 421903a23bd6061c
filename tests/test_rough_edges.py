"""Rough edges a new user hit (issue 28, point 7): each one's behaviour now."""
import json
import re
from pathlib import Path

import pytest

from distbp import cli
from distbp.reporting.metrics import format_summary


@pytest.fixture
def alone(serial, tmp_path, monkeypatch):
    """In-process CLI calls in an empty folder of the serial session."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_failed_start_leaves_no_run_directory(alone, capsys):
    assert cli.main(["train", "--set", "data.path='mnist.h5'"]) == 2
    err = capsys.readouterr().err
    assert "`distbp data fetch mnist` downloads and writes it to data/mnist.h5" in err and "data digits" not in err
    assert not (alone / "runs").exists()


def test_running_a_finished_run_again_says_which_key_to_raise(alone, capsys):
    args = ["train", "--set", "train.epochs=1", "--set", "log.tensorboard=true", "--run-dir", "done", "--progress", "none"]
    assert cli.main(args) == 0
    before, files = (alone / "done" / "metrics.jsonl").read_text(), sorted((alone / "done").rglob("*"))
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "the run is finished: step 23 of 23; HINT: raise train.epochs, e.g. --set train.epochs=2 to train on" in out
    assert "nothing was trained or written" in out and "summary:" not in out
    assert (alone / "done" / "metrics.jsonl").read_text() == before
    assert sorted((alone / "done").rglob("*")) == files  # no tracker run opened either (no new event file)


def test_data_path_is_stored_absolute_and_eval_works_from_elsewhere(alone, monkeypatch, capsys):
    assert cli.main(["data", "digits", "d.h5"]) == 0
    assert cli.main(["train", "--set", "data.path='d.h5'", "--set", "train.epochs=1", "--set", "optim.name='adam'",
                     "--set", "optim.momentum=0.9", "--run-dir", "run", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: optim.momentum=0.9: not an option of optim.name='adam', so ignored" in out
    assert f'path = "{alone / "d.h5"}"' in (alone / "run" / "config.toml").read_text()
    (alone / "elsewhere").mkdir()
    monkeypatch.chdir(alone / "elsewhere")
    assert cli.main(["eval", str(alone / "run")]) == 0
    assert cli.main(["eval", str(alone / "run"), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no such split (the file has: train, val)" in err and "HINT: choose one of those (--split train | val)" in err


def test_the_time_split_adds_up_to_the_wall_time():
    summary = {"steps": 5, "epochs": 1.0, "world_size": 1, "samples_per_s": 10.0, "wall_time_s": 10.0,
               "time_s": {"data": 1.0, "forward": 1.0, "backward": 2.0, "allreduce": 0.5, "optimizer": 0.5,
                          "eval": 1.0, "checkpoint": 1.0}}
    rows = [line for line in format_summary(summary) if line.strip().startswith("time ")]
    assert re.search(r"time other +3\.00 s +30%  \(start-up, trackers, logging\)", rows[-1])
    assert sum(float(re.search(r"s +(\d+)%", r).group(1)) for r in rows) == 100


def test_config_errors_come_all_at_once(alone, capsys):
    assert cli.main(["train", "--set", "train.epoch=3", "--set", "optim.lr=-1", "--set", "train.batch_size=abc",
                     "--set", "model.dropout=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distbp: error: 4 config errors: (1) ")
    for part in ("train.batch_size='abc' has the wrong type", "did you mean 'train.epochs'?",
                 "model.dropout=2.0 must be in [0, 1)", "optim.lr=-1.0 must be positive"):
        assert part in err


def test_ckpt_export_carries_normalization_and_layer_specs(alone, capsys):
    import numpy as np
    from distbp import nn
    assert cli.main(["train", "--set", "train.epochs=1", "--set", "model.hidden=[32, 16]", "--run-dir", "run",
                     "--progress", "none"]) == 0
    assert cli.main(["ckpt", "export", "run", "e.npz"]) == 0
    z = np.load(alone / "e.npz")  # no pickle needed: every entry is a plain array
    specs = json.loads(str(z["layers"]))
    assert [s["type"] for s in specs] == ["linear", "relu", "linear", "relu", "linear"]
    net = nn.Sequential(specs, (64,), dtype=np.float32)
    for name, view in net.views(net.params).items():
        view[...] = z[name]
    x = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)
    scaled = x / 16  # the digits' x_scale, then the stored normalization
    out = net.forward(((scaled - z["normalization.x_shift"]) / z["normalization.x_scale"]).astype(np.float32))
    import distbp
    np.testing.assert_array_equal(out.argmax(1), distbp.load(alone / "run").predict(x.astype(np.uint8)))
    assert json.loads(str(z["config"]))["model"]["hidden"] == [32, 16]


def test_eval_chunks_are_sized_by_the_models_activations():
    import numpy as np
    from distbp import load_config
    from distbp.inference.evaluate import eval_chunk
    from distbp.nn import Sequential
    layers = load_config("digits-cnn").model.layers
    assert eval_chunk(Sequential(layers, (784,), np.float32)) == 128  # 28x28: ~0.5 MB of layer outputs per row
    assert eval_chunk(Sequential(layers, (64,), np.float32)) == 1024  # 8x8
    assert eval_chunk(Sequential([{"type": "linear", "out": 128}, {"type": "relu"}, {"type": "linear", "out": 10}],
                                 (64,), np.float32)) == 1024
