"""`distbp data fetch NAME`: download public datasets, verify their SHA-256, convert them into DIR/NAME.h5.

Every file a dataset needs is listed with its size and SHA-256 (pinned below, from
tensorflow/datasets' url_checksums/*.txt, which list URL, size and SHA-256 of the files as
their publishers serve them). A file is downloaded to DIR/NAME/FILE.part, resumed with an
HTTP Range request after a cut connection or a stall (socket timeout), retried with
exponential backoff, checked for size and checksum, then renamed to DIR/NAME/FILE. Archives
are unpacked into a temporary folder after every member was checked (regular files and
folders only, names inside the folder, total size bounded), with tarfile's "data" filter as
a second guard. The dataset is written to a temporary name and renamed into place, so an
interrupted or failed fetch leaves at most the .part file of the download it can resume.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from tqdm import tqdm

from .. import __version__
from .convert import StratifiedMask, convert
from .dataset import Dataset, DataError, write_dataset
from .text import text_dataset
from ..errors import UserError

MIRROR_ENV = "DISTBP_DATA_MIRROR"  # base URL of a local mirror laid out as MIRROR/NAME/FILE
CHECKSUMS_ENV = "DISTBP_FETCH_CHECKSUMS"  # tests only: a file of "FILE SIZE SHA256" lines replacing the pins
CHUNK = 1 << 16  # bytes per read from the network or a file
BACKOFF_S = 1.0  # first wait before a retry; doubled each time, at most BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
MAX_TIME_S = 3600.0  # the whole fetch's deadline by default (--max-time): a server trickling bytes never stalls
RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)


class FetchError(UserError):
    """A dataset cannot be fetched; the message names the file, what happened and the fix."""


class Deadline:
    """The whole fetch's deadline (--max-time): what is left of it, checked between reads and attempts."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left, 0 once it has passed."""
        return max(0.0, self.end - time.monotonic())

    def check(self):
        """Raise Interrupted(TimeoutError) once the deadline has passed (a trickling server never stalls)."""
        if not self.left():
            raise Interrupted(TimeoutError(f"--max-time {self.seconds:g} s passed"))


