"""Damaged checkpoints: single-bit flips of a real checkpoint never hang or crash a reader.

Every flipped variant either loads data identical to the original or is rejected with a
CheckpointError, within a time bound; `--resume auto` then resumes from the previous
checkpoint and `ckpt verify` prints INVALID. The flips cover the superblock, object
headers, B-trees and local heaps, dataset bytes, and the global heaps that hold the
variable-length attribute strings, where some flips make HDF5 loop forever.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbp.files import bounded
from distbp.files import checkpoint as ckpt
from conftest import job_env

BOUND = 30  # seconds any command or read may take on a damaged file
TEST_TIMEOUT = "2"  # DISTBP_READ_TIMEOUT in-process: a looping read costs 2 s, not the default 10


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with checkpoints at steps 1, 2 and 3 of a short training run."""
    run = tmp_path_factory.mktemp("flip") / "run"
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--run-dir", str(run), "--set",
                           "train.max_steps=3", "--set", "checkpoint.every_steps=1"],
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return run


# Flips in a global heap's collection size (bytes 8-15) and first object's size (24-31) that made
# HDF5 2.0 loop forever in checkpoints of this run (found by flipping every bit of the heaps): with
# the checksum in its own heap, +9 bits 0-3 and +25 bit 3 of the first, +24 bits 3-7 and +25 bits
# 0-3 of the second; with one heap (checkpoints written in memory), +25 bit 3. Which bits loop
# depends on the heap's sizes, so a few candidates per heap, LOOPING first.
LOOPING = (25, 3)
LOOP_CANDIDATES = (LOOPING, (9, 0), (24, 3), (25, 0))


def looping_flips(raw: bytes) -> list[tuple[int, int]]:
    """(byte, bit) flips of the sizes in every global heap collection ("GCOL") of the file."""
    flips, g = [], raw.find(b"GCOL")
    while g != -1:
        flips += [(g + offset, bit) for offset, bit in LOOP_CANDIDATES]
        g = raw.find(b"GCOL", g + 1)
    return flips


def signatures(raw: bytes) -> list[int]:
    """Offsets of the last byte of every B-tree, symbol table, local and global heap signature."""
    found = []
    for sig in (b"TREE", b"SNOD", b"HEAP", b"GCOL"):
        i = raw.find(sig)
        while i != -1:
            found.append(i + 3)
            i = raw.find(sig, i + 1)
    return sorted(found)


def sample_flips(raw: bytes, path: Path, count: int = 8) -> list[tuple[int, int]]:
    """Flips in the superblock, every metadata signature, the first byte of every dataset, and spread over the file."""
    with h5py.File(path, "r") as f:
        starts = []
        f.visititems(lambda _, o: starts.append(o.id.get_offset()) if isinstance(o, h5py.Dataset) else None)
    spread = np.linspace(0, len(raw) - 1, count).astype(int)
    return [(int(i), int(i) % 8) for i in [*range(0, 96, 24), *signatures(raw), *spread, *sorted(starts)[:4]]]


def flipped(raw: bytes, byte: int, bit: int) -> bytes:
    b = bytearray(raw)
    b[byte] ^= 1 << bit
    return bytes(b)


def same(a: ckpt.Checkpoint, b: ckpt.Checkpoint) -> bool:
    """Identical arrays, scalars and attributes."""
    def flat(ck):
        return {**{f"p/{k}": v for k, v in ck.params.items()}, **{f"b/{k}": v for k, v in ck.buffers.items()},
                **{f"o/{s}/{k}": v for s, d in ck.opt_arrays.items() for k, v in d.items()}}
    fa, fb = flat(a), flat(b)
    return (fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa) and a.attrs == b.attrs
            and a.opt_scalars == b.opt_scalars and a.opt_name == b.opt_name)


def test_the_looping_flips_are_found(run):
    raw = (run / "checkpoints" / ckpt.checkpoint_name(3)).read_bytes()
    assert len(looping_flips(raw)) >= len(LOOP_CANDIDATES)  # the config, rng and checksum strings


