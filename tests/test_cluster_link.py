"""scripts/cluster.sh start --link RATE[,DELAY]: shaped node links, measured; stop leaves nothing behind.

Needs root, like tests/test_cluster.py (skipped with the reason otherwise; DISTBP_REQUIRE_SLURM=1 fails instead).
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_jobs import REPO, cluster_lock, require_root_and_apt

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

CLUSTER = REPO / "scripts" / "cluster.sh"
PROBE = REPO / "scripts" / "link_probe.py"
RATE_BITS, RATE = 200e6, "200mbit"


def cluster(*args, timeout=300):
    """Run scripts/cluster.sh with args; the CompletedProcess."""
    return subprocess.run(["bash", CLUSTER, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def measured_bits_per_s(nbytes: int) -> float:
    """TCP throughput from n1 to n2, timed by the receiver (scripts/link_probe.py)."""
    port = 5990
    server = subprocess.Popen(["bash", CLUSTER, "exec", "n2", sys.executable, PROBE, "serve", str(port), str(nbytes)],
                              stdout=subprocess.PIPE, text=True)
    try:
        sent = cluster("exec", "n1", sys.executable, PROBE, "send", "n2", port, nbytes, timeout=60)
        assert sent.returncode == 0, sent.stderr
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    return json.loads(out)["bits_per_s"]


def holders() -> list[str]:
    """PIDs of the processes that keep the nodes' namespaces alive (their pid files)."""
    return [p.read_text().strip() for p in Path("/var/tmp/distbp-cluster").glob("*/holder.pid")]


def running(pid: str) -> bool:
    """Whether process pid exists and is not a zombie (PID 1 reaps late here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_shaped_link_gives_the_rate_and_stop_leaves_no_qdisc_namespace_or_process():
    require_root_and_apt("scripts/cluster.sh")
    with cluster_lock():
        was_running = cluster("status").returncode == 0
        try:
            r = cluster("start", "--nodes", 2, "--link", f"{RATE},5ms")
            if r.returncode:  # netem missing from the kernel: one message naming it, the links unshaped
                assert "could not add netem" in r.stderr and "HINT: --link 200mbit" in r.stderr, r.stderr
            r = cluster("start", "--nodes", 2, "--link", RATE)
            assert r.returncode == 0, r.stdout + r.stderr
            status = cluster("status").stdout
            assert "links: 200mbit" in status
            assert len(re.findall(r"n[12]: \S+ link UP \(tbf rate 200Mbit", status)) == 2, status
            assert measured_bits_per_s(int(RATE_BITS / 8)) == pytest.approx(RATE_BITS, rel=0.2)

            pids = holders()
            assert len(pids) == 3  # head, n1, n2
            r = cluster("stop")
            assert r.returncode == 0, r.stderr
            assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                    text=True).stdout.split() if ns.startswith("distbp-")]
            time.sleep(0.5)
            assert not [p for p in pids if running(p)], "a node's holder outlived stop"
            assert "tbf" not in subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
        finally:
            if was_running:  # as the other cluster tests expect it: unshaped
                cluster("start", "--nodes", 2)
            else:
                cluster("stop")
