"""No input is ever overwritten: predict, data convert, ckpt export and plot refuse an output that is an
input (same name, symlink, hard link) or exists (unless --force, then replaced atomically)."""
import hashlib
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.files import safeio
from distbp.cli import main
from distbp.datasets.dataset import Dataset
from test_faults import Job


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The inputs of the four commands: a checkpoint (also named .npz), a dataset, x/y .npy, a run dir."""
    d = tmp_path_factory.mktemp("inputs")
    job = Job(0, ["train", "--set", "train.max_steps=2", "--set", "train.log_every=1", "--run-dir", str(d / "run")])
    assert job.rc == 0, job.stderr
    ck = ckpt.list_checkpoints(d / "run" / "checkpoints")[-1]
    (d / "model.npz").write_bytes(ck.read_bytes())  # a checkpoint whose name ckpt export keeps as is
    assert main(["data", "digits", str(d / "digits.h5")]) == 0
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((50, 4)).astype(np.float32))
    np.save(d / "y.npy", np.arange(50) % 3)
    return {"ck": ck, "npz": d / "model.npz", "data": d / "digits.h5", "x": d / "x.npy", "y": d / "y.npy",
            "run": d / "run", "metrics": d / "run" / "metrics.jsonl"}


# command -> (argv for an output path, the inputs, the input used as the output, a check of a written output)
COMMANDS = {
    "predict": (lambda f, out: ["predict", str(f["ck"]), str(f["data"]), str(out)], ("ck", "data"), "data",
                lambda f, out: h5py.File(out, "r").attrs["distbp_format"] == "predictions"),
    "convert": (lambda f, out: ["data", "convert", str(f["x"]), str(f["y"]), str(out)], ("x", "y"), "x",
                lambda f, out: Dataset(out).split("train").n == 45),
    "export": (lambda f, out: ["ckpt", "export", str(f["npz"]), str(out)], ("npz",), "npz",
               lambda f, out: set(ckpt.load(f["npz"]).params) | {"layers", "config"} <= set(np.load(out).files)),
    "plot": (lambda f, out: ["plot", str(f["run"]), "-o", str(out)], ("metrics",), "metrics",
             lambda f, out: out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"),
}


def digests(files: dict, keys) -> dict:
    """SHA-256 of each named input."""
    return {k: hashlib.sha256(files[k].read_bytes()).hexdigest() for k in keys}


@pytest.mark.parametrize("how", ["same name", "symlink", "hard link"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_output_that_is_an_input_is_refused(tmp_path, files, capsys, command, how):
    argv, inputs, victim, _ = COMMANDS[command]
    target = files[victim]
    out = {"same name": target, "symlink": tmp_path / f"link{target.suffix}",
           "hard link": tmp_path / f"hard{target.suffix}"}[how]
    if how == "symlink":
        out.symlink_to(target)
    elif how == "hard link":
        os.link(target, out)
    before = digests(files, inputs)
    assert main(argv(files, out)) == 2
    err = capsys.readouterr().err
    assert f"output {out} is the input" in err and "HINT: choose another output name" in err, err
    assert digests(files, inputs) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_existing_output_needs_force_and_is_then_replaced(tmp_path, files, capsys, command):
    argv, inputs, _, written = COMMANDS[command]
    if command == "plot":
        pytest.importorskip("matplotlib")
    out = tmp_path / {"export": "out.npz", "plot": "out.png"}.get(command, "out.h5")
    out.write_bytes(b"an old file")
    before = digests(files, inputs)
    assert main(argv(files, out)) == 2
    assert f"output {out} exists; HINT: add --force" in capsys.readouterr().err
    assert out.read_bytes() == b"an old file"
    assert main([*argv(files, out), "--force"]) == 0, capsys.readouterr().err
    assert out.read_bytes() != b"an old file" and written(files, out)
    assert digests(files, inputs) == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_a_failed_replacement_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "a.h5"
    out.write_bytes(b"old")
    real = os.write

    def full(fd, data):  # half of the new bytes fit, then the disk is full
        if len(data) > 4:
            return real(fd, data[:4])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        safeio.write_bytes(out, b"the new bytes")
    monkeypatch.undo()
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.h5"]
    safeio.write_bytes(out, b"new")
    assert out.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.h5"]


def test_check_output_compares_files_not_names(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("1,2\n")
    os.link(a, tmp_path / "b.csv")
    (tmp_path / "sub").mkdir()
    assert safeio.same_file(tmp_path / "sub" / ".." / "a.csv", a) and safeio.same_file(tmp_path / "b.csv", a)
    assert not safeio.same_file(tmp_path / "missing.csv", a)
    assert safeio.check_output(tmp_path / "new.h5", [a], force=False) == Path(tmp_path / "new.h5")
    with pytest.raises(safeio.OutputError, match="is a directory"):
        safeio.check_output(tmp_path / "sub", [a], force=True)
    with pytest.raises(safeio.OutputError, match="the same file, through a link"):
        safeio.check_output(tmp_path / "b.csv", [a], force=True)


@pytest.mark.parametrize("node", ["fifo", "device", "link to a device"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_force_never_replaces_a_fifo_or_a_device(tmp_path, files, capsys, command, node):
    argv, _, _, _ = COMMANDS[command]
    out = tmp_path / {"export": "out.npz", "plot": "out.png"}.get(command, "out.h5")
    if node == "fifo":
        os.mkfifo(out)
    elif node == "device" and os.geteuid() == 0:
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second null device, as root
    else:
        out.symlink_to(os.devnull)
    before = os.stat(out)
    assert main([*argv(files, out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"output {out} exists and is not a regular file" in err and "HINT" in err, err
    after = os.stat(out)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert os.stat(os.devnull).st_mode & stat.S_IFCHR
