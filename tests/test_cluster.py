"""distbp across the nodes of an emulated cluster (scripts/cluster.sh start --nodes 2).

MPI without SLURM (mpiexec with scripts/cluster_ssh.sh standing in for ssh) and SLURM
(`sbatch -N 2 -n 4`) across two nodes with their own network, hostname, shared memory and
/tmp; a node whose processes all die; a node whose link is cut; paths one node lacks.
Needs root (the script installs Debian packages, makes namespaces and starts daemons); without
it the tests are skipped with the reason, and DISTBP_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MPIRUN, job_env as mpi_env
from distbp.files import checkpoint as ckpt
from distbp.datasets.dataset import digits_path, write_dataset
from slurm_jobs import (REPO, TRAIN_SBATCH, checkpoint_steps, cluster_lock, job_env, job_info, log_text,
                        preempt_and_requeue, read_arrays, require_root_and_apt, sbatch, unavailable, wait_done,
                        wait_for)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

CLUSTER = REPO / "scripts" / "cluster.sh"
SSH = REPO / "scripts" / "cluster_ssh.sh"
NODES = ("n1", "n2")
STALL = 8  # train.stall_timeout of the failure tests
STEPS = 600  # long enough for a failure or a signal to land mid-run, short for the resumed rest
EVERY = 50
RUN_ARGS = ["digits", "--set", f"train.max_steps={STEPS}", "--set", "train.epochs=1000",
            "--set", f"checkpoint.every_steps={EVERY}", "--set", f"train.stall_timeout={STALL}"]
RANK_TABLE = re.compile(r"ranks \(rank=pid@host\): (.*)")


def cluster_cmd(*args, timeout=120):
    """Run scripts/cluster.sh with args; the CompletedProcess."""
    return subprocess.run(["bash", CLUSTER, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """The emulated 2-node cluster for this module; stopped afterwards if this fixture started it."""
    require_root_and_apt("scripts/cluster.sh")
    with cluster_lock():
        was_running = cluster_cmd("status").returncode == 0
        r = cluster_cmd("start", "--nodes", len(NODES), timeout=600)
        if r.returncode:
            unavailable(f"scripts/cluster.sh start failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        yield
        if not was_running:
            cluster_cmd("stop")


def job_processes(node):
    """'pid args' of the distbp ranks and MPI launcher processes running on node."""
    pids = subprocess.run(["ip", "netns", "pids", f"distbp-{node}"], capture_output=True, text=True).stdout.split()
    ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-p", ",".join(pids) or "0"],
                        capture_output=True, text=True).stdout
    alive = [line.split(None, 2) for line in ps.splitlines() if line.strip()]
    return [f"{pid} {args}" for pid, stat, args in alive
            if not stat.startswith("Z") and ("distbp" in args or "hydra_pmi_proxy" in args)]


@pytest.fixture
def shared(cluster):
    """A folder every node sees (nodes have their own /tmp); after the test, no job process may be left."""
    folder = Path(tempfile.mkdtemp(prefix="distbp-cluster-test-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    try:
        wait_for(lambda: not any(job_processes(n) for n in NODES), 30, "the job's processes on every node to end")
    finally:
        left = [p for n in NODES for p in job_processes(n)]
        for line in left:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        r = cluster_cmd("start", "--nodes", len(NODES), timeout=300)  # revive a node a test took down
        assert r.returncode == 0, r.stderr
    assert not left, f"processes outlived the test: {left}"


def mpirun_on(hosts, n, args, cwd, popen=False, **env):
    """`mpiexec` run on hosts[0] across hosts (n ranks, n / len(hosts) per node) with the ssh stand-in."""
    cmd = ["bash", CLUSTER, "exec", hosts[0], MPIRUN, "-launcher", "ssh", "-launcher-exec", SSH,
           "-hosts", ",".join(hosts), "-ppn", n // len(hosts), "-n", n, sys.executable, *args]
    kwargs = dict(cwd=cwd, env=mpi_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if popen:
        return subprocess.Popen(list(map(str, cmd)), **kwargs)
    return subprocess.run(list(map(str, cmd)), timeout=240, **kwargs)


def train_on(hosts, n, run_dir, *args, **kw):
    """distbp train of the default config in run_dir, run by mpirun_on."""
    return mpirun_on(hosts, n, ["-m", "distbp", "train", *args, "--run-dir", run_dir], run_dir.parent, **kw)


def hosts_of(log: str) -> list[str]:
    """The host of each rank in a run's rank table, in rank order."""
    table = RANK_TABLE.search(log)
    assert table, log
    return [entry.split("@")[1] for entry in table[1].split()]


