"""A closed output does not end training: `[mpirun -n 2] distbp train | head -n 3` trains to its final checkpoint.

MPICH's mpiexec dies of SIGPIPE at its first write after head has gone, and its proxies SIGKILL every
rank (measured: the ranks see no catchable signal). Rank 0 therefore writes past mpiexec into the
pipe itself (parallel/startup.write_past_the_launcher), so the EPIPE is its own and QuietPipe silences it.
"""
import json
import subprocess
import sys

import pytest

from conftest import MPIRUN, job_env


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_into_head_trains_on_to_its_final_checkpoint(serial, tmp_path, make_dataset, ranks):
    """100 steps log a line each; head takes 3 of them (stdout and stderr) and leaves; every process exits 0
    and the run ends complete: its last step's checkpoint and the summary line are written."""
    data = make_dataset()
    launcher = f"{MPIRUN} -n {ranks} " if ranks > 1 else ""
    train = (f"{launcher}{sys.executable} -m distbp train --run-dir run --set data.path={data} --set train.epochs=20 "
             "--set train.batch_size=8 --set train.log_every=1 --progress lines")
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {train} 2>&1 | head -n 3"], cwd=tmp_path,
                          env=job_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert (tmp_path / "run" / "checkpoints" / "step-00000100.h5").exists(), sorted((tmp_path / "run").rglob("*"))
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["summary"] is True and summary["exit_code"] == 0 and summary["steps"] == 100, summary
