"""Predict distbp's step time and scaling efficiency on N nodes from measured compute and a link's alpha-beta cost.

    python scripts/scale_model.py measure --nodes 2 --link 1gbit   allreduce alpha and bandwidth on the emulated
                                                                   cluster (root; one JSON line)
    python scripts/scale_model.py validate LINKS.jsonl RUN.jsonl ...  predicted vs measured step of bench.py
                                                                   --nodes records, on the measured links
    python scripts/scale_model.py table RUN.jsonl                  8..256 nodes on 10/25/100 GbE, from one record

The cost of allreducing n bytes over P ranks whose nodes are joined by links of bandwidth B
(bytes/s each way) and latency alpha (s per message) is the better of MPI's two large-message
algorithms: ring, 2(P-1) alpha + 2 (P-1)/P n/B, and recursive halving and doubling
(Rabenseifner's "tree"), 2 log2(P) alpha + 2 (P-1)/P n/B. Blocking, a step is
forward + backward + allreduce(all gradient bytes) + optimizer. Overlapped (train.overlap),
bucket k's allreduce starts when backward has finished it (its layers' measured share of the
backward; a linear or convolution layer's gradients are final half-way through its backward, before
its dx product) and after bucket k-1's, on one link: the step is forward + max(backward, end of the
last bucket) + optimizer. Compute is measured: forward + backward per row from a bench record of
the same workload (its blocking run), the per-layer shares of backward from `bench.py --layers`'
timing loop; the optimizer step (replicated) is per step. Ranks of a node share its link: ring
order puts one inter-node hop per node, so R ranks per node change P, not the bytes per link.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the workloads and the per-layer timing loop)

# Links of the table: bandwidth in bytes/s each way, MPI-over-TCP latency (assumed typical values, not measured here)
LINKS = {"10 GbE": (10e9 / 8, 20e-6), "25 GbE": (25e9 / 8, 10e-6), "100 GbE": (100e9 / 8, 5e-6)}
SIZES = (2**13, 2**17, 2**20, 2**23)  # bytes allreduced by `measure`
NODES = (8, 16, 32, 64, 128, 256)


def allreduce_s(nbytes: float, p: int, bw: float, alpha: float) -> float:
    """Seconds to allreduce nbytes over p ranks: the better of ring and recursive halving/doubling."""
    if p < 2:
        return 0.0
    volume = 2 * (p - 1) / p * nbytes / bw
    return min(2 * (p - 1) * alpha, 2 * math.ceil(math.log2(p)) * alpha) + volume


def step_s(fwd: float, bwd: float, opt: float, buckets, p: int, bw: float, alpha: float, overlap: bool) -> float:
    """Step seconds; buckets = [(bytes, fraction of backward done when it is ready)] in reduction order."""
    if not overlap:
        return fwd + bwd + allreduce_s(sum(b for b, _ in buckets), p, bw, alpha) + opt
    end = 0.0
    for nbytes, ready in buckets:
        end = max(end, ready * bwd) + allreduce_s(nbytes, p, bw, alpha)
    return fwd + max(bwd, end) + opt


def buckets_of(workload: str, bucket_mb: float = 1.0, rows: int = 128) -> list[tuple[float, float]]:
    """(bytes, backward fraction done when ready) of each bucket of the workload, from measured layer times."""
    from distbp.nn.conv import Conv2D
    from distbp.nn.layers import Linear
    from distbp.parallel.buckets import layer_spans, model_buckets
    model, times = bench.unit_times(bench.WORKLOADS[workload], rounds=3, threads=1, batch=rows)
    top = [i for i, (_, key, _) in enumerate(model.units) if len(key) == 1]  # the top-level layers, in order
    back = np.median(times, axis=0)[top, 1]
    spans = layer_spans(model.offsets)

    # backward runs from the last layer down; a linear or convolution layer above the first one with
    # parameters has its gradients final half-way, before its dx product (about its weight gradient's
    # cost), and a piece of a cut linear layer once the weight rows up to its end are
    def ready(b):
        i = b.first
        weight = 0.5 if isinstance(model.layers[i], (Linear, Conv2D)) and i > model.chain.first_param else 1.0
        part = b.need / (spans[i][1] - spans[i][0]) if b.need else 1.0
        return (back[i + 1:].sum() + weight * part * back[i]) / back.sum()
    return [((b.hi - b.lo) * model.grads.itemsize, ready(b)) for b in model_buckets(model, bucket_mb)]


def fit_link(sizes, seconds, p: int) -> tuple[float, float]:
    """(bytes/s, alpha) from allreduce times of sizes over p ranks: least squares of t = c alpha + 2 (p-1)/p n / B."""
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    hops = min(2 * (p - 1), 2 * math.ceil(math.log2(p)))
    return 2 * (p - 1) / p / slope, max(intercept, 0.0) / hops


def measure_worker() -> dict | None:
    """Under mpiexec: median seconds of 15 blocking allreduces of each of SIZES (float32), and the fit (rank 0)."""
    from distbp.parallel.comm import world
    comm, times = world(), []
    for nbytes in SIZES:
        buf, runs = np.ones(nbytes // 4, np.float32), []
        for _ in range(16):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_sum(buf)
            runs.append(np.array([time.perf_counter() - t0]))
        times.append(float(np.median([comm.allreduce_max(t)[0] for t in runs[1:]])))
    bw, alpha = fit_link(SIZES, times, comm.size)
    return None if not comm.is_root else {"ranks": comm.size, "sizes": SIZES, "seconds": times, "bytes_per_s": bw, "alpha_s": alpha,
            "load_avg_1min": round(os.getloadavg()[0], 1)}


def measure(nodes: int, link: str) -> dict:
    """Run measure_worker on the emulated cluster (1 rank per node); its record with nodes and link."""
    with bench.emulated_cluster(nodes, link, nodes) as mpirun:
        cmd = [*shlex.split(mpirun), "-n", str(nodes), sys.executable, "-m", "mpi4py", __file__, "measure-worker"]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=600, check=True).stdout
    rec = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    return {**rec, "nodes": nodes, "link": link or "unshaped"}


def link_of(record: dict, links: list[dict]) -> tuple[float, float]:
    """(bytes/s, alpha) measured on the link and node count of a bench record (the `measure` record of both)."""
    found = [m for m in links if (m["link"], m["nodes"]) == (record.get("link"), record.get("nodes"))]
    if not found:
        raise SystemExit(f"no `measure` record for {record.get('nodes')} nodes at link {record.get('link')}: run "
                         "scale_model.py measure first")
    return found[0]["bytes_per_s"], found[0]["alpha_s"]


def compute_of(record: dict) -> tuple[float, float, float, int]:
    """(forward, backward, optimizer + the rest) seconds of the blocking run of a record, and rows per rank."""
    ms = record["default_step_ms"] or record["step_ms"]
    rows = bench.WORKLOADS[record["workload"]].batch // record["ranks"]
    rest = ms["optimizer"] + ms["data"] + ms["other"]
    return ms["forward"] / 1e3, ms["backward"] / 1e3, rest / 1e3, rows


def validate(records: list[dict], links: list[dict]) -> str:
    """Markdown: predicted vs measured step ms, blocking and overlapped, of each record."""
    rows = ["| workload | nodes | link | blocking: measured / predicted ms | overlapped: measured / predicted ms "
            "| error blocking, overlapped |", "|---|---|---|---|---|---|"]
    for r in records:
        bw, alpha = link_of(r, links)
        fwd, bwd, rest, per_rank = compute_of(r)
        buckets = buckets_of(r["workload"], rows=per_rank)
        p = r["ranks"]
        pred_off = 1e3 * step_s(fwd, bwd, rest, buckets, p, bw, alpha, False)
        pred_on = 1e3 * step_s(fwd, bwd, rest, buckets, p, bw, alpha, True)
        off, on = r["default_step_ms"]["step"], r["step_ms"]["step"]
        rows.append(f"| {r['workload']} | {r.get('nodes', 1)} | {r.get('link', '-')} | {off:.1f} / {pred_off:.1f} | "
                    f"{on:.1f} / {pred_on:.1f} | {pred_off / off - 1:+.0%}, {pred_on / on - 1:+.0%} |")
    return "\n".join(rows)


def table(record: dict, global_batch: int, per_rank: int, row_ms: float = 0, rest_ms: float = 0,
          ranks_per_node: int = 1) -> str:
    """Markdown: predicted efficiency at 8..256 nodes of R ranks on each link, global and per-rank batch fixed;
    row_ms, rest_ms: compute per row and per step measured elsewhere (a quiet machine) instead of the record's."""
    fwd, bwd, rest, rows = compute_of(record)
    per_row = row_ms / 1e3 if row_ms else (fwd + bwd) / rows
    rest = rest_ms / 1e3 if rest_ms else rest
    buckets = buckets_of(record["workload"], rows=per_rank)
    where = "given" if row_ms else (f"measured: {record.get('nodes', 1)} nodes, {record.get('link', '-')}, "
                                    f"load {record.get('load_avg_1min')}")
    r = ranks_per_node
    out = [f"{record['workload']}, {r} rank(s) per node: forward+backward {1e3 * per_row:.3f} ms per row, optimizer and rest "
           f"{1e3 * rest:.2f} ms per step ({where}); efficiency blocking / overlapped",
           "| nodes | " + " | ".join(f"{name}, global batch {global_batch}" for name in LINKS) + " | "
           + " | ".join(f"{name}, {per_rank} rows per rank" for name in LINKS) + " |",
           "|---|" + "---|" * (2 * len(LINKS))]
    f_share = fwd / (fwd + bwd)
    for n in NODES:
        cells = []
        for rows_per_rank, fixed_global in ((global_batch / (n * r), True), (per_rank, False)):
            c = per_row * rows_per_rank
            one = per_row * (global_batch if fixed_global else per_rank) + rest  # one rank, no communication
            for bw, alpha in LINKS.values():
                off, on = (step_s(c * f_share, c * (1 - f_share), rest, buckets, n * r, bw, alpha, o)
                           for o in (False, True))
                ideal = one / (n * r) if fixed_global else one
                cells.append(f"{ideal / off:.0%} / {ideal / on:.0%}")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    """validate or table, from bench.py --nodes records (JSON lines)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("measure", "measure-worker", "validate", "table"))
    p.add_argument("records", nargs="*", help="JSON-line files: bench.py --nodes records, and measure records")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--link", default="")
    p.add_argument("--workload", default="W1-rep-ovl", help="table: the record of this workload")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--per-rank", type=int, default=128)
    p.add_argument("--row-ms", type=float, default=0, help="table: forward+backward ms per row (default: the record's)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="table: R ranks per node (P = N R)")
    p.add_argument("--rest-ms", type=float, default=0, help="table: optimizer and other ms per step (default: the "
                   "record's)")
    args = p.parse_args(argv)
    if args.mode == "measure-worker":
        rec = measure_worker()
        if rec:
            print(json.dumps(rec), flush=True)
        return 0
    if args.mode == "measure":
        print(json.dumps(measure(args.nodes, args.link)), flush=True)
        return 0
    lines = [json.loads(line) for f in args.records for line in Path(f).read_text().splitlines()
             if line.startswith("{")]
    records = [r for r in lines if r.get("default_step_ms")]
    if args.mode == "validate":
        print(validate(records, [r for r in lines if "alpha_s" in r]))
    else:
        print(table(next(r for r in records if r["workload"] == args.workload), args.global_batch, args.per_rank,
                    args.row_ms, args.rest_ms, args.ranks_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