def final_arrays(run_dir, step):
    """Parameters and optimizer state of the checkpoint at step."""
    return read_arrays(Path(run_dir) / "checkpoints" / ckpt.checkpoint_name(step))


def assert_newest_checkpoint_intact(run_dir):
    """The newest checkpoint file loads and verifies (no fallback to an older one)."""
    newest = max(checkpoint_steps(run_dir))
    assert ckpt.load(Path(run_dir) / "checkpoints" / ckpt.checkpoint_name(newest)).attrs["step"] == newest
    return newest


# --- the same training on two nodes as on one ---------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
def test_two_nodes_train_to_the_parameters_of_one_node(shared, deterministic):
    steps = 40
    args = ["--set", f"train.max_steps={steps}", "--set", f"train.deterministic={str(deterministic).lower()}"]
    two, one = train_on(NODES, 4, shared / "two", *args), train_on(NODES[:1], 4, shared / "one", *args)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-3000:]
    assert hosts_of(two.stdout) == ["n1", "n1", "n2", "n2"]
    assert hosts_of(one.stdout) == ["n1"] * 4
    got, want = final_arrays(shared / "two", steps), final_arrays(shared / "one", steps)
    assert got.keys() == want.keys() and got
    for name in want:
        if deterministic:
            assert got[name].tobytes() == want[name].tobytes(), name
        else:  # the rank-invariance tolerance of test_train: the sum's order may differ
            scale = np.abs(want[name]).max()
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


PROBE = """
import json, sys
from pathlib import Path
import numpy as np
from distbp.parallel.comm import own_cpus, world
from distbp.parallel.threads import set_thread_budget
from distbp.datasets.dataset import Dataset

def pss_kb(lo, hi):
    '''Proportional set size of this process's mappings overlapping [lo, hi).'''
    total, inside = 0, False
    for line in open('/proc/self/smaps'):
        head = line.split()[0]
        if '-' in head and ':' not in head:
            start, end = (int(a, 16) for a in head.split('-'))
            inside = start < hi and end > lo
        elif head == 'Pss:' and inside:
            total += int(line.split()[1])
    return total

comm = world()
threads = set_thread_budget(comm, log=lambda line: None)
split = Dataset(sys.argv[1]).split('train')
assert split.load(2**30, comm)
x = split._x
checksum = float(x.sum(dtype=np.float64))  # every rank touches every page
comm.barrier()
pss = pss_kb(x.ctypes.data, x.ctypes.data + x.nbytes)
comm.barrier()  # the pages stay mapped until every rank has measured
report = dict(rank=comm.rank, host=comm.host, local_size=comm.local_size, cpus=len(own_cpus()),
              threads=threads, pss_kb=pss, nbytes=x.nbytes, checksum=checksum)
(Path(sys.argv[2]) / f"{comm.rank}.json").write_text(json.dumps(report))  # not stdout: lines of ranks interleave
"""