def test_every_flipped_checkpoint_loads_identical_or_resumes_from_the_previous(run, tmp_path, monkeypatch):
    monkeypatch.setenv(bounded.TIMEOUT_ENV, TEST_TIMEOUT)
    newest = run / "checkpoints" / ckpt.checkpoint_name(3)
    raw, original, previous = newest.read_bytes(), ckpt.load(newest), ckpt.load(run / "checkpoints" /
                                                                                 ckpt.checkpoint_name(2))
    flips = looping_flips(raw) + sample_flips(raw, newest)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(run / "checkpoints" / ckpt.checkpoint_name(2), tmp_path / "checkpoints")
    target = tmp_path / "checkpoints" / newest.name
    outcomes = {"identical": 0, "rejected": 0, "looped": 0}
    for byte, bit in flips:
        target.write_bytes(flipped(raw, byte, bit))
        log = []
        start = time.monotonic()
        found = ckpt.latest_valid(tmp_path / "checkpoints", log.append)
        wall = time.monotonic() - start
        assert wall < BOUND, (byte, bit, wall)
        if same(found, original):
            outcomes["identical"] += 1
            assert not log
        else:
            assert same(found, previous), (byte, bit, log)
            assert len(log) == 1 and log[0].startswith("skipping damaged checkpoint: checkpoint ")
            assert str(target) in log[0], log
            outcomes["looped" if "did not finish" in log[0] else "rejected"] += 1
    print(f"\n{len(flips)} flips: {outcomes}")
    assert outcomes["looped"] >= 1 and outcomes["rejected"] > outcomes["looped"]


def h5py_error_flip(raw: bytes, path: Path, tmp_path: Path) -> tuple[int, int]:
    """The first sampled flip that makes h5py raise something other than OSError or KeyError."""
    for byte, bit in sample_flips(raw, path):
        (tmp_path / "probe.h5").write_bytes(flipped(raw, byte, bit))
        try:
            ckpt.load(tmp_path / "probe.h5")
        except ckpt.CheckpointError as e:
            if any(f"({kind}:" in str(e) for kind in ("RuntimeError", "AttributeError", "RecursionError")):
                return byte, bit
    raise AssertionError("no sampled flip raised RuntimeError, AttributeError or RecursionError")


def test_cli_on_flipped_checkpoints_says_invalid_and_resumes_from_the_previous(run, tmp_path):
    """ckpt verify, eval and train --resume auto, all at once (DISTBP_READ_TIMEOUT=5 s)."""
    newest = run / "checkpoints" / ckpt.checkpoint_name(3)
    raw = newest.read_bytes()
    loop = looping_flips(raw)[0]
    jobs = {}
    for name, (byte, bit) in [("loop", loop), ("h5py", h5py_error_flip(raw, newest, tmp_path))]:
        path = tmp_path / f"{name}.h5"
        path.write_bytes(flipped(raw, byte, bit))
        jobs[f"verify {name}"] = ["ckpt", "verify", str(path)]
    resume = tmp_path / "resume"
    shutil.copytree(run, resume)
    (resume / "checkpoints" / newest.name).write_bytes(flipped(raw, *loop))
    jobs["resume"] = ["train", "--run-dir", str(resume), "--set", "train.max_steps=4", "--set",
                      "checkpoint.every_steps=1"]
    jobs["eval"] = ["eval", str(tmp_path / "loop.h5")]
    start = time.monotonic()
    env = job_env(**{bounded.TIMEOUT_ENV: "5"})
    procs = {k: subprocess.Popen([sys.executable, "-m", "distbp", *a], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, a in jobs.items()}
    out = {k: (p.communicate(timeout=BOUND + 30), p.returncode, time.monotonic() - start) for k, p in procs.items()}
    for name in ("loop", "h5py"):
        (stdout, stderr), code, wall = out[f"verify {name}"]
        assert code == 1 and stdout.startswith("INVALID: checkpoint ") and f"{name}.h5" in stdout, stdout + stderr
        assert "Traceback" not in stderr and wall < BOUND
    (stdout, stderr), code, wall = out["resume"]
    assert code == 0 and wall < BOUND + 10, stderr
    assert "skipping damaged checkpoint" in stdout and "did not finish" in stdout, stdout
    assert f"resumed from {resume / 'checkpoints' / ckpt.checkpoint_name(2)} at step 2" in stdout, stdout
    (stdout, stderr), code, wall = out["eval"]
    assert code == 2 and stderr.count("distbp: error: checkpoint") == 1 and "did not finish" in stderr, stderr
    print(f"\n{ {k: f'rc={v[1]} {v[2]:.1f}s' for k, v in out.items()} }")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3))
