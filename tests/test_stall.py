"""A frozen rank anywhere in any command ends the job naming it; a rank stuck after a stop signal ends itself."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from distbp.files import checkpoint as ckpt
from distbp.parallel import faults
from conftest import MPIRUN, job_env
from test_faults import Job

TIMEOUT = 5  # train.stall_timeout of every job here
FAST = ["--set", f"train.stall_timeout={TIMEOUT}", "--set", "train.log_every=1000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, dataset): a 4-step run's checkpoint, whose config has train.stall_timeout=5."""
    d = tmp_path_factory.mktemp("trained")
    job = Job(0, ["train", *FAST, "--set", "train.max_steps=4", "--run-dir", str(d / "run")])
    assert job.rc == 0, job.stderr
    assert Job(0, ["data", "digits", str(d / "digits.h5")]).rc == 0
    return ckpt.list_checkpoints(d / "run" / "checkpoints")[-1], d / "digits.h5"


def gone(pid: int, within: float = 10.0) -> bool:
    """True once process pid has ended (dead, or a zombie left for its parent to reap) within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def fault_pid(stderr: str) -> int:
    """The PID the fault-injection line names."""
    return int(re.search(r"fault injection: rank \d+ \(pid (\d+)\)", stderr)[1])


COMMANDS = {"train": lambda tmp, ck, data: ["train", *FAST, "--set", "train.max_steps=6", "--run-dir", str(tmp / "r")],
            "eval": lambda tmp, ck, data: ["eval", str(ck)],
            "predict": lambda tmp, ck, data: ["predict", str(ck), str(data), str(tmp / "p.h5")]}


@pytest.mark.timing
@pytest.mark.parametrize("command,point", [("train", "setup"), ("train", "eval"), ("train", "final"),
                                           ("eval", "setup"), ("eval", "eval"),
                                           ("predict", "setup"), ("predict", "predict")])
def test_frozen_rank_anywhere_ends_the_job_naming_it(tmp_path, trained, command, point):
    job = Job(2, COMMANDS[command](tmp_path, *trained), f"rank=1,at={point},kind=stop")
    assert job.rc != 0
    stall = [line for line in job.stderr.splitlines() if line.startswith("distbp: stall:")]
    assert len(stall) == 1, job.stderr
    in_loop = command == "train" and point == "eval"  # train's evaluation is part of step 6
    where = "the collective of step 6" if in_loop else f"a collective of distbp {command}"
    assert re.search(rf"rank\(s\) 1 on \S+ did not arrive at {where}", stall[0]), stall[0]
    assert TIMEOUT <= job.to_exit < TIMEOUT + 20, job.stderr
    assert gone(fault_pid(job.stderr)), "the frozen rank outlived the job"


class Launched:
    """mpirun -n 2 distbp train with rank 1 frozen at step 3; the test then acts on the ranks' processes."""

    def __init__(self, tmp_path, stall_timeout: float):
        self.err_path, self.out_path = tmp_path / "err", tmp_path / "out"
        cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "distbp", "train", "--set", "train.max_steps=100",
               "--set", f"train.stall_timeout={stall_timeout}", "--set", "train.log_every=1000",
               "--run-dir", str(tmp_path / "run")]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, env=job_env(**{faults.ENV: "rank=1,step=3,kind=stop"}),
                                         stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 60
        while "fault injection" not in self.err_path.read_text():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.err_path.read_text()
            time.sleep(0.1)
        table = re.search(r"ranks \(rank=pid@host\): 0=(\d+)@\S+ 1=(\d+)@", self.out_path.read_text())
        self.ranks = [int(table[1]), int(table[2])]
        with open(f"/proc/{self.ranks[0]}/stat") as f:
            self.proxy = int(f.read().rsplit(")", 1)[1].split()[1])  # the launcher's agent on this node

    def end(self) -> str:
        """Let the launcher's agent go on, end whatever is left, and return stderr."""
        os.kill(self.proxy, signal.SIGCONT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in [*self.ranks, self.proxy, self.proc.pid]:
                if os.path.exists(f"/proc/{pid}"):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        return self.err_path.read_text()


@pytest.mark.timing
@pytest.mark.parametrize("trigger", ["sigterm", "stall"])
def test_stuck_rank_exits_by_itself_when_its_abort_cannot_reach_the_launcher(tmp_path, trigger):
    # rank 1 is frozen and the launcher's agent is stopped, so MPI_Abort reaches no one (as on the far
    # side of a cut link): rank 0 must end itself, after SIGTERM or after its own watchdog fired
    job = Launched(tmp_path, stall_timeout=300 if trigger == "sigterm" else TIMEOUT)
    try:
        os.kill(job.proxy, signal.SIGSTOP)
        t0 = time.monotonic()
        if trigger == "sigterm":
            time.sleep(1.0)  # rank 0 is now waiting in the step's allreduce
            t0 = time.monotonic()
            os.kill(job.ranks[0], signal.SIGTERM)
        bound = 15 if trigger == "sigterm" else TIMEOUT + 20
        assert gone(job.ranks[0], within=bound), f"rank 0 still running {bound} s after the {trigger}"
        took = time.monotonic() - t0
    finally:
        stderr = job.end()
    print(f"\n[{trigger}] rank 0 ended itself {took:.1f} s after the {trigger} started")
    if trigger == "sigterm":
        assert re.search(r"distbp: rank 0 got SIGTERM while waiting \d+ s in the collective of step 3, and "
                         r"rank\(s\) 1 on \S+ do not answer", stderr), stderr
    else:
        assert re.search(r"distbp: stall: rank\(s\) 1 on \S+ did not arrive at the collective of step 3", stderr), stderr
    assert all(gone(pid) for pid in job.ranks), "a rank outlived the job"


@pytest.mark.timing
@pytest.mark.mpi(min_size=2)
def test_lenient_watchdog_waits_for_a_rank_that_works_alone(comm):
    # as in data, ckpt and plot under mpirun: rank 0 works 3 s alone, 3x the timeout, and answers queries
    from distbp.parallel.watchdog import watching
    with watching(comm, 1.0, "data", strict=False) as watched:
        if comm.rank == 0:
            time.sleep(3.0)
        watched.barrier()
        assert watched.watchdog.since is None