class Interrupted(Exception):
    """A transfer broke off (timeout, reset, cut connection); `cause` is the network error."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{cause}")
        self.cause = cause


@dataclass(frozen=True)
class Remote:
    """One published file: its name, where the publisher serves it, its size and SHA-256."""

    name: str
    urls: tuple[str, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class Recipe:
    """A fetchable dataset: its files, how they become a dataset file, and what it is."""

    files: tuple[Remote, ...]
    make: Callable[[dict, Path, "Recipe"], None]  # ({file name: path}, out, recipe) -> writes out
    about: dict  # root attributes of the dataset file: source, url, license
    max_unpacked: int = 0  # bytes an archive may unpack to


def _pinned(base: str, lines: str) -> tuple[Remote, ...]:
    """Remotes from 'FILE SIZE SHA256' lines, served under the base URL(s) (space-separated)."""
    rows = [line.split() for line in lines.strip().splitlines()]
    return tuple(Remote(name, tuple(f"{b}{name}" for b in base.split()), int(size), sha)
                 for name, size, sha in rows)


def _idx_dataset(files: dict, out: Path, recipe: Recipe):
    """MNIST-style IDX files to a dataset: train (val drawn from it, stratified, seed 0) and test."""
    convert([files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"]], out,
            test_inputs=[files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"]],
            task="classification", val_fraction=0.1, seed=0, attrs=recipe.about)


def _iris_dataset(files: dict, out: Path, recipe: Recipe):
    """UCI iris.data (four measurements, then the species name) to a dataset, 20% val, stratified, seed 0."""
    convert([files["iris.data"]], out, label="-1", header=False, delimiter=",", task="classification",
            val_fraction=0.2, seed=0, attrs=recipe.about)


CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then the red, green and blue 32x32 planes
CIFAR_DIR = "cifar-10-batches-bin"


def _cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, 3, 32, 32) uint8, y (N,) int64) of CIFAR-10 binary batch files."""
    records = []
    for name in names:
        raw = np.fromfile(folder / name, np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise FetchError(f"{folder / name}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte "
                             "records; HINT: the archive is damaged: delete it and fetch again")
        records.append(raw.reshape(-1, CIFAR_RECORD))
    rec = np.concatenate(records)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def _cifar_dataset(files: dict, out: Path, recipe: Recipe):
    """The CIFAR-10 binary archive to a dataset: 45,000 train / 5,000 val (stratified, seed 0) / 10,000 test."""
    archive = files["cifar-10-binary.tar.gz"]
    folder = archive.parent / f".unpack-{os.getpid()}"
    try:
        unpack(archive, folder, recipe.max_unpacked)
        batches = folder / CIFAR_DIR
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]:
            if not (batches / name).is_file():
                raise FetchError(f"{archive}: no member {CIFAR_DIR}/{name}; HINT: give the binary version "
                                 "cifar-10-binary.tar.gz as published")
        x, y = _cifar_batches(batches, [f"data_batch_{i}.bin" for i in range(1, 6)])
        x_test, y_test = _cifar_batches(batches, ["test_batch.bin"])
        names = [n.strip() for n in (batches / "batches.meta.txt").read_text().splitlines() if n.strip()]
        val = StratifiedMask(np.bincount(y, minlength=10), len(y) // 10, seed=0).flags(y)
        write_dataset(out, {"train": (x[~val], y[~val]), "val": (x[val], y[val]), "test": (x_test, y_test)},
                      num_classes=10, x_scale=1 / 255,
                      attrs={**recipe.about, "class_names": json.dumps(names),
                             "split": f"val: {int(val.sum())} rows (0.1) drawn from train by seed 0, "
                             "stratified by class"})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _text_dataset(files: dict, out: Path, recipe: Recipe):
    """A text file to a character-level token dataset of context 64 (the char-transformer's), 10% val tail."""
    text_dataset(files["input.txt"], out, 64, about=recipe.about, force=True)


# Sizes and SHA-256 from tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt,
# fashion_mnist.txt, cifar10.txt and iris.txt (lines of URL, size in bytes, SHA-256).
CATALOG = {
    "mnist": Recipe(_pinned("https://storage.googleapis.com/cvdf-datasets/mnist/ "
                            "https://ossci-datasets.s3.amazonaws.com/mnist/", """
        train-images-idx3-ubyte.gz 9912422 440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609
        train-labels-idx1-ubyte.gz 28881 3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c
        t10k-images-idx3-ubyte.gz 1648877 8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6
        t10k-labels-idx1-ubyte.gz 4542 f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"""),
        _idx_dataset, {"source": "MNIST handwritten digits (Y. LeCun, C. Cortes, C. J. C. Burges), 28x28 "
                       "grayscale, fetched by distbp data fetch mnist",
                       "url": "http://yann.lecun.com/exdb/mnist/", "license": "CC BY-SA 3.0"}),
    "fashion-mnist": Recipe(_pinned("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", """
        train-images-idx3-ubyte.gz 26421880 3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84
        train-labels-idx1-ubyte.gz 29515 a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845
        t10k-images-idx3-ubyte.gz 4422102 346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073
        t10k-labels-idx1-ubyte.gz 5148 67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"""),
        _idx_dataset, {"source": "Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, Zalando Research), 28x28 "
                       "grayscale, fetched by distbp data fetch fashion-mnist",
                       "url": "https://github.com/zalandoresearch/fashion-mnist", "license": "MIT",
                       "class_names": '["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", '
                       '"Shirt", "Sneaker", "Bag", "Ankle boot"]'}),
    "cifar10": Recipe(_pinned("https://www.cs.toronto.edu/~kriz/", """
        cifar-10-binary.tar.gz 170052171 c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"""),
        _cifar_dataset, {"source": "CIFAR-10 (A. Krizhevsky, 2009), binary version, 32x32 RGB, fetched by "
                         "distbp data fetch cifar10", "url": "https://www.cs.toronto.edu/~kriz/cifar.html"},
        max_unpacked=200 << 20),  # the archive unpacks to 184.4 MB
    "iris": Recipe(_pinned("https://archive.ics.uci.edu/ml/machine-learning-databases/iris/", """
        iris.data 4551 6f608b71a7317216319b4d27b4d9bc84e6abd734eda7872b71a458569e2656c0"""),
        _iris_dataset, {"source": "UCI Iris (R. A. Fisher, 1936), 4 measurements of 150 flowers, 3 species, "
                        "fetched by distbp data fetch iris", "url": "https://doi.org/10.24432/C56C76",
                        "license": "CC BY 4.0"}),
    # size and SHA-256 of the file at that URL, computed from a copy of the karpathy/char-rnn repository
    # (git blob 7dcb3a2d4cc3b48b6283dd46870bfeb78f88aac9; no published checksum list holds it)
    "tinyshakespeare": Recipe(_pinned("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/", """
        input.txt 1115394 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"""),
        _text_dataset, {"source": "Tiny Shakespeare (A. Karpathy, char-rnn): 40,000 lines of Shakespeare's "
                        "plays, fetched by distbp data fetch tinyshakespeare",
                        "url": "https://github.com/karpathy/char-rnn/tree/master/data/tinyshakespeare",
                        "license": "public domain (the plays); the collection is in char-rnn (MIT)"}),
}


def _safe_member(archive: Path, m: tarfile.TarInfo):
    """Refuse a member that is a link or device, or whose name leaves the target folder."""
    path = PurePosixPath(m.name)
    if not (m.isfile() or m.isdir()):
        kind = "a symbolic link" if m.issym() else "a hard link" if m.islnk() else "not a regular file"
        raise FetchError(f"{archive}: member {m.name!r} is {kind}; nothing was unpacked and the archive is "
                         "deleted; HINT: fetch it again from the publisher (or a trusted --mirror)")
    if path.is_absolute() or ".." in path.parts or m.name.startswith(("/", "\\")) or ":" in m.name:
        raise FetchError(f"{archive}: member {m.name!r} would be written outside the target folder; nothing "
                         "was unpacked and the archive is deleted; HINT: fetch it again from the publisher "
                         "(or a trusted --mirror)")


def unpack(archive: Path, folder: Path, max_bytes: int):
    """Unpack a .tar.gz into folder after checking every member (see _safe_member) and the total size."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            try:
                for m in members:
                    _safe_member(archive, m)
            except FetchError:
                archive.unlink(missing_ok=True)
                raise
            total = sum(m.size for m in members)
            if total > max_bytes:
                archive.unlink(missing_ok=True)
                raise FetchError(f"{archive}: members of {total} bytes in all, more than the {max_bytes} this "
                                 "dataset unpacks to; nothing was unpacked and the archive is deleted; HINT: "
                                 "fetch it again from the publisher")
            folder.mkdir(parents=True)
            # the "data" filter (Python >= 3.10.12) is a second guard behind the checks above
            tar.extractall(folder, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FetchError(f"{archive}: cannot be unpacked ({e}); HINT: delete it and fetch again, or free "
                         "disk space in --dir") from None


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, remote: Remote, origin: str):
    """Raise (deleting path) unless path has the remote's size and SHA-256."""
    size, digest = path.stat().st_size, sha256(path)
    if size != remote.size or digest != remote.sha256:
        path.unlink()
        raise FetchError(f"{remote.name} from {origin}: checksum mismatch (got {size} bytes, SHA-256 {digest}; "
                         f"expected {remote.size} bytes, SHA-256 {remote.sha256}); the file is deleted; HINT: "
                         "the copy is damaged or not the published file: fetch it again, from the publisher or "
                         "a trusted --mirror")


def _reason(e: BaseException, timeout: float) -> str:
    """A network failure in words."""
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, (TimeoutError, socket.timeout)):
        e = e.reason
    if isinstance(e, TimeoutError) and "--max-time" in str(e):
        return f"{e} before the download completed (the server sends too slowly)"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no data for {timeout:g} s (the server stalled)"
    if isinstance(e, urllib.error.HTTPError) and e.code == 416:
        return "the server's copy is shorter than the published file (HTTP 416 for the rest)"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
        return f"the host name does not resolve ({e.reason})"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed before the end of the file"
    return f"{type(e).__name__}: {e}"


