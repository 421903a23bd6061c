"""Bad input: caught before training, one message from rank 0 naming the file/key and the fix, exit 2."""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbp.config import ConfigError, load_config, parse_override, tomllib
from distbp.datasets.dataset import DataError, Dataset, digits_path, write_dataset
from conftest import run_distbp

LAYERS_8X8 = '[model]\nlayers = [{type = "reshape", shape = [1, 8, 8]}, {type = "flatten"}, {type = "linear", out = 3}]\n'


def train(tmp: Path, args: list[str], ranks: int = 0, debug: bool = False,
          fault: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """`distbp train ARGS` in tmp (under mpirun -n ranks if ranks), with its wall time."""
    start = time.monotonic()
    proc = run_distbp(["--debug"] * debug + ["train", *args], ranks, cwd=tmp, timeout=50,
                      env={"DISTBP_FAULT": fault} if fault else {})
    return proc, time.monotonic() - start


def splits(train=40, val=12, features=6, classes=3):
    """Valid {split: (x, y)} arrays."""
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal((n, features)).astype(np.float32), np.arange(n) % classes)
            for name, n in (("train", train), ("val", val))}


def raw_file(path: Path, groups: dict, **attrs):
    """An HDF5 file written directly (no validation) with dataset-format root attributes."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "classification", "num_classes": 3,
                        **attrs})
        for name, arrays in groups.items():
            g = f.create_group(name)
            for key, a in arrays.items():
                g.create_dataset(key, data=a)
    return path


def good(tmp: Path) -> Path:
    """A valid small dataset file."""
    return write_dataset(tmp / "good.h5", splits(train=80), num_classes=3)


def with_data(path) -> list[str]:
    return ["--set", f'data.path="{path}"']


def truncated(tmp):
    data = (tmp / "t.h5")
    shutil.copyfile(digits_path(), data)
    os.truncate(data, data.stat().st_size // 2)
    return with_data(data)


def poisoned(tmp, fn):
    """A raw dataset file whose train arrays fn altered in place."""
    arrays = {k: dict(zip("xy", v)) for k, v in splits().items()}
    fn(arrays["train"])
    return with_data(raw_file(tmp / "bad.h5", arrays))


def other_architecture(tmp):
    first, _ = train(tmp, with_data(good(tmp)) + ["--set", "model.hidden=[8]", "--set", "train.max_steps=2",
                                                   "--run-dir", "run"])
    assert first.returncode == 0, first.stderr
    return with_data(tmp / "good.h5") + ["--set", "model.hidden=[16]", "--run-dir", "run"]


def not_writable_run_dir(tmp):
    (tmp / "afile").write_text("")
    return ["--run-dir", "afile/run"]


def write(tmp, name, text):
    (tmp / name).write_text(text)
    return tmp / name


# (case, args given a tmp folder, fragments the one message must hold)
CASES = {
    "dataset missing": (lambda t: with_data(t / "nope.h5"), ["nope.h5", "no such file", "HINT"]),
    "not HDF5": (lambda t: with_data(write(t, "x.h5", "a,b\n1,2\n")), ["x.h5", "not an HDF5 file"]),
    "truncated": (truncated, ["t.h5", "truncated or damaged", "HINT"]),
    "missing split": (lambda t: with_data(raw_file(t / "b.h5", {"train": dict(zip("xy", splits()["train"]))})),
                      ["b.h5", "split 'val'", "no such split", "data.val_split"]),
    "missing y": (lambda t: poisoned(t, lambda a: a.pop("y")), ["bad.h5", "no dataset 'train/y'"]),
    "mismatched rows": (lambda t: poisoned(t, lambda a: a.update(y=a["y"][:-1])),
                        ["bad.h5", "split 'train'", "y has shape (39,) but x has 40 rows"]),
    "wrong x dtype": (lambda t: poisoned(t, lambda a: a.update(x=a["x"].astype(np.int32))),
                      ["bad.h5", "x: dtype int32 is not float32", "HINT"]),
    "wrong shape for the model": (lambda t: with_data(good(t)) + [str(write(t, "c.toml", LAYERS_8X8))],
                                  ["model.layers: layer 0 (reshape)", "good.h5", "(6,)"]),
    "label out of range": (lambda t: poisoned(t, lambda a: a["y"].__setitem__(7, 3)),
                           ["bad.h5", "label 3 at row 7 is outside [0, 3)", "num_classes"]),
    "negative label": (lambda t: poisoned(t, lambda a: a["y"].__setitem__(2, -1)),
                       ["bad.h5", "label -1 at row 2"]),
    "NaN feature": (lambda t: poisoned(t, lambda a: a["x"].__setitem__((5, 1), np.nan)),
                    ["bad.h5", "NaN or Inf features, first at row 5"]),
    "Inf feature": (lambda t: poisoned(t, lambda a: a["x"].__setitem__((9, 0), np.inf)),
                    ["bad.h5", "first at row 9"]),
    "empty split": (lambda t: poisoned(t, lambda a: a.update(x=a["x"][:0], y=a["y"][:0])),
                    ["bad.h5", "split 'train'", "empty"]),
    "fewer rows than a batch": (lambda t: with_data(good(t)) + ["--set", "train.batch_size=100", "--set",
                                                                "train.drop_last=true"],
                                ["good.h5", "80 rows, fewer than one global batch of 100", "train.batch_size",
                                 "train.drop_last=false"]),
    "checkpoint of another architecture": (other_architecture, ["different architecture", "0.linear.W",
                                                                 "--resume never"]),
    "config not TOML": (lambda t: [str(write(t, "c.toml", "[train\nepochs = 3\n"))], ["c.toml", "not valid TOML"]),
    "unknown key": (lambda t: ["--set", "train.epoch=3"], ["unknown config key 'train.epoch'", "train.epochs"]),
    "wrong type": (lambda t: ["--set", "train.epochs=three"], ["train.epochs='three'", "expected int"]),
    "negative lr": (lambda t: ["--set", "optim.lr=-0.1"], ["optim.lr=-0.1 must be positive"]),
    "batch size 0": (lambda t: ["--set", "train.batch_size=0"], ["train.batch_size=0 must be at least 1"]),
    "dropout 1": (lambda t: ["--set", "model.dropout=1.0"], ["model.dropout=1.0 must be in [0, 1)"]),
    "run dir not writable": (not_writable_run_dir, ["afile/run cannot be written", "--run-dir"]),
    "nesterov without momentum": (lambda t: ["--set", "optim.nesterov=true", "--set", "optim.momentum=0"],
                                  ["optim.nesterov=true", "optim.momentum > 0 (got 0.0)"]),
    "min_lr above lr": (lambda t: ["--set", "optim.schedule=cosine", "--set", "optim.min_lr=1"],
                        ["optim.min_lr=1.0", "optim.lr=0.05"]),
    "unknown layer type": (lambda t: ["--set", 'model.layers=[{type = "dense", out = 10}]'],
                           ["model.layers[0].type='dense'", "linear"]),
    "layer size a list": (lambda t: ["--set", 'model.layers=[{type = "linear", out = [10]}]'],
                          ["model.layers", "layer 0 (linear): out=[10] must be an int >= 1"]),
    "layer size a fraction": (lambda t: ["--set", 'model.layers=[{type = "linear", out = 10.9}]'],
                              ["model.layers", "out=10.9 must be an int"]),
    "bias a string": (lambda t: ["--set", 'model.layers=[{type = "linear", out = 10, bias = "false"}]'],
                      ["model.layers", "bias='false' must be a bool"]),
    "class weights of the wrong length": (lambda t: ["--set", "loss.class_weights=[1, 2]"],
                                          ["loss.class_weights has 2 weights", "digits.h5 has 10 classes"]),
    "both clipping kinds": (lambda t: ["--set", "optim.clip_grad_norm=1", "--set", "optim.clip_grad_value=1"],
                            ["optim.clip_grad_norm=1.0 and optim.clip_grad_value=1.0", "choose one"]),
    "early stopping without evaluations": (lambda t: ["--set", "train.early_stop_patience=3",
                                                      "--set", "data.val_split=''"],
                                           ["train.early_stop_patience=3", "data.val_split"]),
    "dropout p a list": (lambda t: ["--set", 'model.layers=[{type = "dropout", p = [0.1]}, '
                                             '{type = "linear", out = 10}]'],
                         ["model.layers", "p=[0.1] must be a float in [0, 1)"]),
}
MPI_CASES = ["dataset missing", "label out of range", "unknown key", "checkpoint of another architecture"]


def check_one_message(proc, fragments):
    """Exit 2, exactly one error message holding every fragment, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("distbp: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("distbp: error:"):]
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.timing
@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_message(tmp_path, case):
    make, fragments = CASES[case]
    proc, wall = train(tmp_path, make(tmp_path))
    check_one_message(proc, fragments)
    print(f"\n[{case}] rc={proc.returncode} wall={wall:.1f}s")
    assert wall < 20
    assert not (tmp_path / "run" / "checkpoints").exists() or case == "checkpoint of another architecture"


def test_malformed_fault_plan_is_a_usage_error(tmp_path):
    proc, _ = train(tmp_path, ["--set", "train.max_steps=1"], fault="rank=1,step=5")
    check_one_message(proc, ["DISTBP_FAULT", "rank=1,step=5,kind=raise", "HINT"])


@pytest.mark.timing
@pytest.mark.parametrize("case", MPI_CASES)
def test_bad_input_under_mpirun_prints_once(tmp_path, case):
    make, fragments = CASES[case]
    proc, wall = train(tmp_path, make(tmp_path), ranks=4)
    check_one_message(proc, fragments)
    print(f"\n[mpirun -n 4, {case}] rc={proc.returncode} wall={wall:.1f}s")
    assert wall < 20


def test_debug_flag_shows_the_traceback(tmp_path):
    proc, _ = train(tmp_path, with_data(tmp_path / "nope.h5"), debug=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "distbp.datasets.dataset.DataError: dataset" in proc.stderr and "dataset.py" in proc.stderr, proc.stderr


# Property-based: random malformed files and configs give a DataError/ConfigError, never another exception.

DTYPES = ["f4", "f8", "u1", "i4", "i8", "b1", "S3", "f2"]
ATTR_VALUES = st.one_of(st.none(), st.integers(-3, 12), st.integers(2**20, 2**62), st.floats(allow_nan=True),
                        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),  # storable in HDF5
                        st.sampled_from(["dataset", "checkpoint", "classification", "regression", "binary"]))
ARRAY = st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3),
                  st.sampled_from([0.0, 1.0, -1.0, 7.0, np.nan, np.inf, 0.5]))
