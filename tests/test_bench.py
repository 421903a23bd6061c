"""scripts/bench.py runs distbp's loop on a tiny workload and prints one valid JSON record (no timing asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
PHASES = {"data", "forward", "backward", "allreduce", "optimizer", "other", "step"}


def run_bench(*args) -> list[dict]:
    """The JSON lines bench.py prints, launched as a user would (it starts mpirun itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "DISTBP_BENCH"))}
    p = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True,
                       timeout=55)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), p.stdout
    return [json.loads(line) for line in lines]


def check_record(rec: dict, ranks: int):
    """The fields the README table and docs/PERFORMANCE.md are built from."""
    assert rec["workload"] == "W2" and rec["ranks"] == ranks and rec["threads"] == 1
    assert rec["samples_per_s"] > 0 and rec["floor_samples_per_s"] > 0 and rec["vs_floor"] > 0
    assert set(rec["step_ms"]) == PHASES and rec["step_ms"]["step"] > 0
    assert len(rec["peak_rss_mb"]) == ranks and min(rec["peak_rss_mb"]) > 0


def test_bench_one_rank_with_pytorch_if_installed():
    (rec,) = run_bench("W2", "--steps", "30", "--rounds", "1")
    check_record(rec, 1)
    try:
        import torch  # noqa: F401
    except ImportError:
        assert rec["torch"] is None
    else:
        assert rec["torch"] == "single" and rec["torch_samples_per_s"] > 0 and rec["vs_torch"] > 0


def test_bench_two_ranks_two_rounds_with_config_overrides():
    (rec,) = run_bench("W2", "--ranks", "2", "--steps", "30", "--rounds", "2", "--no-torch",
                       "--set", "optim.lr=0.02")
    check_record(rec, 2)
    assert rec["set"] == ["optim.lr=0.02"] and rec["torch"] is None and rec["vs_torch"] is None


def test_bench_conv_workload_and_its_floor_run():
    (rec,) = run_bench("W5", "--steps", "1", "--rounds", "1", "--no-torch")
    assert rec["workload"] == "W5" and rec["samples_per_s"] > 0 and rec["floor_samples_per_s"] > 0
    assert rec["step_ms"]["forward"] > 0 and rec["step_ms"]["backward"] > 0


def test_bench_layers_times_every_layer():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "DISTBP_BENCH"))}
    p = subprocess.run([sys.executable, str(BENCH), "W5", "--layers", "--rounds", "1"], env=env,
                       capture_output=True, text=True, timeout=55)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split()[2] for r in rows] == ["conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d",
                                           "flatten", "linear", "relu", "linear"]
    assert "| all |" in p.stdout and "| PyTorch fwd |" in p.stdout  # each layer beside PyTorch's (NaN without it)