def _chunks(response, deadline: Deadline):
    """The response body in chunks; a broken transfer, or the deadline passing, raises Interrupted."""
    try:
        while chunk := response.read1(CHUNK):  # what arrived, so a stall keeps the bytes before it
            yield chunk
            deadline.check()
    except (http.client.HTTPException, OSError) as e:  # socket timeouts and resets are OSErrors
        raise Interrupted(e) from e


def _write(part: Path, mode: str, chunks, limit: int, bar):
    """Write chunks to part (mode "ab" or "wb"); more than limit bytes in all deletes it and raises."""
    too_long = False
    try:
        with open(part, mode) as f:
            for chunk in chunks:
                too_long = f.tell() + len(chunk) > limit
                if too_long:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise FetchError(f"cannot write {part} ({e}); HINT: free disk space or choose another --dir") from None
    if too_long:
        part.unlink()
        raise FetchError(f"{part.name}: the server sent more than the expected {limit} bytes; the download is "
                         "deleted; HINT: the --mirror serves another file under this name")


def _size(path: Path) -> int:
    """Bytes in the file, 0 if there is none."""
    return path.stat().st_size if path.exists() else 0


def _get(url: str, part: Path, remote: Remote, timeout: float, bar, deadline: Deadline):
    """Append the rest of the file at url to part, from part's size on (HTTP Range)."""
    have = _size(part)
    headers = {"User-Agent": f"distbp/{__version__}", **({"Range": f"bytes={have}-"} if have else {})}
    wait = min(timeout, deadline.left()) or 1e-3  # a connection may not outlast the deadline either
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=wait) as r:
        resumed = have and r.status == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        served = _served_size(r, bool(resumed))
        if served is not None and served != remote.size:  # another file, not a transfer to resume
            part.unlink(missing_ok=True)
            raise FetchError(f"{remote.name}: {url} serves {served} bytes, the published file has {remote.size}: it "
                             "is not the published file (the download is deleted); HINT: fix the mirror's copy, "
                             f"or use another --mirror URL ({MIRROR_ENV}) or --from DIR")
        bar.reset(remote.size)
        bar.update(have if resumed else 0)
        _write(part, "ab" if resumed else "wb", _chunks(r, deadline), remote.size, bar)