GROUP = st.dictionaries(st.sampled_from(["x", "y", "z"]), ARRAY, max_size=3)


def fill(dtype, shape, value):
    """An array of dtype and shape: random small integers with one special value."""
    a = np.random.default_rng(len(shape)).integers(0, 4, size=shape).astype(np.float64)
    if a.size:
        a.flat[-1] = value
    if dtype == "S3":
        return a.astype("S3")
    with np.errstate(invalid="ignore"):
        return a.astype(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attrs=st.dictionaries(st.sampled_from(["distbp_format", "version", "task", "num_classes", "x_scale"]),
                             ATTR_VALUES, max_size=5),
       groups=st.dictionaries(st.sampled_from(["train", "val", "test", "x"]), GROUP, max_size=3),
       root_dataset=st.booleans(), batch=st.integers(1, 6))
def test_random_malformed_dataset_files_give_a_data_error(attrs, groups, root_dataset, batch):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.h5"
        with h5py.File(path, "w") as f:
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = v
            for name, arrays in groups.items():
                g = f.create_group(name)
                for key, (dtype, shape, value) in arrays.items():
                    g.create_dataset(key, data=fill(dtype, shape, value))
            if root_dataset:
                f.create_dataset("stray", data=np.zeros(3))
        try:
            with Dataset(path) as ds:
                for name in ds.splits:
                    split = ds.split(name)
                    split.check_batch_size(batch)
                    split.read(np.arange(min(batch, split.n))[::-1])
        except DataError as e:
            assert str(e).startswith(f"dataset {path}") and "HINT" in str(e)