@pytest.mark.parametrize("per_node", [2, 1])
def test_data_held_once_per_node_and_blas_threads_per_node(shared, per_node):
    rows, features = 8192, 128  # 4 MiB of float32
    rng = np.random.default_rng(0)
    data = write_dataset(shared / "data.h5", {"train": (rng.standard_normal((rows, features), np.float32),
                                                        np.arange(rows) % 4)}, num_classes=4)
    probe = shared / "probe.py"
    probe.write_text(PROBE)
    env = {k: "" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}  # distbp's budget
    r = mpirun_on(NODES, 2 * per_node, [probe, data, shared], shared, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(shared.glob("*.json"))]
    assert sorted(rep["host"] for rep in reports) == sorted(NODES * per_node)
    nbytes_kb = rows * features * 4 / 1024
    for node in NODES:
        on_node = [rep for rep in reports if rep["host"] == node]
        node_kb = sum(rep["pss_kb"] for rep in on_node)
        if per_node > 1:  # one copy per node: the ranks' shares of the shared pages add up to the array once
            assert node_kb == pytest.approx(nbytes_kb, rel=0.02, abs=8), on_node
        else:  # a rank alone holds it in its own memory (its mapping may hold more than the array)
            assert node_kb >= nbytes_kb, on_node
        for rep in on_node:
            assert rep["local_size"] == per_node
            assert rep["threads"] == max(1, rep["cpus"] // per_node), rep  # the budget of this node alone
    assert len({rep["checksum"] for rep in reports}) == 1


# --- SLURM across the nodes ---------------------------------------------------------------------


def test_sbatch_two_nodes_preempt_requeue_resume_matches_uninterrupted_run(shared):
    ref_dir, ref_out = shared / "ref", shared / "ref.out"
    # -N 2 -n 4 on nodes of 2 CPUs: the reference runs first, the other job waits for the nodes
    ref = sbatch("-N", 2, "-n", 4, "-o", ref_out, TRAIN_SBATCH, *RUN_ARGS, cwd=shared,
                 env=job_env(DISTBP_RUN_DIR=str(ref_dir)))
    out = shared / "preempted.out"
    job = sbatch("-N", 2, "-n", 4, "-o", out, TRAIN_SBATCH, *RUN_ARGS, cwd=shared)
    run_dir = shared / "runs" / f"slurm-{job}"
    ref_info = wait_done(ref, 180, ref_out)
    assert (ref_info["JobState"], ref_info["ExitCode"]) == ("COMPLETED", "0:0"), log_text(ref_out)
    assert hosts_of(log_text(ref_out)) == ["n1", "n1", "n2", "n2"]  # 2 tasks per node

    stop_step = preempt_and_requeue(job, run_dir, out, 120)
    assert EVERY < stop_step < STEPS, f"no checkpoint at the signal ({checkpoint_steps(run_dir)})"
    info = wait_done(job, 180, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log_text(out)
    assert f"resumed from {run_dir}/checkpoints/{ckpt.checkpoint_name(stop_step)}" in log_text(out)
    got, want = final_arrays(run_dir, STEPS), final_arrays(ref_dir, STEPS)
    assert got.keys() == want.keys() and got
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def kill_node(node):
    """SIGKILL every process of node (what keeps its namespaces alive aside), as if it lost power."""
    holder = Path(os.environ.get("DISTBP_CLUSTER_DIR", "/var/tmp/distbp-cluster"), node, "holder.pid").read_text()
    pids = subprocess.run(["ip", "netns", "pids", f"distbp-{node}"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        if pid != holder.strip():
            os.kill(int(pid), signal.SIGKILL)


def test_dead_node_ends_the_job_by_name_and_it_resumes_on_the_other(shared):
    out = shared / "job.out"
    job = sbatch("-N", 2, "-n", 4, "-o", out, TRAIN_SBATCH, *RUN_ARGS, cwd=shared)
    run_dir = shared / "runs" / f"slurm-{job}"
    wait_for(lambda: checkpoint_steps(run_dir), 120, f"a first checkpoint in {run_dir}; log:\n{log_text(out)}")
    kill_node("n2")  # its slurmd, slurmstepd and ranks 2 and 3
    t0 = time.monotonic()
    wait_for(lambda: job_info(job)["JobState"] != "RUNNING", STALL + 40,
             f"job {job} to end; log:\n{log_text(out)}")
    ended = time.monotonic() - t0
    log = log_text(out)
    # distbp's watchdog names the ranks and their node ("did not arrive"), unless MPICH over UCX
    # segfaults first on a survivor (about 1 run in 3): then the other survivor, stopped by srun,
    # names them in its SIGTERM message ("do not answer"), or SLURM names the node. A survivor that
    # segfaulted or is slow on a loaded machine is named beside them ("rank(s) 0 on n1, 2, 3 on n2").
    named = re.search(r"rank\(s\) (\S+ on n1, )?2, 3 on n2 (did not arrive|do not answer)", log)
    assert named or "Node failure on n2" in log, log
    assert hosts_of(log) == ["n1", "n1", "n2", "n2"]
    assert ended < STALL + 20, f"the job took {ended:.0f} s to end:\n{log}"
    newest = assert_newest_checkpoint_intact(run_dir)
    subprocess.run(["scancel", job], timeout=30)  # SLURM requeued it to wait for two nodes

    # The same script and arguments on the node left, at 2 ranks instead of 4.
    out2 = shared / "resumed.out"
    again = sbatch("-N", 1, "-n", 2, "-o", out2, TRAIN_SBATCH, *RUN_ARGS, cwd=shared,
                   env=job_env(DISTBP_RUN_DIR=str(run_dir)))
    info = wait_done(again, 180, out2)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n1"), log_text(out2)
    assert re.search(rf"resumed from .*{ckpt.checkpoint_name(newest)} at step {newest} .* written by 4 rank\(s\), "
                     r"now 2", log_text(out2)), log_text(out2)
    assert max(checkpoint_steps(run_dir)) == STEPS


# --- MPI without SLURM: a cut link, paths one node lacks -----------------------------------------


def test_cut_link_ends_the_ranks_on_both_sides(shared):
    run_dir = shared / "run"
    job = train_on(NODES, 4, run_dir, *RUN_ARGS, popen=True)
    try:
        wait_for(lambda: checkpoint_steps(run_dir), 120, f"a first checkpoint in {run_dir}")
        subprocess.run(["ip", "-n", "distbp-n2", "link", "set", "eth0", "down"], check=True)
        t0 = time.monotonic()
        _, stderr = job.communicate(timeout=STALL + 40)
        near = time.monotonic() - t0
        # the far side cannot hear the launcher: its own watchdog must end it
        wait_for(lambda: not job_processes("n2"), STALL + 40, f"the ranks on n2 to end: {job_processes('n2')}")
        far = time.monotonic() - t0
    finally:
        subprocess.run(["ip", "-n", "distbp-n2", "link", "set", "eth0", "up"], check=True)
        job.kill()
    assert job.returncode != 0
    assert "rank(s) 2, 3 on n2 did not arrive" in stderr, stderr
    assert near < STALL + 20 and far < STALL + 20, (near, far)
    newest = assert_newest_checkpoint_intact(run_dir)

    again = train_on(NODES[:1], 2, run_dir, *RUN_ARGS)  # the same command on the node left, 2 ranks
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {newest} " in again.stdout and "written by 4 rank(s), now 2" in again.stdout, again.stdout
    assert max(checkpoint_steps(run_dir)) == STEPS


def test_path_on_one_node_only_is_named_and_exits_2(shared):
    local = f"/tmp/distbp-test-{os.getpid()}"
    assert cluster_cmd("exec", "n1", "sh", "-c", f"mkdir -p {local} && cp {digits_path()} {local}/d.h5").returncode == 0
    try:
        cases = {"dataset": train_on(NODES, 4, shared / "run", "--set", f'data.path="{local}/d.h5"'),
                 "run directory": mpirun_on(NODES, 4, ["-m", "distbp", "train", "--run-dir", f"{local}/run"], shared)}
    finally:
        cluster_cmd("exec", "n1", "rm", "-rf", local)
    for what, r in cases.items():
        errors = [line for line in r.stderr.splitlines() if line.startswith("distbp: error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
        assert errors[0].startswith(f"distbp: error: on n2 (not on n1): {what} {local}"), errors[0]
