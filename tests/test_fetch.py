"""distbp data fetch against a loopback HTTP server serving generated files in the real formats:
good files, checksum mismatch, truncated and resumed transfers, a stalled server, hostile archives."""
import gzip
import hashlib
import io
import re
import struct
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from distbp.datasets import fetch as fe
from distbp.cli import main
from distbp.datasets.dataset import Dataset
from conftest import MPIRUN, job_env


def idx_gz(a: np.ndarray) -> bytes:
    """a as a gzipped IDX file (uint8)."""
    raw = struct.pack(">I", 0x0800 + a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    return gzip.compress(raw, mtime=0)


def digit_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images whose class (0..9) is a bright 7x7 block at one of ten places, and the labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 5)
        x[i, 3 + 12 * r:10 + 12 * r, 1 + 5 * c:6 + 5 * c] = 250
    return x, y


def mnist_files(n=400, n_test=100) -> dict:
    """{file name: bytes} of the four MNIST files, generated."""
    x, y = digit_images(n, 0)
    xt, yt = digit_images(n_test, 1)
    return {"train-images-idx3-ubyte.gz": idx_gz(x), "train-labels-idx1-ubyte.gz": idx_gz(y),
            "t10k-images-idx3-ubyte.gz": idx_gz(xt), "t10k-labels-idx1-ubyte.gz": idx_gz(yt)}


def tar_gz(members: list) -> bytes:
    """A .tar.gz of (TarInfo, bytes or None) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def cifar_batch(n: int, seed: int) -> bytes:
    """n CIFAR-10 binary records: a label byte, then 3072 pixel bytes."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, fe.CIFAR_RECORD), dtype=np.uint8)
    rec[:, 0] = np.arange(n) % 10
    return rec.tobytes()


def cifar_members(n=20) -> list:
    """The members of cifar-10-binary.tar.gz, with n records per batch."""
    files = {f"data_batch_{i}.bin": cifar_batch(n, i) for i in range(1, 6)}
    files["test_batch.bin"] = cifar_batch(n, 9)
    files["batches.meta.txt"] = "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                          "horse", "ship", "truck"]).encode() + b"\n\n"
    return [(tarfile.TarInfo(f"{fe.CIFAR_DIR}/{name}"), data) for name, data in files.items()]


def iris_file() -> bytes:
    """150 rows like UCI's iris.data: four measurements and the species, then a blank line."""
    rng = np.random.default_rng(0)
    species = ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]
    rows = [",".join([*(f"{v:.1f}" for v in rng.uniform(0.1, 8, 4) + k), species[k]])
            for k in range(3) for _ in range(50)]
    return ("\n".join(rows) + "\n\n").encode()


FILES = {"mnist": mnist_files(), "cifar10": {"cifar-10-binary.tar.gz": tar_gz(cifar_members())},
         "iris": {"iris.data": iris_file()}}


def catalog_for(files: dict, **recipe_changes) -> dict:
    """The real catalog with each generated file's size and SHA-256 in place of the pinned ones."""
    out = {}
    for name, contents in files.items():
        recipe = fe.CATALOG[name]
        remotes = tuple(replace(r, size=len(contents[r.name]), sha256=hashlib.sha256(contents[r.name]).hexdigest())
                        for r in recipe.files)
        out[name] = replace(recipe, files=remotes, **recipe_changes)
    return out


class Server:
    """A loopback HTTP server of {path: bytes} with Range support; modes per path: ok, cut (send at most
    `cut` bytes of a response, then close), cut_once (cut the first response only), stall (send `cut` bytes,
    then nothing until released), trickle (one byte every 0.5 s)."""

    def __init__(self):
        self.files, self.modes, self.requests, self.cut = {}, {}, [], 1000
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(m[1]) if m else 0
                if start >= len(body) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                mode = server.modes.get(path, "ok")
                if mode == "cut_once":
                    server.modes[path] = "ok"
                if mode == "ok":
                    self.wfile.write(body[start:])
                    return
                if mode == "trickle":  # one byte every 0.5 s: never silent for a whole --timeout
                    for k in range(start, len(body)):
                        if server.release.wait(0.5):
                            return
                        self.wfile.write(body[k:k + 1])
                        self.wfile.flush()
                    return
                self.wfile.write(body[start:start + server.cut])
                self.wfile.flush()
                if mode == "stall":
                    server.release.wait(30)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def serve(self, name: str, files: dict, mode: str = "ok"):
        """Serve files under name/ as a mirror lays them out."""
        for file, data in files.items():
            self.files[f"{name}/{file}"] = data
            self.modes[f"{name}/{file}"] = mode

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(fe, "BACKOFF_S", 0.01)
    s = Server()
    yield s
    s.close()


