"""The adversarial corpus: hostile or broken inputs to every command, each one message and an exit code.

Each row of CORPUS is an input made in a tmp folder, the command run on it, the expected exit
code and the fragments its one `distbp: error:` line (or `INVALID:` line) must hold. No row may
print a traceback, hang (each runs under a timeout) or leave a traceback from another rank.
"""
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp.files import bounded
from distbp.files import checkpoint as ckpt
from distbp.datasets.dataset import MAX_CLASSES, write_dataset
from conftest import MPIRUN, job_env

WALL = 30  # seconds any corpus command may take


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with a small dataset good.h5 and a run (run/checkpoints/step-00000002.h5) trained on it."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    write_dataset(d / "good.h5", {name: (rng.standard_normal((n, 6)).astype(np.float32), np.arange(n) % 3)
                                  for name, n in (("train", 64), ("val", 16))}, num_classes=3)
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--run-dir", str(d / "run"), "--set",
                           f'data.path="{d / "good.h5"}"', "--set", "train.max_steps=2", "--set",
                           "train.batch_size=16", "--set", "checkpoint.every_steps=1"],
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return d


def checkpoint(base: Path) -> Path:
    return base / "run" / "checkpoints" / ckpt.checkpoint_name(2)


def crafted(t: Path, base: Path, **attrs) -> str:
    """The run's checkpoint with attributes replaced (None deletes), its checksum recomputed to match."""
    path = t / "crafted.h5"
    shutil.copy(checkpoint(base), path)
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            if v is None:
                del f.attrs[k]
            else:
                f.attrs[k] = v
    ck = ckpt.load(path, verify=False)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = ckpt.checksum(ck)
    return str(path)


