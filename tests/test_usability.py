"""The README's newcomer walk-through as subprocesses, plus help texts, generated docs and shipped configs."""
import argparse
import gzip
import importlib.util
import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp import cli
from distbp.config import load_config, named_configs
from distbp.datasets.dataset import Dataset, digits_path
from distbp.nn import Sequential
from distbp.inference.builders import build_model
from conftest import run_distbp

ROOT = Path(__file__).resolve().parent.parent


def distbp(*args, ranks: int = 0, cwd=None, timeout: float = 50) -> str:
    """Run `distbp ARGS` (under mpirun -n ranks when ranks > 0); its output; fail on a non-zero exit."""
    p = run_distbp(args, ranks, cwd=cwd, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(p.args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout + p.stderr


def write_idx_pair(folder: Path, n: int = 480, seed: int = 0):
    """Gzipped MNIST-style IDX files of 8x8 images whose class (0..3) is the bright quadrant."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 150
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, 8, 8) + x.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x00000801, n) + y.tobytes())


def test_walkthrough_idx_convert_train_4_ranks_plot_resume_predict(tmp_path):
    write_idx_pair(tmp_path)
    out = distbp("data", "convert", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "mnist.h5",
                 "--val-fraction", "0.2", "--seed", "1", cwd=tmp_path)
    assert "train    x (384, 1, 8, 8) uint8" in out and "val      x (96, 1, 8, 8) uint8" in out
    assert "classes 0:" in distbp("data", "inspect", "mnist.h5", cwd=tmp_path)
    config = ROOT / "examples" / "classification.toml"
    common = [config, "--set", "data.path='mnist.h5'", "--set", "checkpoint.every_steps=5",
              "--run-dir", "run"]
    out = distbp("train", *common, "--set", "train.epochs=2", ranks=4, cwd=tmp_path)
    assert "4 rank(s)" in out and "val_accuracy" in out
    first = sorted((tmp_path / "run" / "checkpoints").glob("step-*.h5"))[-1]
    assert first.name == "step-00000006.h5"  # 384 rows / batch 128 = 3 steps per epoch
    png = tmp_path / "run.png"
    distbp("plot", "run", "-o", png, cwd=tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = distbp("train", *common, "--set", "train.epochs=6", ranks=4, cwd=tmp_path)
    assert "resumed from" in out and "at step 6" in out
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*.h5"))[-1]
    assert last.name == "step-00000018.h5"
    distbp("predict", last, "mnist.h5", "pred.h5", "--split", "val", ranks=2, cwd=tmp_path)
    with h5py.File(tmp_path / "pred.h5", "r") as f:
        assert f["probabilities"].shape == (96, 4) and np.mean(f["class"][()] == f["y"][()]) > 0.9


def test_walkthrough_csv_and_the_regression_example(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (600, 3)).astype(np.float32)
    names = np.array(["low", "mid", "high"])[np.digitize(x[:, 0] + x[:, 1], [-1, 1])]
    lines = ["a,b,c,kind"] + [f"{r[0]},{r[1]},{r[2]},{k}" for r, k in zip(x, names)]
    (tmp_path / "my.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "data").mkdir()  # in a clone, the repository's data/ folder
    distbp("data", "convert", "my.csv", "data/my.h5", "--label", "kind", cwd=tmp_path)
    out = distbp("train", ROOT / "examples" / "classification.toml", "--set", "train.epochs=3",
                 "--set", "data.path='data/my.h5'", "--run-dir", "c", ranks=2, cwd=tmp_path)
    assert "val_accuracy" in out
    x = rng.uniform(-2, 2, (3000, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2])
    distbp("data", "convert", "x.npy", "y.npy", "data/regression.h5", "--task", "regression", cwd=tmp_path)
    distbp("train", ROOT / "examples" / "regression.toml", "--set", "train.epochs=5", "--run-dir", "r",
           cwd=tmp_path)
    summary = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["summary"] and summary["val_loss"] < 0.5  # the targets' variance is ~2.3


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    """(argv prefix, parser) of every command and subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def test_every_command_has_complete_help(capsys):
    commands = list(_subparsers(cli.build_parser()))
    names = {" ".join(p) for p, _ in commands}
    assert {"train", "eval", "data convert", "data inspect", "plot", "predict", "ckpt verify"} <= names
    for prefix, parser in commands:
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([*prefix, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: distbp")
        for action in parser._actions:  # every option and argument explains itself
            assert action.help, f"distbp {' '.join(prefix)}: {action.dest} has no help"


def test_config_docs_are_generated_and_current():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.generate()
    assert (ROOT / "docs" / "CONFIG.md").read_text() == text, "run python scripts/gen_config_docs.py"
    from distbp.config import describe_keys
    from distbp.nn import LAYER_TYPES
    assert all(f"`{key}`" in text and meaning for key, *_, meaning in describe_keys())
    assert all(f"| `{name}` |" in text for name in LAYER_TYPES)


def test_readme_links_and_quick_start():
    readme = (ROOT / "README.md").read_text()
    assert "```sh\nbash scripts/setup.sh\n```" in readme and "```sh\n.venv/bin/mpirun -n 8 .venv/bin/distbp train\n```" in readme
    assert "bash scripts/test.sh" in readme
    for link in ("docs/CONFIG.md", "docs/DESIGN.md", "slurm/README.md", "examples/regression.toml",
                 "examples/classification.toml"):
        assert f"({link})" in readme and (ROOT / link).is_file()
    for command in ("distbp data convert", "distbp plot", "distbp predict", "--resume", "mpirun -n 4"):
        assert command in readme


def test_shipped_configs_build_and_digits_cnn_views_rows_as_images():
    assert {"digits", "digits-cnn"} <= set(named_configs())
    with Dataset(digits_path()) as data:
        model = build_model(load_config("digits-cnn"), data)
    assert model.input_shape == (64,) and model.out_shape == (10,)
    assert [layer.kind for layer in model.layers][:2] == ["reshape", "conv2d"]
    assert model.shapes_io[1][0] == (1, 8, 8)


def test_reshape_layer_round_trip_and_errors():
    model = Sequential([{"type": "reshape", "shape": [2, 3]}, {"type": "flatten"}], (6,), dtype=np.float64)
    x = np.arange(12.0).reshape(2, 6)
    assert model.layers[0].forward(x).shape == (2, 2, 3)
    assert np.array_equal(model.forward(x), x) and np.array_equal(model.backward(x), x)
    with pytest.raises(ValueError, match=r"shape \[4, 2\] holds 8 values per row but the input \(6,\) has 6"):
        Sequential([{"type": "reshape", "shape": [4, 2]}], (6,))
    with pytest.raises(ValueError, match="needs 'shape'"):
        Sequential([{"type": "reshape"}], (6,))


def test_typos_get_a_suggestion_and_the_usage_of_their_subcommand(capsys):
    for argv, usage, hint in ((["trian"], "usage: distbp [", "invalid choice: 'trian' (did you mean 'train'?)"),
                              (["ckpt", "inspct", "x.h5"], "usage: distbp ckpt [", "(did you mean 'inspect'?)"),
                              (["train", "--sett", "train.epochs=1"], "usage: distbp train [",
                               "unrecognized arguments: --sett; '--sett': did you mean '--set'?"),
                              (["data", "convert", "a.npz", "b.h5", "--val-fration", "0.2"], "usage: distbp data convert [",
                               "did you mean '--val-fraction'?")):
        with pytest.raises(SystemExit) as e:
            cli._parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(usage) and hint in err, (argv, err)


def test_train_help_points_to_the_config_docs_and_lists_the_sections(capsys):
    from distbp.config import SECTIONS
    with pytest.raises(SystemExit):
        cli._parse(["train", "--help"])
    text = capsys.readouterr().out
    assert "docs/CONFIG.md" in text and ", ".join(SECTIONS) in text and "--progress {auto,bar,lines,none}" in text
