"""A frozen rank anywhere in any command ends the job naming it; a rank stuck after a stop signal ends itself."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from distbp.files import checkpoint as ckpt
from distbp.config import TrainConfig
from distbp.parallel import faults, startup
from conftest import MPIRUN, job_env, run_distbp
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
                                           ("train", "summary"),
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


@pytest.mark.timing
def test_rank_frozen_while_others_wait_on_an_overlapped_bucket_is_named(tmp_path):
    # rank 1 freezes mid-backward, just after starting its first bucket: rank 0 waits on the others
    args = ["train", *FAST, "--set", "train.max_steps=6", "--set", "train.overlap=true",
            "--set", "train.bucket_mb=0.0001", "--run-dir", str(tmp_path / "r")]
    job = Job(2, args, "rank=1,at=bucket,kind=stop")
    stall = [line for line in job.stderr.splitlines() if line.startswith("distbp: stall:")]
    assert job.rc != 0 and len(stall) == 1, job.stderr
    assert re.search(r"rank\(s\) 1 on \S+ did not arrive at the collective of step 0", stall[0]), stall[0]
    assert TIMEOUT <= job.to_exit < TIMEOUT + 20, job.stderr
    assert gone(fault_pid(job.stderr)), "the frozen rank outlived the job"


class Launched:
    """mpirun -n 2 distbp train with rank 1 frozen at step 3; the test then acts on the ranks' processes.

    Each rank writes its stderr to a file of its own (err.RANK), not through the launcher's agent: with
    the agent stopped, what a rank writes waits in the agent's pipe, and the agent, once continued, may
    act on the rank's MPI_Abort before it forwards that pipe (so the message would be lost at random)."""

    def __init__(self, tmp_path, stall_timeout: float):
        self.err_base, self.out_path = tmp_path / "err", tmp_path / "out"
        rank_argv = [sys.executable, "-m", "distbp", "train", "--set", "train.max_steps=100",
                     "--set", f"train.stall_timeout={stall_timeout}", "--set", "train.log_every=1000",
                     "--run-dir", str(tmp_path / "run")]
        cmd = [MPIRUN, "-n", "2", "sh", "-c", 'exec "$@" 2>"$0.$PMI_RANK"', str(self.err_base), *rank_argv]
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, env=job_env(**{faults.ENV: "rank=1,step=3,kind=stop"}),
                                         stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while "fault injection" not in self.stderr():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.stderr()
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
        return self.stderr()

    def stderr(self) -> str:
        """What the ranks wrote to stderr so far, rank 0's first."""
        paths = sorted(self.err_base.parent.glob(self.err_base.name + ".*"))
        return "".join(path.read_text() for path in paths)


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


STARTUP = 3  # DISTBP_STALL_TIMEOUT of the start-up tests: the bound before a command reads its config


def frozen_at(tmp_path, trained, command: str, point: str):
    """(job, seconds from the fault line to the job's end) of `command` at 2 ranks with rank 1 frozen at point."""
    args = COMMANDS[command](tmp_path, *trained) if command in COMMANDS else ["data", "digits", str(tmp_path / "d.h5")]
    stamp = []
    start = time.monotonic()
    job = run_distbp(args, 2, env={faults.ENV: f"rank=1,at={point},kind=stop", startup.TIMEOUT_ENV: str(STARTUP)},
                     on_stderr_line=lambda line: stamp.append(time.monotonic()) if "fault injection" in line else 0)
    wall, to_exit = time.monotonic() - start, time.monotonic() - stamp[0]
    print(f"\n[{command} at={point}] rc={job.returncode} wall={wall:.1f}s fault->exit={to_exit:.1f}s")
    return job, to_exit, wall


@pytest.mark.timing
@pytest.mark.parametrize("command", ["train", "predict"])
@pytest.mark.parametrize("point, waited", [("startup", "MPI initialisation"), ("mpi", "the first collective")])
def test_rank_frozen_before_the_watchdog_runs_ends_the_job_at_the_startup_deadline(tmp_path, trained, command,
                                                                                   point, waited):
    job, to_exit, wall = frozen_at(tmp_path, trained, command, point)
    assert job.returncode != 0
    lines = [line for line in job.stderr.splitlines() if line.startswith("distbp: start-up: rank 0 ")]
    assert len(lines) == 1, job.stderr
    assert f"waited {STARTUP} s for {waited}" in lines[0] and "not all 2 ranks (PMI_SIZE=2) arrived" in lines[0]
    assert STARTUP <= wall and to_exit < STARTUP + 15, job.stderr  # the deadline runs from process start
    assert gone(fault_pid(job.stderr)), "the frozen rank outlived the job"


@pytest.mark.timing
@pytest.mark.parametrize("command", ["train", "eval", "data"])
def test_the_default_stall_timeout_before_the_config_is_read_comes_from_the_environment(tmp_path, trained, command):
    job, to_exit, _ = frozen_at(tmp_path, trained, command, "command")
    stall = [line for line in job.stderr.splitlines() if line.startswith("distbp: stall:")]
    assert job.returncode != 0 and len(stall) == 1, job.stderr
    assert f"did not arrive at a collective of distbp {command} within train.stall_timeout={STARTUP} s" in stall[0]
    assert STARTUP <= to_exit < STARTUP + 15, job.stderr
    assert gone(fault_pid(job.stderr)), "the frozen rank outlived the job"


def test_startup_deadline_is_off_in_a_world_of_one_and_reads_the_environment(monkeypatch):
    assert startup.Deadline(5, {}).pid is None  # no launcher: nothing to wait for
    assert startup.Deadline(0, {"PMI_SIZE": "2"}).pid is None  # 0 = off
    assert startup.default_timeout({}) == startup.DEFAULT_TIMEOUT == TrainConfig.stall_timeout == 300
    assert startup.default_timeout({startup.TIMEOUT_ENV: "2.5"}) == 2.5
    for bad in ("x", "-1", "inf", "nan"):
        with pytest.raises(SystemExit) as e:
            startup.default_timeout({startup.TIMEOUT_ENV: bad})
        assert e.value.code == 2
    deadline = startup.Deadline(30, {"PMI_SIZE": "2", "PMI_RANK": "0"})
    assert deadline.pid is not None
    deadline.phase(1)
    deadline.disarm()  # the watcher exits at once and is reaped
    assert deadline._pipe is None
    with pytest.raises(ChildProcessError):
        os.waitpid(deadline.pid, 0)