def test_random_bit_flips_load_identical_or_are_rejected(run, monkeypatch, tmp_path, flips):
    monkeypatch.setenv(bounded.TIMEOUT_ENV, TEST_TIMEOUT)
    newest = run / "checkpoints" / ckpt.checkpoint_name(3)
    raw = newest.read_bytes()
    for where, bit in flips:
        raw = flipped(raw, int(where * len(raw)), bit)
    path = tmp_path / "f.h5"
    path.write_bytes(raw)
    try:
        assert same(ckpt.load(path), ckpt.load(newest))
    except ckpt.CheckpointError as e:
        assert f"checkpoint {path}" in str(e)


# Crafted checkpoints: attributes and arrays a hostile or buggy writer could put in a valid HDF5 file.

POSITION = {"step": 3, "epoch": 0, "step_in_epoch": 3, "samples_seen": 192, "world_size": 1}
ATTR = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
                 st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
                 st.sampled_from(["{}", "[1]", '{"train": 3}', '{"train": {"epochs": 2}}', "not json", "3"]))
ARRAYS = st.dictionaries(st.sampled_from(["params/a", "params/b", "optimizer/m/a", "buffers/r", "params/g/c",
                                          "other"]),
                         st.tuples(st.sampled_from(["f4", "f8", "i8", "u1", "S2", "b1"]),
                                   st.lists(st.integers(0, 3), max_size=3)), max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attrs=st.dictionaries(st.sampled_from([*POSITION, "config", "checksum", "version", "distbp_format"]),
                             ATTR, max_size=4),
       drop=st.sets(st.sampled_from(list(POSITION)), max_size=2), arrays=ARRAYS, seal=st.booleans())
def test_crafted_checkpoints_load_or_give_a_checkpoint_error(tmp_path, monkeypatch, attrs, drop, arrays, seal):
    monkeypatch.setenv(bounded.TIMEOUT_ENV, TEST_TIMEOUT)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"distbp_format": "checkpoint", "version": 1, "config": "{}", "checksum": "crc32:0",
                        **{k: v for k, v in POSITION.items() if k not in drop}})
        for k, v in attrs.items():
            if v is None:
                f.attrs.pop(k, None)
            else:
                f.attrs[k] = v
        for key, (dtype, shape) in arrays.items():
            f.create_dataset(key, data=np.ones(shape).astype(dtype))
    if seal:  # a correct checksum, so that the attribute checks behind it are reached
        try:
            ck = ckpt.load(path, verify=False)
            with h5py.File(path, "r+") as f:
                f.attrs["checksum"] = ckpt.checksum(ck)
        except ckpt.CheckpointError:
            pass
    try:
        ck = ckpt.load(path)
    except ckpt.CheckpointError as e:
        assert str(path) in str(e)
        return
    assert all(isinstance(ck.attrs[k], int) and ck.attrs[k] >= 0 for k in POSITION)
    assert isinstance(ck.config, dict) and json.dumps(ck.config)


def test_flipped_dataset_heaps_open_or_give_a_data_error_in_bounded_time(tmp_path, monkeypatch):
    """The same heap flips in a dataset file (its task, source and class-name strings live in a global heap)."""
    from distbp.datasets.dataset import DataError, Dataset, write_dataset
    monkeypatch.setenv(bounded.TIMEOUT_ENV, TEST_TIMEOUT)
    rng = np.random.default_rng(0)
    good = write_dataset(tmp_path / "good.h5", {s: (rng.standard_normal((40, 4)).astype(np.float32),
                                                    np.arange(40) % 3) for s in ("train", "val")},
                         num_classes=3, attrs={"source": "a test", "class_names": '["a", "b", "c"]'})
    raw = good.read_bytes()
    outcomes = {"opened": 0, "rejected": 0, "looped": 0}
    for byte, bit in looping_flips(raw) + [(i, 0) for i in signatures(raw)]:
        path = tmp_path / "f.h5"
        path.write_bytes(flipped(raw, byte, bit))
        start = time.monotonic()
        try:
            with Dataset(path) as ds:
                ds.split("train").read([0, 39])
                ds.describe(values=True)
            outcomes["opened"] += 1
        except DataError as e:
            assert str(e).startswith(f"dataset {path}"), e
            outcomes["looped" if "did not finish" in str(e) else "rejected"] += 1
        assert time.monotonic() - start < BOUND
    print(f"\ndataset flips: {outcomes}")
    assert outcomes["rejected"] > 0