def leftovers(folder) -> list:
    """Every file under folder, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["mnist", "cifar10", "iris"])
def test_good_files_make_a_dataset_and_a_second_fetch_reuses_them(tmp_path, server, name):
    server.serve(name, FILES[name])
    out = fe.fetch(name, tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert out == tmp_path / f"{name}.h5"
    assert leftovers(tmp_path) == sorted([f"{name}.h5", *(f"{name}/{f}" for f in FILES[name])])
    with Dataset(out) as ds:
        shapes = {s: ds.split(s).n for s in ds.splits}
        attrs, x_dtype = ds.attrs, ds._arrays["train"][0].dtype
        assert ds.task.name == "classification" and "url" in attrs and "stratified" in attrs["split"]
        if name == "mnist":
            assert shapes == {"train": 360, "val": 40, "test": 100} and ds.input_shape == (1, 28, 28)
            assert x_dtype == np.uint8 and ds.x_scale == pytest.approx(1 / 255)
            assert np.bincount(ds.split("val").read(np.arange(40))[1]).tolist() == [4] * 10
        elif name == "cifar10":
            assert shapes == {"train": 90, "val": 10, "test": 20} and ds.input_shape == (3, 32, 32)
            assert x_dtype == np.uint8 and '"truck"' in attrs["class_names"]
            x, y = ds.split("test").read(np.arange(20), np.float64)
            rec = np.frombuffer(cifar_batch(20, 9), np.uint8).reshape(20, -1)
            assert np.array_equal(y, rec[:, 0]) and np.allclose(x.reshape(20, -1) * 255, rec[:, 1:])
        else:
            assert shapes == {"train": 120, "val": 30} and ds.num_classes == 3 and ds.input_shape == (4,)
    requests = len(server.requests)
    (tmp_path / f"{name}.h5").unlink()
    fe.fetch(name, tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert len(server.requests) == requests  # verified raw files are not downloaded again


def test_from_a_folder_of_files_copied_by_hand(tmp_path):
    copied = tmp_path / "copied"
    copied.mkdir()
    for file, data in FILES["iris"].items():
        (copied / file).write_bytes(data)
    out = fe.fetch("iris", tmp_path / "data", source=copied, catalog=catalog_for(FILES))
    assert Dataset(out).split("train").n == 120
    (copied / "iris.data").write_bytes(FILES["iris"]["iris.data"].replace(b"5", b"6", 1))
    with pytest.raises(fe.FetchError, match=r"iris.data from .*copied/iris.data: checksum mismatch"):
        fe.fetch("iris", tmp_path / "other", source=copied, catalog=catalog_for(FILES))
    assert leftovers(tmp_path / "other") == []
    with pytest.raises(fe.FetchError, match=r"--from .*copied: no file train-images-idx3-ubyte.gz there; HINT: "
                                            r"download https://storage.googleapis.com/cvdf-datasets/mnist/"):
        fe.fetch("mnist", tmp_path / "other", source=copied, catalog=catalog_for(FILES))
    with pytest.raises(fe.FetchError, match=r"--from .*nowhere: no such folder"):
        fe.fetch("iris", tmp_path / "other", source=tmp_path / "nowhere", catalog=catalog_for(FILES))


def test_checksum_mismatch_deletes_the_download(tmp_path, server):
    damaged = dict(FILES["mnist"])
    raw = bytearray(damaged["t10k-labels-idx1-ubyte.gz"])
    raw[-12] ^= 0xFF  # same size, other bytes
    damaged["t10k-labels-idx1-ubyte.gz"] = bytes(raw)
    server.serve("mnist", damaged)
    with pytest.raises(fe.FetchError, match=r"t10k-labels-idx1-ubyte.gz from http://127.*: checksum mismatch "
                                            r"\(got \d+ bytes, SHA-256 [0-9a-f]{64}; expected .*the file is deleted"):
        fe.fetch("mnist", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert "mnist.h5" not in leftovers(tmp_path) and not [p for p in leftovers(tmp_path) if "t10k-labels" in p]


def test_truncated_transfer_keeps_the_part_and_the_next_run_resumes_it(tmp_path, server):
    files = FILES["iris"]
    server.serve("iris", files, mode="cut")
    server.cut = 1000
    with pytest.raises(fe.FetchError, match=r"iris.data: the connection closed before the end of the file at "
                                            r"http://127.*after 2 attempt\(s\), 2000 of 4\d\d\d bytes received; the "
                                            r"2000 bytes received are kept in .*iris.data.part: run the same command"):
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5, retries=2)
    assert leftovers(tmp_path) == ["iris/iris.data.part"]
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]
    server.modes["iris/iris.data"] = "ok"
    out = fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert server.requests[-1] == ("iris/iris.data", "bytes=2000-") and (tmp_path / "iris" / "iris.data").read_bytes() \
        == files["iris.data"]
    assert leftovers(tmp_path) == ["iris.h5", "iris/iris.data"] and Dataset(out).num_classes == 3


def test_a_cut_connection_is_resumed_with_a_range_request(tmp_path, server):
    server.serve("mnist", FILES["mnist"], mode="cut_once")
    server.cut = 5000
    out = fe.fetch("mnist", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    images = [r for p, r in server.requests if p == "mnist/train-images-idx3-ubyte.gz"]
    assert images == [None, "bytes=5000-"]
    got = (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    assert got == FILES["mnist"]["train-images-idx3-ubyte.gz"]
    assert Dataset(out).split("train").n == 360


@pytest.mark.timing  # the bound is wall-clock time: scripts/test.sh retries these
def test_a_stalled_server_ends_within_the_timeout_bound(tmp_path, server):
    server.serve("iris", FILES["iris"], mode="stall")
    start = time.monotonic()
    with pytest.raises(fe.FetchError, match=r"iris.data: no data for 0.5 s \(the server stalled\) at http://127.*"
                                            r"after 2 attempt\(s\), 2000 of \d+ bytes received; the 2000 bytes "
                                            r"received are kept in .*HINT: .*--timeout"):
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=0.5, retries=2)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 10, elapsed  # two attempts of 0.5 s each, not the server's 30 s
    assert leftovers(tmp_path) == ["iris/iris.data.part"]  # the second attempt resumed after the first's bytes
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]


def test_missing_files_and_bad_mirrors(tmp_path, server):
    with pytest.raises(fe.FetchError, match=r"iris.data: HTTP 404 Not Found at http://127.*iris/iris.data after 1 "
                                            r".*HINT: the file is not at that address: a --mirror URL"):
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    server.serve("iris", {"iris.data": FILES["iris"]["iris.data"][:3000]})  # a mirror's copy that is too short
    with pytest.raises(fe.FetchError, match=r"iris.data: http://127.*iris/iris.data serves 3000 bytes, the published "
                                            r"file has 4552: it is not the published file \(the download is deleted\)"):
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert len(server.requests) == 2  # one request: no resume of another file
    (tmp_path / "iris").mkdir(exist_ok=True)
    with open(tmp_path / "iris" / "iris.data.part", "wb") as f:  # a part of the right file, then a short copy
        f.write(FILES["iris"]["iris.data"][:1000])
    with pytest.raises(fe.FetchError, match=r"serves 3000 bytes, the published file has 4552"):
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=5)
    assert server.requests[-1] == ("iris/iris.data", "bytes=1000-") and not (tmp_path / "iris" / "iris.data.part").exists()
    with pytest.raises(fe.FetchError, match=r"the host name does not resolve .* after 1 attempt\(s\)"):
        fe.fetch("iris", tmp_path, mirror="http://no-such-host.invalid", catalog=catalog_for(FILES), retries=3)
    for leftover in sorted(tmp_path.rglob("*"), reverse=True):
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    with pytest.raises(fe.FetchError, match=r"--mirror 'ftp://x' is not an http"):
        fe.fetch("iris", tmp_path, mirror="ftp://x", catalog=catalog_for(FILES))
    with pytest.raises(fe.FetchError, match=r"cannot connect.*at http://127.0.0.1:9/iris/iris.data after 2 "):
        fe.fetch("iris", tmp_path, mirror="http://127.0.0.1:9", catalog=catalog_for(FILES), retries=2)
    assert list(tmp_path.iterdir()) == []


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


@pytest.mark.parametrize("member,match", [
    ((tarfile.TarInfo("../evil.bin"), b"x"), r"member '../evil.bin' would be written outside the target folder"),
    ((tarfile.TarInfo(f"{fe.CIFAR_DIR}/../../evil.bin"), b"x"), r"would be written outside the target folder"),
    ((tarfile.TarInfo("/tmp/distbp-evil.bin"), b"x"), r"member '/tmp/distbp-evil.bin' would be written outside"),
    ((symlink(f"{fe.CIFAR_DIR}/link", "/etc/passwd"), None), r"member '.*link' is a symbolic link"),
    ((hardlink(f"{fe.CIFAR_DIR}/hard", "/etc/passwd"), None), r"member '.*hard' is a hard link"),
    ((tarfile.TarInfo(f"{fe.CIFAR_DIR}/zeros.bin"), bytes(3 << 20)), r"members of \d+ bytes in all, more than the"),
])
def test_hostile_archives_are_refused_before_anything_is_unpacked(tmp_path, server, member, match):
    archive = {"cifar-10-binary.tar.gz": tar_gz([*cifar_members(), member])}
    server.serve("cifar10", archive)
    data = tmp_path / "data"
    with pytest.raises(fe.FetchError, match=match + ".*nothing was unpacked and the archive is deleted"):
        fe.fetch("cifar10", data, mirror=server.url, catalog=catalog_for({"cifar10": archive}, max_unpacked=2 << 20))
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*evil*"))


def flipped(data: bytes) -> bytes:
    """data with one byte changed near the end."""
    raw = bytearray(data)
    raw[-12] ^= 0xFF
    return bytes(raw)


HOSTILE = {"cifar-10-binary.tar.gz": tar_gz([*cifar_members(), (symlink("cifar-10-batches-bin/x", "/"), None)])}
CLI_FAILURES = {  # name, served files, server mode, what the one message says
    "stall": ("iris", FILES["iris"], "stall", "the server stalled"),
    "truncated": ("iris", FILES["iris"], "cut", "the connection closed before the end of the file"),
    "checksum": ("iris", {"iris.data": flipped(FILES["iris"]["iris.data"])}, "ok", "checksum mismatch"),
    "missing": ("iris", {}, "ok", "HTTP 404"),
    "hostile archive": ("cifar10", HOSTILE, "ok", "is a symbolic link; nothing was unpacked"),
}


@pytest.mark.parametrize("case", sorted(CLI_FAILURES))
def test_cli_failure_is_one_message_and_exit_2(tmp_path, server, monkeypatch, capsys, case):
    name, files, mode, says = CLI_FAILURES[case]
    server.serve(name, files, mode)
    pins = tmp_path / "pins.txt"
    good = FILES[name] if name != "cifar10" else HOSTILE
    pins.write_text("".join(f"{r.name} {r.size} {r.sha256}\n" for r in catalog_for({name: good})[name].files))
    monkeypatch.setenv(fe.CHECKSUMS_ENV, str(pins))
    monkeypatch.setenv(fe.MIRROR_ENV, server.url)  # the environment variable instead of --mirror
    argv = ["data", "fetch", name, "--dir", str(tmp_path / "d"), "--timeout", "0.3", "--retries", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(re.findall(r"distbp: error: ", err)) == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "d" / f"{name}.h5").exists() and not list((tmp_path / "d").rglob(".*tmp*"))
    if case in ("stall", "truncated"):  # fixed server: the same command resumes and finishes
        server.serve(name, FILES[name])
        assert main(argv) == 0
        assert f"wrote {tmp_path / 'd' / 'iris.h5'}" in capsys.readouterr().out
        assert server.requests[-1][1] == "bytes=2000-"


def test_pinned_checksums_guard_the_production_path(tmp_path, server):
    server.serve("iris", {"iris.data": iris_file()[:4551]})  # the published size, other bytes
    with pytest.raises(fe.FetchError, match=r"checksum mismatch .*expected 4551 bytes, SHA-256 6f608b71"):
        fe.fetch("iris", tmp_path, mirror=server.url, timeout=5)
    assert leftovers(tmp_path) == []
    server.serve("iris", {"iris.data": iris_file()[:4551] + b"more"})
    with pytest.raises(fe.FetchError, match=r"iris.data: http://127.*serves 4555 bytes, the published file has 4551: "
                                            r"it is not the published file \(the download is deleted\)"):
        fe.fetch("iris", tmp_path, mirror=server.url, timeout=5)
    assert leftovers(tmp_path) == []
    assert all(len(r.sha256) == 64 and r.size > 0 for recipe in fe.CATALOG.values() for r in recipe.files)


def test_fetched_mnist_trains_digits_cnn_and_the_classification_example_on_4_ranks(tmp_path, server):
    server.serve("mnist", FILES["mnist"])
    pins = tmp_path / "pins.txt"
    pins.write_text("".join(f"{r.name} {r.size} {r.sha256}\n" for r in catalog_for(FILES)["mnist"].files))
    env = job_env(**{fe.CHECKSUMS_ENV: str(pins)})
    fetch = subprocess.run([sys.executable, "-m", "distbp", "data", "fetch", "mnist", "--mirror", server.url],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert fetch.returncode == 0, fetch.stderr
    assert "wrote data/mnist.h5" in fetch.stdout and "input (1, 28, 28)" in fetch.stdout
    examples = Path(__file__).resolve().parents[1] / "examples"
    # digits-cnn is shipped for the 8x8 digits: only data.path changes; the example reads data/mnist.h5 itself
    for config, data in (("digits-cnn", ["--set", 'data.path="data/mnist.h5"']),
                         (str(examples / "classification.toml"), [])):
        cmd = [MPIRUN, "-n", "4", sys.executable, "-m", "distbp", "train", config, *data,
               "--set", "train.max_steps=4", "--run-dir", f"runs/{config[-10:]}"]
        train = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
        assert "val_accuracy" in (tmp_path / "runs" / config[-10:] / "metrics.jsonl").read_text()


def test_fetch_under_mpirun_downloads_once(tmp_path, server):
    pins = tmp_path / "pins.txt"
    pins.write_text("".join(f"{r.name} {r.size} {r.sha256}\n" for r in catalog_for(FILES)["iris"].files))
    cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "distbp", "data", "fetch", "iris", "--mirror", server.url]
    env = job_env(**{fe.CHECKSUMS_ENV: str(pins)})
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("distbp: error: iris.data: HTTP 404") == 1, p.stderr
    server.serve("iris", FILES["iris"])
    server.requests.clear()
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert server.requests == [("iris/iris.data", None)] and p.stdout.count("wrote data/iris.h5") == 1
    with Dataset(tmp_path / "data" / "iris.h5") as ds:
        assert ds.split("train").n == 120 and ds.split("val").n == 30


def test_faults_doc_lists_every_fetch_failure_test():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FAULTS.md").read_text()
    tests = [name for name in globals() if name.startswith("test_") and "good_files" not in name
             and "trains" not in name and "faults_doc" not in name]
    assert not [t for t in tests if f"`{t}`" not in doc], "docs/FAULTS.md lacks rows for these fetch tests"


@pytest.mark.timing
def test_a_trickling_server_meets_the_total_deadline(tmp_path, server):
    server.serve("iris", FILES["iris"], mode="trickle")
    start = time.monotonic()
    with pytest.raises(fe.FetchError) as e:
        fe.fetch("iris", tmp_path, mirror=server.url, catalog=catalog_for(FILES), timeout=2, max_time=3)
    took = time.monotonic() - start
    assert "--max-time 3 s passed before the download completed (the server sends too slowly)" in str(e.value)
    assert "raise --timeout or --max-time" in str(e.value) and "bytes received" in str(e.value)
    assert 3 <= took < 3 + 2 + 1, took  # the deadline, at most one read's --timeout past it
    print(f"\n[trickle] gave up after {took:.1f} s")


@pytest.mark.parametrize("args, fragment", [(["--timeout", "nan"], "--timeout nan"),
                                            (["--timeout", "inf"], "--timeout inf"),
                                            (["--max-time", "0"], "--max-time 0"),
                                            (["--mirror", "http://[::1/x"], "is not a valid URL"),
                                            (["--mirror", "http://"], "is not an http:// or https:// URL")])
def test_bad_fetch_options_are_one_error_line(tmp_path, capsys, args, fragment):
    assert main(["data", "fetch", "iris", "--dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("distbp: error:") == 1 and fragment in err and "HINT" in err and "Traceback" not in err, err