def dataset(t: Path, name="d.h5", x=None, y=None, **attrs) -> str:
    """A raw dataset file (no validation): 32 rows of 6 features, 3 classes, attributes overridden."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 6)).astype(np.float32) if x is None else x
    y = np.arange(32) % 3 if y is None else y
    with h5py.File(t / name, "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "classification", "num_classes": 3,
                        **attrs})
        for split in ("train", "val"):
            f[f"{split}/x"], f[f"{split}/y"] = x, y
    return str(t / name)


def virtual_missing_source(t: Path) -> str:
    """A dataset whose splits are virtual datasets mapping to a source file that was then removed."""
    src = dataset(t, "src.h5")
    with h5py.File(t / "v.h5", "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "classification", "num_classes": 3})
        for split in ("train", "val"):
            for key, shape, dtype in (("x", (32, 6), "f4"), ("y", (32,), "i8")):
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[...] = h5py.VirtualSource("src.h5", f"{split}/{key}", shape=shape)
                f.require_group(split).create_virtual_dataset(key, layout)
    Path(src).unlink()
    return str(t / "v.h5")


def npy(t: Path, a: np.ndarray) -> str:
    np.save(t / "in.npy", a)
    return str(t / "in.npy")


def binary(t: Path, name: str) -> str:
    (t / name).write_bytes(bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8)))
    return str(t / name)


def cut_gzip_csv(t: Path) -> str:
    x = np.random.default_rng(3).random((20000, 2))
    rows = "".join(f"{a:.6f},{b:.6f},{i % 3}\n" for i, (a, b) in enumerate(x))
    packed = gzip.compress(f"a,b,label\n{rows}".encode())
    (t / "cut.csv.gz").write_bytes(packed[:len(packed) // 2])
    return str(t / "cut.csv.gz")


def idx_pair(t: Path, image_header: bytes) -> list[str]:
    (t / "images.idx").write_bytes(image_header)
    (t / "labels.idx").write_bytes(b"\0\0\x08\x01\0\0\0\x02\x01\x02")
    return [str(t / "images.idx"), str(t / "labels.idx")]


def train_on(data: str, *extra) -> list[str]:
    return ["train", "--run-dir", "r", "--set", f'data.path="{data}"', "--set", "train.batch_size=16", *extra]


def run_dir_with_dir(t: Path, base: Path, name: str) -> list[str]:
    (t / "r" / name).mkdir(parents=True)
    return train_on(str(base / "good.h5"), "--set", "train.max_steps=1")


def garbage_checkpoint(t: Path) -> str:
    (t / "g.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(3000))
    return str(t / "g.h5")


# case: (argv from (tmp, base), exit code, fragments of the one message)
CORPUS = {
    "checkpoint config not JSON": (lambda t, b: ["ckpt", "inspect", crafted(t, b, config="{not json")], 2,
                                   ["crafted.h5", "config is not JSON"]),
    "checkpoint config not a table": (lambda t, b: ["eval", crafted(t, b, config="[1, 2]")], 2,
                                      ["crafted.h5", "not a table of config sections"]),
    "checkpoint step negative": (lambda t, b: train_on(str(b / "good.h5"), "--resume", crafted(t, b, step=-1)), 2,
                                 ["crafted.h5", "step=-1 is not a non-negative integer"]),
    "checkpoint step a string": (lambda t, b: ["eval", crafted(t, b, step="3")], 2, ["step='3'"]),
    "checkpoint step missing": (lambda t, b: ["ckpt", "export", crafted(t, b, step=None), str(t / "o.npz")], 2,
                                ["crafted.h5", "step=None"]),
    "checkpoint step crafted, verify": (lambda t, b: ["ckpt", "verify", crafted(t, b, step=-5)], 1,
                                        ["INVALID:", "step=-5"]),
    "checkpoint not HDF5 inside": (lambda t, b: ["ckpt", "verify", garbage_checkpoint(t)], 1,
                                   ["INVALID:", "g.h5", "unreadable"]),
    "checkpoint is a directory without checkpoints": (lambda t, b: ["ckpt", "inspect", str(t)], 2,
                                                      ["holds no valid checkpoint", "HINT"]),
    "config file binary": (lambda t, b: ["train", binary(t, "c.toml")], 2, ["c.toml", "not UTF-8 text"]),
    "CSV file binary": (lambda t, b: ["data", "convert", binary(t, "b.csv"), str(t / "o.h5")], 2,
                        ["b.csv", "not UTF-8 text", "not a CSV file"]),
    "gzip cut short": (lambda t, b: ["data", "convert", cut_gzip_csv(t), str(t / "o.h5")], 2,
                       ["cut.csv.gz", "cut short or damaged"]),
    "IDX header cut short": (lambda t, b: ["data", "convert", *idx_pair(t, b"\0\0\x08\x03\0\0\0\x02"),
                                           str(t / "o.h5")], 2, ["images.idx", "IDX header ends early"]),
    "a batch weighing 0 in class weights": (lambda t, b: train_on(str(b / "good.h5"), "--set", "train.batch_size=1",
                                                                  "--set", "loss.class_weights=[1, 0, 0]"), 3,
                                            ["class weighted 0 in loss.class_weights", "weight > 0"]),
    "labels beyond the class bound": (lambda t, b: ["data", "convert", *npy_pair(t, MAX_CLASSES), str(t / "o.h5"),
                                                    "--val-fraction", "0"],
                                      2, [f"{MAX_CLASSES + 1:,} classes", "0..K-1"]),
    "num_classes beyond the bound": (lambda t, b: train_on(dataset(t, num_classes=10**12)), 2,
                                     ["d.h5", "num_classes=1000000000000", f"{MAX_CLASSES:,}"]),
    "label far out of range": (lambda t, b: train_on(dataset(t, y=np.full(32, 10**12))), 2,
                               ["d.h5", "label 1000000000000 at row 0 is outside [0, 3)"]),
    "virtual dataset source missing": (lambda t, b: train_on(virtual_missing_source(t)), 2,
                                       ["v.h5", "virtual dataset", "src.h5", "fill values"]),
    "predict NaN input": (lambda t, b: ["predict", str(checkpoint(b)), npy(t, np.full((4, 6), np.nan, np.float32)),
                                        str(t / "p.h5")], 2, ["in.npy", "NaN or Inf inputs, first at row 0"]),
    "predict Inf input": (lambda t, b: ["predict", str(checkpoint(b)), npy(t, np.where(np.eye(4, 6) > 0, np.inf, 1.0)),
                                        str(t / "p.h5")], 2, ["in.npy", "NaN or Inf"]),
    "predict complex input": (lambda t, b: ["predict", str(checkpoint(b)), npy(t, np.ones((4, 6), np.complex64)),
                                            str(t / "p.h5")], 2, ["in.npy", "complex64 is not a real number type"]),
    "predict output a directory": (lambda t, b: ["predict", str(checkpoint(b)), str(b / "good.h5"), str(t)], 2,
                                   ["is a directory"]),
    "export output a directory": (lambda t, b: ["ckpt", "export", str(checkpoint(b)), str(mkdir(t / "o.npz"))], 2,
                                  ["o.npz is a directory"]),
    "data output a directory": (lambda t, b: ["data", "digits", str(mkdir(t / "out"))], 2,
                                ["out is a directory"]),
    "output folder missing": (lambda t, b: ["data", "digits", str(t / "nodir" / "x.h5")], 2,
                              ["nodir", "No such file or directory", "writable output"]),
    "synthetic output folder missing": (lambda t, b: ["data", "synthetic", str(t / "nodir" / "x.h5")], 2,
                                        ["nodir", "No such file or directory", "writable output"]),
    "output under a file": (lambda t, b: ["data", "digits", str(touch(t / "afile") / "x.h5")], 2,
                            ["afile", "Not a directory"]),
    "metrics.jsonl a directory": (lambda t, b: run_dir_with_dir(t, b, "metrics.jsonl"), 2,
                                  ["cannot open metrics.jsonl", "--run-dir"]),
    "train.log a directory": (lambda t, b: run_dir_with_dir(t, b, "train.log"), 2, ["cannot open train.log"]),
    # issue 29: the probe's remaining tracebacks and wrong messages
    "checkpoint micro_steps a string": (lambda t, b: train_on(str(b / "good.h5"), "--resume",
                                                              crafted(t, b, micro_steps="x")), 2,
                                        ["crafted.h5", "micro_steps='x' is not a non-negative integer"]),
    "checkpoint x_scale missing": (lambda t, b: ["predict", altered(t, b, delete="normalization/x_scale"),
                                                 str(b / "good.h5"), str(t / "p.h5")], 2,
                                   ["altered.h5", "normalization holds x_shift without x_scale"]),
    "checkpoint optimizer t negative": (lambda t, b: train_on(str(b / "good.h5"), "--resume",
                                                              altered(t, b, opt={"t": -5})), 2,
                                        ["altered.h5", "optimizer attribute t=-5"]),
    "checkpoint optimizer t a string": (lambda t, b: ["eval", altered(t, b, opt={"t": "x"})], 2,
                                        ["altered.h5", "optimizer attribute t='x'"]),
    "checkpoint config of a model too large for memory": (
        lambda t, b: ["eval", crafted(t, b, config=huge_config(b))], 2,
        ["model.hidden", "2,000,000,003 parameters", "stored config of", "GiB of memory available", "HINT"]),
    "convert delimiter of two characters": (lambda t, b: ["data", "convert", csv_file(t), str(t / "o.h5"),
                                                          "--delimiter", ",;"], 2,
                                            ["--delimiter ',;' must be one character"]),
    "convert seed negative": (lambda t, b: ["data", "convert", csv_file(t), str(t / "o.h5"), "--seed", "-1"], 2,
                              ["--seed -1 must be 0 or more"]),
    "convert val fraction NaN": (lambda t, b: ["data", "convert", csv_file(t), str(t / "o.h5"), "--val-fraction",
                                               "nan"], 2, ["--val-fraction nan must be in [0, 1)"]),
    "synthetic rows negative": (lambda t, b: ["data", "synthetic", str(t / "s.h5"), "--rows", "-5"], 2,
                                ["--rows -5", "at least 2 rows"]),
    "synthetic beyond memory": (lambda t, b: ["data", "synthetic", str(t / "s.h5"), "--rows", "10000000000"], 2,
                                ["--rows 10000000000", "GiB in memory"]),
    "plot of a garbage metrics file": (lambda t, b: ["plot", garbage_metrics(t), "-o", str(t / "g.png")], 2,
                                       ["metrics.jsonl: no train or eval records"]),
    "predict empty .npy": (lambda t, b: ["predict", str(checkpoint(b)), str(touch(t / "in.npy")), str(t / "p.h5")],
                           2, ["in.npy: not a readable .npy array (EOFError"]),
    "predict CSV with NaN": (lambda t, b: ["predict", str(checkpoint(b)), nan_csv(t), str(t / "p.csv")], 2,
                             ["in.csv: NaN or Inf inputs, first at row 3"]),
    "predict .npy overflowing after normalization": (
        lambda t, b: ["predict", str(checkpoint(b)), npy(t, np.where(np.arange(24).reshape(4, 6) == 13, 1e300, 1.0)),
                      str(t / "p.h5")], 2, ["in.npy: NaN or Inf inputs, first at row 2", "normalization"]),
    "fetch timeout NaN": (lambda t, b: ["data", "fetch", "iris", "--dir", str(t), "--timeout", "nan"], 2,
                          ["--timeout nan", "must be positive finite numbers"]),
    "fetch timeout Inf": (lambda t, b: ["data", "fetch", "iris", "--dir", str(t), "--timeout", "inf"], 2,
                          ["--timeout inf", "must be positive finite numbers"]),
    "fetch malformed IPv6 mirror": (lambda t, b: ["data", "fetch", "iris", "--dir", str(t), "--mirror",
                                                  "http://[::1/datasets"], 2, ["is not a valid URL", "IPv6"]),
    "--set 2,000-deep brackets": (lambda t, b: ["train", "--set", "model.hidden=" + "[" * 2000 + "]" * 2000], 2,
                                  ["--set model.hidden=...", "nested too deeply"]),
    "--set a NUL character": (lambda t, b: ["train", "--set", 'data.path="a\\u0000b"'], 2,
                              ["data.path=", "NUL character"]),
    "--set a 5,000-digit integer": (lambda t, b: ["train", "--set", "train.seed=" + "9" * 5000], 2,
                                    ["--set train.seed=...", "4300 digits"]),
    "config file nested too deeply": (lambda t, b: ["train", deep_toml(t)], 2, ["deep.toml", "nested too deeply"]),
    "train.seed negative": (lambda t, b: train_on(str(b / "good.h5"), "--set", "train.seed=-1"), 2,
                            ["train.seed=-1 must be at least 0"]),
    "class weights beyond the dtype": (lambda t, b: train_on(str(b / "good.h5"), "--set",
                                                             "loss.class_weights=[1e308, 1, 1]"), 2,
                                       ["loss.class_weights holds 1e+308", "float32", "scale them all down"]),
    "virtual dataset mapping part of its rows": (lambda t, b: train_on(virtual_part(t)), 2,
                                                 ["v.h5", "maps no source to row 10 (of 32)", "fill values"]),
    "model too large for memory": (lambda t, b: ["train", "--run-dir", "r", "--set", "model.hidden=[20000000]"], 2,
                                   ["model.hidden", "1,500,000,010 parameters", "GiB of memory available"]),
    "model of 1e9 units": (lambda t, b: ["train", "--run-dir", "r", "--set", "model.hidden=[1000000000]"], 2,
                           ["model.hidden", "75,000,000,010 parameters"]),
    "labels far beyond the class bound": (lambda t, b: ["data", "convert", *npy_pair(t, 10**15), str(t / "o.h5"),
                                                        "--val-fraction", "0"], 2,
                                          ["y.npy", "1,000,000,000,000,001 classes"]),
    "IDX dimensions of petabytes": (lambda t, b: ["data", "convert", *idx_pair(t, b"\0\0\x08\x03" + bytes.fromhex(
        "00000002" "7fffffff" "7fffffff")), str(t / "o.h5")], 2, ["images.idx", "makes rows of", "damaged"]),
}


def altered(t: Path, base: Path, opt=None, delete=None) -> str:
    """The run's checkpoint with optimizer attributes replaced or an array deleted, checksum made to match."""
    path = t / "altered.h5"
    shutil.copy(checkpoint(base), path)
    with h5py.File(path, "r+") as f:
        for k, v in (opt or {}).items():
            f["optimizer"].attrs[k] = v
        if delete:
            del f[delete]
    ck = ckpt.load(path, verify=False)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = ckpt.checksum(ck)
    return str(path)