TOML_ATOMS = st.sampled_from(["[train]", "[optim]", "[model]", "[nope]", "epochs = 3", "epochs = -1", "lr = 0",
                              "lr = \"x\"", "hidden = [0]", "hidden = [\"a\"]", "dropout = 1.5", "name = 7",
                              "= 3", "[[train]]", "batch_size = 1e9", "x.y = 1", "layers = [{}]", "[data]",
                              "path = 4", "stall_timeout = -5", "nonfinite = \"ignore\"", "keep = 0", "\"", "[]"])


def given_keys(text: str, overrides) -> dict | None:
    """{(section, key): value} the file and overrides set, as TOML reads them; None if the file is not TOML."""
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    given = {(sec, k): v for sec, t in tables.items() if isinstance(t, dict) for k, v in t.items()}
    for item in overrides:
        section, key, value = parse_override(item)
        given[(section, key)] = value
    return given


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(TOML_ATOMS, max_size=6), overrides=st.lists(st.text(max_size=20), max_size=2))
def test_random_config_files_and_overrides_give_a_config_error(lines, overrides):
    """A random file and overrides either load with every key taking the value given, or raise one ConfigError."""
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text(text)
        try:
            cfg = load_config(str(path), overrides)
        except ConfigError as e:
            assert str(e) and "Traceback" not in str(e)
            return
    given = given_keys(text, overrides)
    assert given is not None, f"a file TOML cannot read was accepted: {text!r}"
    for (section, key), value in given.items():  # nothing given is ignored
        assert getattr(getattr(cfg, section), key) == value, (section, key, value)
    assert load_config(None, [f"{s}.{k}={json.dumps(v)}" for (s, k), v in given.items()]) == cfg


def test_faults_doc_lists_every_case():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FAULTS.md").read_text()
    from distbp.parallel.faults import KINDS, POINTS
    missing = ([f"kind={k}" for k in KINDS if f"kind={k}" not in doc] + [f"at={p}" for p in POINTS if f"at={p}" not in doc]
               + [c for c in CASES if f"| {c} " not in doc])
    assert not missing, f"docs/FAULTS.md lacks rows for {missing}"