def _served_size(response, resumed: bool) -> int | None:
    """The size of the whole file the server sends: Content-Range's total when resuming, else Content-Length."""
    if resumed:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length", "")
    return int(length) if response.status == 200 and length.isdigit() else None


def download(remote: Remote, urls: list[str], part: Path, timeout: float, retries: int, deadline: Deadline):
    """Download to part (resuming it), retrying with backoff; raises FetchError when attempts or the deadline
    run out."""
    with tqdm(total=remote.size, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.name,
              file=sys.stderr, disable=None, leave=False) as bar:
        attempt, retryable = 0, True
        while attempt < retries and retryable and _size(part) < remote.size and deadline.left():
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S, deadline.left()))
            attempt, retryable = attempt + 1, False
            for url in urls:
                try:
                    _get(url, part, remote, timeout, bar, deadline)
                    last, retryable = http.client.IncompleteRead(b""), True  # unless complete: a short body
                except urllib.error.HTTPError as e:
                    last, retryable = e, retryable or e.code in RETRYABLE_HTTP
                except (urllib.error.URLError, http.client.HTTPException, OSError, Interrupted) as e:
                    last = e.cause if isinstance(e, Interrupted) else e
                    # a name that does not resolve will not resolve on the next attempt either
                    retryable = retryable or not (isinstance(e, urllib.error.URLError)
                                                  and isinstance(e.reason, socket.gaierror))
                    if not deadline.left():
                        last = TimeoutError(f"--max-time {deadline.seconds:g} s passed")
                where = url
                if _size(part) >= remote.size:
                    return
    if _size(part) >= remote.size:  # completed by an earlier run
        return
    have = _size(part)
    kept = (f"; the {have} bytes received are kept in {part}: run the same command again to resume" if have
            else "")
    if isinstance(last, urllib.error.HTTPError) and last.code == 404:
        hint = (f"the file is not at that address: a --mirror URL ({MIRROR_ENV}) must serve URL/NAME/FILE; or use "
                "--from DIR with the files copied by hand")
    else:
        hint = (f"check the network, raise --timeout or --max-time, or use --mirror URL ({MIRROR_ENV}) or --from DIR "
                "with the files copied by hand")
    raise FetchError(f"{remote.name}: {_reason(last, timeout)} at {where} after {attempt} attempt(s), "
                     f"{have} of {remote.size} bytes received{kept}; HINT: {hint}")


def _override_checksums(recipe: Recipe) -> Recipe:
    """The recipe with sizes and SHA-256 from the file named by $DISTBP_FETCH_CHECKSUMS (tests only)."""
    path = os.environ.get(CHECKSUMS_ENV)
    if not path:
        return recipe
    print(f"distbp: WARNING: checksums from {CHECKSUMS_ENV}={path} replace the pinned ones", file=sys.stderr)
    try:
        pins = {name: (int(size), sha) for name, size, sha in (line.split() for line in
                                                                  Path(path).read_text().splitlines() if line.strip())}
    except (OSError, ValueError) as e:
        raise FetchError(f"{CHECKSUMS_ENV}={path}: not a file of 'FILE SIZE SHA256' lines ({e}); "
                         "HINT: unset it") from None
    return replace(recipe, files=tuple(replace(r, size=pins[r.name][0], sha256=pins[r.name][1])
                                       if r.name in pins else r for r in recipe.files))