def huge_config(base: Path) -> str:
    """The run's stored config with model.hidden=[200000000] (6 inputs, 3 classes: 2e9 parameters)."""
    config = ckpt.load(checkpoint(base)).config
    config["model"]["hidden"] = [200_000_000]
    return json.dumps(config)


def csv_file(t: Path) -> str:
    (t / "t.csv").write_text("a,b,label\n" + "".join(f"{i},{i % 5},{i % 2}\n" for i in range(20)))
    return str(t / "t.csv")


def nan_csv(t: Path) -> str:
    rows = [",".join("nan" if (i, j) == (3, 2) else "1" for j in range(6)) for i in range(8)]
    (t / "in.csv").write_text("\n".join(rows) + "\n")
    return str(t / "in.csv")


def garbage_metrics(t: Path) -> str:
    (t / "run").mkdir()
    (t / "run" / "metrics.jsonl").write_text('[1, 2]\n{"step": "a", "loss": 1}\n{"step": 1, "loss": "x"}\n"s"\n')
    return str(t / "run")


def deep_toml(t: Path) -> str:
    (t / "deep.toml").write_text("[model]\nhidden = " + "[" * 3000 + "]" * 3000 + "\n")
    return str(t / "deep.toml")


def virtual_part(t: Path) -> str:
    """A dataset whose splits are virtual datasets mapping only their first 10 of 32 rows."""
    dataset(t, "src.h5")
    with h5py.File(t / "v.h5", "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "classification", "num_classes": 3})
        for split in ("train", "val"):
            for key, shape, dtype in (("x", (32, 6), "f4"), ("y", (32,), "i8")):
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[:10] = h5py.VirtualSource("src.h5", f"{split}/{key}", shape=shape)[:10]
                f.require_group(split).create_virtual_dataset(key, layout, fillvalue=0)
    return str(t / "v.h5")


def npy_pair(t: Path, label: int) -> list[str]:
    np.save(t / "x.npy", np.ones((4, 2), np.float32))
    np.save(t / "y.npy", np.array([0, 1, 2, label]))
    return [str(t / "x.npy"), str(t / "y.npy")]


def touch(path: Path) -> Path:
    path.touch()
    return path


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def distbp(args, cwd, ranks=0, timeout=WALL + 30) -> tuple[subprocess.CompletedProcess, float]:
    cmd = ([MPIRUN, "-n", str(ranks)] if ranks else []) + [sys.executable, "-m", "distbp", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=job_env(**{bounded.TIMEOUT_ENV: "5"}), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case", CORPUS)
def test_corpus(base, tmp_path, case):
    make, code, fragments = CORPUS[case]
    proc, wall = distbp(make(tmp_path, base), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out and wall < WALL, out
    message = proc.stdout if code == 1 else proc.stderr
    assert message.count("INVALID:" if code == 1 else "distbp: error:") == 1, out
    for fragment in fragments:
        assert fragment in message, out
    print(f"\n[{case}] rc={proc.returncode} wall={wall:.1f}s")


@pytest.mark.parametrize("case", ["data output a directory", "output under a file", "metrics.jsonl a directory",
                                  "checkpoint step negative", "predict CSV with NaN",
                                  "predict .npy overflowing after normalization",
                                  "virtual dataset mapping part of its rows", "model too large for memory",
                                  "checkpoint config of a model too large for memory"])
def test_corpus_under_mpirun_prints_once(base, tmp_path, case):
    make, code, fragments = CORPUS[case]
    proc, wall = distbp(make(tmp_path, base), tmp_path, ranks=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code and "Traceback" not in out and "failed" not in out, out
    assert proc.stderr.count("distbp: error:") == 1 and all(f in proc.stderr for f in fragments), out
    print(f"\n[mpirun -n 2, {case}] rc={proc.returncode} wall={wall:.1f}s")


@pytest.mark.parametrize("command", [["ckpt", "inspect", "CKPT"], ["data", "inspect", "DATA"],
                                     ["train", "--run-dir", "r", "--set", "train.max_steps=30"]])
@pytest.mark.parametrize("ranks", [0, 2])
def test_output_into_head_ends_quietly(base, tmp_path, command, ranks):
    args = [str(checkpoint(base)) if a == "CKPT" else str(base / "good.h5") if a == "DATA" else a for a in command]
    launcher = f"{MPIRUN} -n {ranks} " if ranks else ""
    cmd = f"{launcher}{sys.executable} -m distbp {' '.join(args)} 2> err.log | head -n 1"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=WALL + 30)
    err = (tmp_path / "err.log").read_text()
    assert len(proc.stdout.splitlines()) == 1 and not proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in err and "BrokenPipe" not in err and "failed" not in err, err
    # rank 0 writes past mpirun into the pipe, so mpirun never meets the closed pipe (no SIGPIPE, 141)
    assert proc.returncode == 0, proc.returncode


def test_faults_doc_lists_every_corpus_case():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FAULTS.md").read_text()
    missing = [case for case in CORPUS if f"| {case} |" not in doc]
    assert not missing, f"docs/FAULTS.md lacks rows for {missing}"
