"""Every code block of README.md and docs/*.md, as written, twice in a row in the same folder.

The convention (the docs follow it, this test enforces it): every code block is fenced and names
its language. `sh` blocks run with `bash -e -o pipefail` in a folder laid out as a clone of the
project after `bash scripts/setup.sh` (examples/, scripts/, slurm/, a copy of data/, `.venv`, and
the venv's bin first on PATH), `python` blocks run as `python -` there, `toml` blocks are parsed
and built into a distbp.Config, docs/API.md's python blocks run in tests/test_api.py (in-process,
twice). A block that cannot run here carries `<!-- not run: REASON -->` on the line before its
fence (a comment the reader of the rendered page does not see); `text` blocks (output, grammars,
formulas) carry one too. No other block is left out: the test prints every reason. A block whose text
repeats an earlier one's (DETERMINISM.md's loop is README's) runs once per pass; a block that prints
parameter checksums to show they agree (`| grep crc32`) must print one checksum.
"""
import os
import re
import shutil
import subprocess
import sys
import time as clock
import tomllib
from pathlib import Path

import numpy as np
import pytest

import distbp
from distbp.datasets.dataset import write_dataset
from conftest import job_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^\n]*?) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)
RUN_ELSEWHERE = {("docs/API.md", "python"): "run in-process, twice, by tests/test_api.py"}
MAX_NOT_RUN = 30  # the marked blocks stay few; raise only with a reason in the doc


def blocks(doc: str) -> list[dict]:
    """The fenced blocks of doc: line, language, body and the reason it is not run (or None)."""
    text = (ROOT / doc).read_text()
    return [{"doc": doc, "line": text.count("\n", 0, m.start("lang")) + 1, "lang": m["lang"], "body": m["body"],
             "reason": m["reason"] or RUN_ELSEWHERE.get((doc, m["lang"]))} for m in BLOCK.finditer(text)]


def all_blocks() -> list[dict]:
    """Every doc's blocks, README first."""
    return [b for doc in DOCS for b in blocks(doc)]


def test_every_block_is_fenced_with_a_language_and_unrun_ones_say_why():
    """No indented code block (it would have no language), every fence names sh, python, toml or text, and each
    block left out gives its reason; the reasons are printed (pytest -s) and stay few."""
    for doc in DOCS:
        text = re.sub(r"^```.*?^```$", "", (ROOT / doc).read_text(), flags=re.S | re.M)
        indented = re.findall(r"\n\n( {4}\S[^\n]*)", text)
        assert not indented, f"{doc}: indented code block(s), fence them with a language: {indented[:3]}"
        fences = len(re.findall(r"^```", (ROOT / doc).read_text(), re.M))
        assert fences == 2 * len(blocks(doc)), f"{doc}: a fence the test does not see (unclosed, or indented)"
    everything = all_blocks()
    for b in everything:
        assert b["lang"] in ("sh", "python", "toml", "text"), f"{b['doc']}:{b['line']}: fence language {b['lang']!r}"
        assert b["lang"] != "text" or b["reason"], f"{b['doc']}:{b['line']}: a text block needs <!-- not run: ... -->"
        assert b["reason"] is None or b["reason"].strip(), f"{b['doc']}:{b['line']}: an empty reason"
    left_out = [b for b in everything if b["reason"] and (b["doc"], b["lang"]) not in RUN_ELSEWHERE]
    print(f"\n{len(everything)} blocks, {len(left_out)} not run here:")
    for b in left_out:
        print(f"  {b['doc']}:{b['line']} ({b['lang']}): {b['reason']}")
    assert len(left_out) <= MAX_NOT_RUN


def stand_in_mnist(path: Path):
    """A small dataset shaped as `distbp data fetch mnist` writes it (uint8 28x28, 10 classes, a test split)."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
        x[np.arange(n), 0, 2 * y + 4, 4:24] = 255  # each class a bright row: learnable
        return x, y.astype(np.int64)
    write_dataset(path, {"train": split(192), "val": split(64), "test": split(64)}, num_classes=10, x_scale=1 / 255)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A folder laid out as the project after setup: its files linked, data/ copied, .venv the running venv,
    and the stand-ins the not-run download blocks would have fetched."""
    folder = tmp_path_factory.mktemp("clone")
    for name in ("examples", "scripts", "slurm", "distbp", "docs", "tests", "pyproject.toml", "README.md"):
        (folder / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "data", folder / "data")
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])
    stand_in_mnist(folder / "data" / "mnist.h5")
    return folder


def run_block(block: dict, folder: Path, time: str):
    """Run one block in folder; fail the test naming the doc, line and pass with the output's end."""
    where = f"{block['doc']}:{block['line']} ({block['lang']}, {time} time)"
    if block["lang"] == "toml":
        try:
            distbp.Config(**tomllib.loads(block["body"]))
        except Exception as e:  # noqa: BLE001 (any failure is the doc's)
            pytest.fail(f"{where}: {type(e).__name__}: {e}\n{block['body']}")
        return
    argv = ["bash", "-e", "-o", "pipefail", "-c", block["body"]] if block["lang"] == "sh" else [sys.executable, "-"]
    env = job_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        done = subprocess.run(argv, cwd=folder, env=env, input=block["body"] if block["lang"] == "python" else None,
                              capture_output=True, text=True, timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{where}: still running after {e.timeout} s\n{block['body']}")
    if done.returncode != 0:
        pytest.fail(f"{where} exits {done.returncode}:\n{block['body']}\n--- stdout\n{done.stdout[-2000:]}"
                    f"\n--- stderr\n{done.stderr[-3000:]}")
    if "| grep crc32" in block["body"]:
        checksums = set(done.stdout.split())
        assert len(done.stdout.splitlines()) >= 2 and len(checksums - {"parameters", "crc32:"}) == 1, done.stdout


@pytest.mark.timeout(1800)  # minutes on a loaded machine: scripts/test.sh runs it once, in the serial phase
def test_every_block_runs_as_written_twice_in_the_same_folder(serial, clone):
    """README's blocks, then each doc's, in order in one folder; then all of them again there."""
    runnable, took, first = [b for b in all_blocks() if not b["reason"]], [], {}
    assert runnable
    for time in ("first", "second"):
        for block in runnable:
            where = first.setdefault(block["body"], f"{block['doc']}:{block['line']}")
            if where != f"{block['doc']}:{block['line']}":
                continue  # the same text as a block run before it in this pass (DETERMINISM.md repeats README's loop)
            start = clock.monotonic()
            run_block(block, clone, time)
            took.append((clock.monotonic() - start, f"{block['doc']}:{block['line']} ({time} time)"))
    for body, where in first.items():
        again = [f"{b['doc']}:{b['line']}" for b in runnable if b["body"] == body][1:]
        if again:
            print(f"\n{', '.join(again)}: the same text as {where}, run once per pass")
    print(f"\n{len(runnable)} blocks twice in {sum(s for s, _ in took):.0f} s; the slowest:")
    for seconds, where in sorted(took, reverse=True)[:8]:
        print(f"  {seconds:5.1f} s  {where}")
