"""--progress auto|bar|lines|none: what a user sees from distbp train, on a pipe and on a terminal, under mpirun."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest

from distbp.reporting import progress
from distbp.reporting.progress import Progress, terminal_columns
from conftest import MPIRUN, job_env

TRAIN = [sys.executable, "-m", "distbp", "train", "--set", "train.epochs=2", "--set", "train.log_every=10",
         "--resume", "never"]
LINE = re.compile(r"epoch (\d)/2 +(\d+)% step (\d+)/46 loss=\S+ lr=0\.05 [\d,]+ samples/s ETA \d\d:\d\d")


def open_terminal(columns: int = 120) -> tuple[int, int]:
    """(master, slave) of a new pseudo-terminal of the given width."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    return master, slave


def drain(fd: int, sink: list) -> threading.Thread:
    """Read a pty master into sink until the other side closes (so the writer never blocks)."""
    def read():
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every writer has closed the slave
                return
            if not chunk:
                return
            sink.append(chunk)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def run(argv, cwd, terminal: bool = False, env=None) -> str:
    """Run argv with stdout and stderr on one pipe, or on one pseudo-terminal; the text it showed."""
    if not terminal:
        p = subprocess.run(argv, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=120)
        text = p.stdout.decode(errors="replace")  # as bytes: text mode would turn the bar's \r into \n
        assert p.returncode == 0, text[-3000:]
        return text
    master, slave = open_terminal()
    chunks = []
    reader = drain(master, chunks)
    p = subprocess.run(argv, cwd=cwd, env=env or job_env(), stdout=slave, stderr=slave, timeout=120)
    os.close(slave)
    reader.join(10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, text[-3000:]
    return text


def is_bar(text: str) -> bool:
    """tqdm's bar: 'epoch 2/2: 100%|#####| 46/46 [...]' redrawn with carriage returns."""
    return bool(re.search(r"epoch 2/2: 100%\|.*\| 46/46 \[", text)) and "\r" in text


def test_lines_carry_epoch_percent_samples_per_s_and_eta(serial, tmp_path):
    text = run([*TRAIN, "--progress", "lines"], tmp_path, terminal=True)  # asked for: lines even on a terminal
    lines = [m.groups() for m in LINE.finditer(text)]
    assert [int(step) for _, _, step in lines] == [10, 20, 30, 40, 46]
    assert [(int(e), int(p)) for e, p, _ in lines] == [(1, 22), (1, 43), (2, 65), (2, 87), (2, 100)]
    assert not is_bar(text)


def test_none_shows_no_progress_but_keeps_the_log(serial, tmp_path):
    text = run([*TRAIN, "--progress", "none"], tmp_path, terminal=True)
    assert not LINE.search(text) and not is_bar(text)
    assert "eval step 46 epoch 2" in text and "summary:" in text


def test_bar_on_one_rank_ends_before_the_summary(serial, tmp_path):
    text = run([*TRAIN, "--progress", "bar"], tmp_path)  # asked for: a bar even on a pipe
    assert is_bar(text) and not LINE.search(text)
    last_bar = text.rindex("46/46 [")
    assert last_bar < text.index("summary:")
    assert "\r" not in text[text.index("summary:"):]  # nothing redrawn after the summary


@pytest.mark.parametrize("ranks", [0, 2])
def test_auto_is_a_bar_when_the_launch_terminal_is_one_and_lines_on_a_pipe(serial, tmp_path, ranks):
    argv = [*([MPIRUN, "-n", str(ranks)] if ranks else []), *TRAIN, "--progress", "auto"]
    on_terminal = run(argv, tmp_path, terminal=True)  # under mpirun rank 0 writes to a pipe of the launcher's
    assert is_bar(on_terminal) and not LINE.search(on_terminal)
    on_pipe = run(argv, tmp_path)
    assert LINE.search(on_pipe) and not is_bar(on_pipe)


def test_auto_under_open_mpi_asks_the_launcher_not_the_ranks_own_terminal(serial, tmp_path):
    # Open MPI hands every rank a pseudo-terminal even when mpirun's output goes to a file: a stand-in
    # launcher named prterun gives its child a terminal while its own stderr is a pipe, then a terminal.
    launcher = tmp_path / "prterun"
    launcher.write_text(f"#!{sys.executable}\nimport os, subprocess, sys\n"
                        "with open(os.environ['RANK_TTY'], 'w') as tty:\n"
                        "    sys.exit(subprocess.run(sys.argv[1:], stderr=tty).returncode)\n")
    launcher.chmod(0o755)
    probe = [sys.executable, "-c", "from distbp.reporting.progress import terminal_columns as t; print('columns', t())"]
    master, slave = open_terminal(columns=97)
    try:
        env = job_env(OMPI_COMM_WORLD_RANK="0", RANK_TTY=os.ttyname(slave))
        on_pipe = subprocess.run([str(launcher), *probe], env=env, capture_output=True, text=True, timeout=60)
        assert on_pipe.stdout.strip() == "columns None", on_pipe
        on_terminal = subprocess.run([str(launcher), *probe], env=env, stdout=subprocess.PIPE, stderr=slave,
                                     text=True, timeout=60)
        assert on_terminal.stdout.strip() == "columns 97"
    finally:
        os.close(slave)
        os.close(master)


def test_auto_under_srun_pty_reads_slurm_environment(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_PTY_PORT", raising=False)
    monkeypatch.setattr("distbp.reporting.progress.launcher_pid", lambda: None)  # ranks run under slurmstepd, not srun
    assert terminal_columns() is None
    monkeypatch.setenv("SLURM_PTY_PORT", "40123")  # srun --pty: task 0's output is the user's terminal
    monkeypatch.setenv("SLURM_PTY_WIN_COL", "132")
    assert terminal_columns() == 132
    assert Progress("auto", 44, 22, 10, print).mode == "bar"


def test_no_bar_before_start_and_rates_from_the_resumed_step(monkeypatch):
    monkeypatch.setattr(progress, "terminal_columns", lambda: 80)
    lines = []
    p = Progress("bar", 100, 10, 5, lines.append)
    assert p.bar is None  # nothing on screen while the start-up lines print
    p.start(60, 60 * 32)
    assert p.bar is not None and p.bar.initial == 60 and p.step0 == 60
    p.close()
