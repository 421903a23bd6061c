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


CONV_PATHS = Path(__file__).resolve().parents[1] / "scripts" / "conv_paths.py"


def test_conv_paths_fits_the_threshold_that_takes_the_copied_rows_where_they_won(tmp_path):
    """The calibration's fit over two recorded runs: per product, the depth/rows threshold below which the copied-row
    path was faster (a shape's ratio the median over the runs); then one tiny real run prints records and a fit."""
    def rec(product, depth, rows, ratio):
        return {"product": product, "depth": depth, "rows": rows, "C": depth, "H": 8, "rows_ms": ratio, "views_ms": 1.0}
    runs = [[rec("forward", 3, 16, 0.5), rec("forward", 16, 16, 0.8), rec("forward", 64, 16, 1.3),
             rec("dx", 9, 3, 1.2)],
            [rec("forward", 3, 16, 0.6), rec("forward", 16, 16, 1.5), rec("forward", 64, 16, 1.2),
             rec("dx", 9, 3, 1.1)]]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in run))
    out = subprocess.run([sys.executable, str(CONV_PATHS), "--fit", *map(str, paths)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    fit = json.loads(out)["fit"]
    assert fit["forward"]["ratio"] == 3 / 16 and fit["forward"]["copied_rows_at"] == ["3/16"]  # 16/16: median 1.15
    assert fit["dx"]["ratio"] == 0 and fit["dx"]["copied_rows_at"] == []
    sys.path.insert(0, str(CONV_PATHS.parent))
    try:
        import conv_paths
    finally:
        sys.path.remove(str(CONV_PATHS.parent))
    conv_paths.SHAPES = [(2, 4, 3, 5)]
    records = list(conv_paths.measure(batch=2, pairs=1))
    assert {r["product"] for r in records} == {"forward", "dW", "dx"} and all(r["rows_ms"] > 0 for r in records)


def test_conv_paths_fits_the_winograd_channel_count_where_winograd_won(tmp_path):
    """--winograd: the least channel count from which Winograd's path gives the least summed log time (a shape's
    ratio the median over the runs); then one tiny real run prints records of both paths for the three products."""
    def rec(C, F, product, ratio):
        channels = min(C, F)
        return {"C": C, "F": F, "kernel": 3 if product == "forward" else 5, "H": 8, "product": product,
                "channels": channels, "winograd_ms": ratio, "direct_ms": 1.0}
    runs = [[rec(3, 32, "forward", 1.5), rec(16, 32, "forward", 1.1), rec(32, 32, "forward", 0.8),
             rec(64, 64, "dx", 0.6)],
            [rec(3, 32, "forward", 1.4), rec(16, 32, "forward", 0.95), rec(32, 32, "forward", 0.9),
             rec(64, 64, "dx", 0.7)]]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in run))
    out = subprocess.run([sys.executable, str(CONV_PATHS), "--winograd", "--fit", *map(str, paths)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    fit = json.loads(out)["fit"]
    assert fit["channels"] == 32 and fit["shapes"] == 4  # 16 channels: median 1.025, slower
    assert fit["ratios"]["16-32-8 3x3 forward"] == 1.025 and fit["ratios"]["64-64-8 5x5 dx"] == 0.65
    sys.path.insert(0, str(CONV_PATHS.parent))
    try:
        import conv_paths
    finally:
        sys.path.remove(str(CONV_PATHS.parent))
    conv_paths.SHAPES = [(2, 4, 3, 5), (2, 4, 1, 5), (2, 4, 5, 6)]  # the 1x1 shape is not Winograd's: skipped
    records = list(conv_paths.measure_winograd(batch=2, pairs=1))
    assert [(r["kernel"], r["product"]) for r in records] == [(k, p) for k in (3, 5) for p in ("forward", "dW", "dx")]
    assert all(r["winograd_ms"] > 0 and r["direct_ms"] > 0 for r in records)