def _mirror_urls(name: str, remote: Remote, mirror: str | None) -> list[str]:
    """Where to download from: the mirror (MIRROR/NAME/FILE) if one is given, else the publisher's URLs."""
    if not mirror:
        return list(remote.urls)
    try:
        host = urllib.parse.urlsplit(mirror).hostname
    except ValueError as e:  # a malformed address, such as an unclosed IPv6 bracket
        raise FetchError(f"--mirror {mirror!r} is not a valid URL ({e}); HINT: give the mirror's base URL, e.g. "
                         "http://[::1]:8000/datasets/ for an IPv6 address") from None
    if not mirror.startswith(("http://", "https://")) or not host:
        raise FetchError(f"--mirror {mirror!r} is not an http:// or https:// URL; HINT: give the mirror's base "
                         "URL, or --from DIR for files in a folder")
    return [f"{mirror.rstrip('/')}/{name}/{remote.name}"]


def fetch_file(name: str, remote: Remote, folder: Path, mirror: str | None, source: Path | None,
               timeout: float, retries: int, deadline: Deadline) -> Path:
    """folder/FILE, verified: kept from an earlier fetch, copied from source, or downloaded."""
    target, part = folder / remote.name, folder / f"{remote.name}.part"
    if target.exists():
        try:
            _verify(target, remote, str(target))
            return target
        except FetchError as e:
            print(f"distbp: {e}; fetching it again", file=sys.stderr)
    if source is not None:
        given = source / remote.name
        if not given.is_file():
            raise FetchError(f"--from {source}: no file {remote.name} there; HINT: download {remote.urls[0]} "
                             f"(or copy it from another machine) into {source}")
        try:
            shutil.copyfile(given, part)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise FetchError(f"cannot copy {given} to {part} ({e}); HINT: free disk space or choose another "
                             "--dir") from None
        _verify(part, remote, str(given))
    else:
        download(remote, _mirror_urls(name, remote, mirror), part, timeout, retries, deadline)
        _verify(part, remote, mirror or remote.urls[0])
    os.replace(part, target)
    return target


def open_dataset(path, arg: str = "data.path") -> Dataset:
    """Dataset(path, arg); a missing file named after a fetchable dataset (data/cifar10.h5, the shipped resnet's
    data, before it was fetched) says the command that fetches it."""
    path = Path(path)
    if not path.exists() and path.suffix == ".h5" and path.stem in CATALOG:
        raise DataError(f"dataset {path}: no such file; HINT: `distbp data fetch {path.stem}` downloads and writes "
                        f"it to data/{path.stem}.h5 (--dir for another folder), or check {arg}")
    return Dataset(path, arg)


def fetch(name: str, directory="data", mirror: str | None = None, source=None, timeout: float = 30.0,
          retries: int = 5, catalog: dict | None = None, max_time: float = MAX_TIME_S) -> Path:
    """Fetch dataset `name` into directory/name.h5 (raw files kept in directory/name/); returns its path.
    timeout: seconds without data before an attempt gives up; max_time: seconds for all the downloads."""
    catalog = CATALOG if catalog is None else catalog
    if name not in catalog:
        raise FetchError(f"no dataset {name!r} to fetch; HINT: choose one of {', '.join(sorted(catalog))}")
    if not (0 < timeout < math.inf and 0 < max_time < math.inf) or retries < 1:
        raise FetchError(f"--timeout {timeout:g}, --max-time {max_time:g} and --retries {retries} must be positive "
                         "finite numbers; HINT: e.g. --timeout 30 --max-time 3600 --retries 5")
    recipe = _override_checksums(catalog[name])
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    source = Path(source) if source else None
    if source is not None and not source.is_dir():
        raise FetchError(f"--from {source}: no such folder; HINT: give the folder holding the copied files")
    out, folder = Path(directory) / f"{name}.h5", Path(directory) / name
    if out.exists():
        print(f"{out} exists; delete it to fetch {name} again")
        return out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create {folder} ({e}); HINT: choose a writable --dir") from None
    try:
        deadline = Deadline(max_time)
        files = {r.name: fetch_file(name, r, folder, mirror, source, timeout, retries, deadline)
                 for r in recipe.files}
        recipe.make(files, out, recipe)
    finally:
        if not any(folder.iterdir()):
            folder.rmdir()  # a failed first fetch leaves no empty folder
    print(f"wrote {out}")
    return out
