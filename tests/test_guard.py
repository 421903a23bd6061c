"""Process death on error: a failing rank reported once and the whole job ended, whatever the others do."""
import textwrap
import time
from pathlib import Path

import pytest

from distbp.parallel import guard
from distbp.parallel.comm import SerialComm
from conftest import run_distbp

ROOT = Path(__file__).resolve().parents[1]


def test_run_guarded_in_a_world_of_one_returns_or_raises():
    assert guard.run_guarded(lambda a, b: a + b, SerialComm(), 2, b=3) == 5
    with pytest.raises(ValueError):
        guard.run_guarded(lambda: int("x"), SerialComm())


def test_report_failure_names_rank_host_and_error(capsys):
    try:
        raise RuntimeError("disk full")
    except RuntimeError as e:
        guard.report_failure(SerialComm(), e)
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().endswith(f"rank 0 on {SerialComm().host} failed: RuntimeError: disk full")


SCRIPT = textwrap.dedent("""
    import sys
    from distbp.parallel.comm import world
    from distbp.parallel.guard import install_abort_on_error, run_guarded
    comm = world()
    install_abort_on_error(comm)
    mode = sys.argv[1]

    def main():
        if comm.rank == 1 and mode == "raise":
            raise ValueError("boom")
        if comm.rank == 1 and mode == "exit":
            sys.exit(3)
        comm.barrier()  # the other ranks would wait here forever without the abort
        return 0

    if mode == "hook" and comm.rank == 1:
        raise ValueError("boom")
    sys.exit(run_guarded(main, comm))
""")


@pytest.mark.timing
@pytest.mark.parametrize("mode, code", [("raise", 1), ("hook", 1), ("exit", 3), ("ok", 0)])
def test_one_failing_rank_ends_the_job(serial, tmp_path, mode, code):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    proc = run_distbp([mode], 3, script=script, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distbp: rank")]
    if code == 0:
        assert lines == []
    else:
        what = "exited with code 3" if mode == "exit" else "failed: ValueError: boom"
        assert len(lines) == 1 and lines[0].startswith("distbp: rank 1 on ") and lines[0].endswith(what)
