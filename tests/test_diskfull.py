"""A real full disk: a small tmpfs, filled while distbp runs on it (needs root to mount).

As a non-root user the tests are skipped with the reason; DISTBP_REQUIRE_ROOT=1 (as in CI, which
runs as root) turns the skip into a failure."""
import contextlib
import os
import re
import subprocess

import numpy as np
import pytest

from distbp.files import checkpoint as ckpt
from distbp.parallel import faults
from test_faults import Job, assert_intact

# a 2.4 MB checkpoint every 2 steps; rank 0 fills the disk at step 25, then logs 75 more steps, so the
# small files (train.log, metrics.jsonl) run out of their last free bytes as well
ARGS = ["--set", "model.hidden=[512, 512]", "--set", "train.max_steps=100", "--set", "checkpoint.every_steps=20",
        "--set", "checkpoint.keep=10", "--set", "train.log_every=1"]


def unavailable(reason: str):
    """Skip with the reason, or fail when DISTBP_REQUIRE_ROOT=1 says these tests must run."""
    if os.environ.get("DISTBP_REQUIRE_ROOT") == "1":
        pytest.fail(f"DISTBP_REQUIRE_ROOT=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs mounted at tmp_path/disk for the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("ranks", [0, 2])  # 0: a plain serial process, no launcher
def test_full_disk_warns_then_fails_the_final_save_with_one_message(small_disk, ranks):
    run = small_disk / "run"
    job = Job(ranks, ["train", *ARGS, "--run-dir", str(run)], "rank=0,step=25,kind=fill", cwd=small_disk)
    assert job.rc == 2, job.stderr  # not 1 (a traceback) nor 139 (a segfault)
    assert "Traceback" not in job.stderr + job.stdout
    warnings = re.findall(r"WARNING: a checkpoint could not be written \(\[Errno 28\] No space left on device\); "
                          r"the previous checkpoint \(step-00000020.h5\) is intact, training continues", job.stdout)
    assert len(warnings) == 3, job.stdout  # the saves at steps 40, 60 and 80
    errors = [line for line in job.stderr.splitlines() if line.startswith("distbp: error:")]
    assert len(errors) == 1, job.stderr
    assert re.search(r"checkpoint \S+step-00000100.h5 could not be written \(\[Errno 28\] No space left on "
                     r"device\); the previous checkpoint \(step-00000020.h5\) is intact", errors[0]), errors[0]
    for name in ("metrics.jsonl", "train.log"):  # logging went on without them, warning once each
        assert job.stderr.count(f"WARNING: cannot append to {run / name}") == 1, job.stderr
    assert job.stdout.count("eval step 100") == 1  # training continued to the end
    assert_intact(run / "checkpoints", 20)


@pytest.mark.parametrize("command", ["ckpt export", "predict"])
def test_output_on_a_full_disk_keeps_the_old_file(small_disk, tmp_path, command):
    run = tmp_path / "run"
    assert Job(0, ["train", *ARGS[:2], "--set", "train.max_steps=2", "--run-dir", str(run)]).rc == 0
    big = ckpt.list_checkpoints(run / "checkpoints")[-1]  # 2.4 MB: its export does not fit
    data = tmp_path / "rows.npy"
    np.save(data, np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32))  # 0.9 MB out
    old = small_disk / ("params.npz" if command == "ckpt export" else "preds.h5")
    old.write_bytes(b"the old output")
    fd = os.open(small_disk / faults.FILL_NAME, os.O_WRONLY | os.O_CREAT)  # fill what is left of the disk
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, bytes(4096))
    os.close(fd)
    args = ["ckpt", "export", str(big), str(old)] if command == "ckpt export" else ["predict", str(big), str(data),
                                                                                    str(old)]
    job = Job(0, [*args, "--force"])
    assert job.rc == 2, job.stderr  # not 139: HDF5 never writes to the full disk itself
    errors = [line for line in job.stderr.splitlines() if line.startswith("distbp: error:")]
    assert errors == [f"distbp: error: cannot write {old} (No space left on device); the old file, if any, is "
                      "intact; HINT: free space on its file system (or raise the quota), or write it elsewhere"]
    assert old.read_bytes() == b"the old output"
    assert sorted(p.name for p in small_disk.iterdir()) == sorted([faults.FILL_NAME, old.name])


def test_convert_checks_the_room_before_it_writes(small_disk, tmp_path):
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, np.zeros((100_000, 32), np.float32))  # 12.8 MB of float32 rows: more than the 12 MiB disk
    np.save(y, np.arange(100_000) % 3)
    old = small_disk / "data.h5"
    old.write_bytes(b"the old dataset")
    job = Job(0, ["data", "convert", str(x), str(y), str(old), "--force"])
    assert job.rc == 2, job.stderr
    assert re.search(rf"distbp: error: output {re.escape(str(old))} needs about 14\.\d MB but its file system has "
                     r"12\.\d MB free; HINT: free space", job.stderr), job.stderr
    assert old.read_bytes() == b"the old dataset" and [p.name for p in small_disk.iterdir()] == [old.name]


def fill(disk):
    """Fill what is left of the file system at disk with a file of zeros."""
    fd = os.open(disk / faults.FILL_NAME, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        for size in (1 << 16, 512):
            while True:
                os.write(fd, bytes(size))
    os.close(fd)


@pytest.mark.parametrize("state", ["full", "read-only"])
@pytest.mark.parametrize("command", [["data", "digits"], ["data", "synthetic", "--rows", "20000"]])
def test_data_outputs_on_a_full_or_read_only_disk_name_the_output(small_disk, command, state):
    out = small_disk / "d.h5"
    if state == "full":
        fill(small_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = sorted(p.name for p in small_disk.iterdir())
    job = Job(0, [*command[:2], str(out), *command[2:]])
    assert job.rc == 2 and "Traceback" not in job.stderr, job.stderr
    why, hint = (("No space left on device", "free space on its file system") if state == "full"
                 else ("Read-only file system", "its folder is not writable"))
    errors = [line for line in job.stderr.splitlines() if line.startswith("distbp: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"distbp: error: cannot write {out} ({why})"), job.stderr
    assert hint in errors[0] and ".tmp-" not in job.stderr, errors[0]
    assert sorted(p.name for p in small_disk.iterdir()) == before  # no temp file left
