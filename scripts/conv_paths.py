"""Calibrate Conv2D's per-product path rules (nn/conv.py THIN_RATIO, WINOGRAD_CHANNELS) from paired timings.

    python scripts/conv_paths.py [--batch 128] [--pairs 7] > run1.jsonl   one JSON line per (shape, product), the fit
    python scripts/conv_paths.py --fit run1.jsonl run2.jsonl ...          the fit over several runs
    python scripts/conv_paths.py --winograd [--fit ...]                   the same for WINOGRAD_CHANNELS

With --winograd, each product of each 3x3 and 5x5 shape runs on Winograd's path and on the direct one
(alternated the same way), and the fit is the least channel count (min of the product's input and
output channels) from which taking Winograd's path gives the least summed log time over the shapes.

For each stride-1 convolution shape of the bench workloads (W5, W6, W6-plain, W7-resnet) and a few
more, each product (forward, dW, dx) runs on the copied-row path and on the views path, alternated
in one process on the same operands, one thread; a pair's time per path is the faster of two calls,
and a shape's time per path the median over the pairs. The fit, per product, is the threshold on
depth / rows (window depth kh*C, or kh*F for dx; output rows F, or C for dx) under which taking the
copied-row path gives the least time over the shapes, each shape counted alike (the sum of the logs of
the chosen path's time over the views path's, a shape's ratio the median over the runs): paste it into
THIN_RATIO. On a machine shared with other jobs one run's ratios swing by 1.5x; fit several runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np

SHAPES = [  # (C, F, kernel, H = W): W5, W6, W6-plain, W7-resnet's stride-1 convolutions, then others
    (1, 16, 5, 28), (16, 32, 5, 14), (3, 32, 3, 32), (32, 32, 3, 32), (32, 64, 3, 16), (64, 64, 3, 16),
    (3, 16, 3, 32), (16, 32, 3, 16), (32, 32, 3, 16), (32, 64, 3, 8), (16, 16, 3, 32), (64, 64, 3, 8),
    (8, 16, 3, 16), (64, 128, 3, 8), (128, 128, 3, 8), (8, 64, 3, 16),
    (8, 16, 5, 14), (16, 16, 5, 28), (32, 32, 5, 14), (32, 64, 5, 8), (64, 64, 5, 8),
]


def best_of_two(f) -> float:
    """Seconds of the faster of two calls of f."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def products(C: int, F: int, k: int, H: int, batch: int) -> tuple:
    """The layer of a padded stride-1 convolution of (C, H, H) inputs and {product: (function, depth, rows)}."""
    from distbp.nn import Sequential
    layer = Sequential([{"type": "conv2d", "out_channels": F, "kernel": k, "padding": k // 2}], (C, H, H)).layers[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, C, H, H)).astype(np.float32)
    dy = rng.standard_normal((batch, F, layer.Ho, layer.Wo)).astype(np.float32)
    dy_rows = np.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(F, layer.Ho, -1)
    layer.forward(x)

    def weights():
        layer.need_dx = False
        layer.backward(dy)

    return layer, {"forward": (lambda: layer.forward(x), k * C, F), "dW": (weights, k * C, F),
                   "dx": (lambda: layer._dx_flipped(dy_rows), k * F, C)}


def measure(batch: int, pairs: int):
    """JSON-ready records: per shape and product, median ms on each path."""
    from distbp.nn import conv
    saved = dict(conv.THIN_RATIO)
    for C, F, k, H in SHAPES:
        for product, (f, depth, rows) in products(C, F, k, H, batch)[1].items():
            ms = {"rows": [], "views": []}
            for _ in range(pairs):
                for path, ratio in (("rows", float("inf")), ("views", 0)):
                    conv.THIN_RATIO[product] = ratio
                    ms[path].append(1e3 * best_of_two(f))
            conv.THIN_RATIO.update(saved)
            yield {"C": C, "F": F, "kernel": k, "H": H, "batch": batch, "product": product, "depth": depth,
                   "rows": rows, "rows_ms": round(statistics.median(ms["rows"]), 3),
                   "views_ms": round(statistics.median(ms["views"]), 3)}


def measure_winograd(batch: int, pairs: int):
    """JSON-ready records: per 3x3 and 5x5 shape and product, median ms on Winograd's path and on the direct one."""
    from distbp.nn import winograd
    for C, F, k, H in SHAPES:
        if k not in winograd.FORMS:
            continue
        layer, timed = products(C, F, k, H, batch)
        for product, (f, *_) in timed.items():
            ms = {"winograd": [], "direct": []}
            for _ in range(pairs):
                for path in ms:
                    layer.winograd = layer.winograd_dx = path == "winograd"
                    if product == "dW":  # dW reads what forward kept: the direct path's padded copy, or x
                        timed["forward"][0]()
                    ms[path].append(1e3 * best_of_two(f))
            inputs, outputs = (F, C) if product == "dx" else (C, F)
            yield {"C": C, "F": F, "kernel": k, "H": H, "batch": batch, "product": product,
                   "channels": min(inputs, outputs),
                   "winograd_ms": round(statistics.median(ms["winograd"]), 3),
                   "direct_ms": round(statistics.median(ms["direct"]), 3)}


def fit_winograd(records: list[dict]) -> dict:
    """The channel threshold (Winograd's path at or above it, every product) with the least summed log time ratio."""
    shapes = {}
    for r in records:
        shapes.setdefault((r["C"], r["F"], r["kernel"], r["H"], r["product"], r["channels"]), []).append(
            r["winograd_ms"] / r["direct_ms"])
    ratio = {key: statistics.median(v) for key, v in shapes.items()}  # Winograd / direct, per shape and product

    def cost(t):
        return sum(math.log(q) for key, q in ratio.items() if key[-1] >= t)

    best = min(sorted({key[-1] for key in ratio}) + [math.inf], key=lambda t: (round(cost(t), 9), -t))
    return {"channels": best, "shapes": len(ratio), "time_vs_all_direct": round(math.exp(cost(best) / len(ratio)), 3),
            "ratios": {f"{C}-{F}-{H} {k}x{k} {product}": round(q, 3)
                       for (C, F, k, H, product, _), q in sorted(ratio.items())}}


def fit(records: list[dict]) -> dict:
    """Per product, the depth / rows threshold (copied rows at or under it) with the least summed log time ratio."""
    out = {}
    for product in sorted({r["product"] for r in records}):
        shapes = {}
        for r in records:
            if r["product"] == product:
                shapes.setdefault((r["depth"], r["rows"], r["C"], r["H"]), []).append(r["rows_ms"] / r["views_ms"])
        ratio = {key: statistics.median(v) for key, v in shapes.items()}  # copied rows / views, per shape

        def cost(t):
            return sum(math.log(q) for (depth, rows, *_), q in ratio.items() if depth <= t * rows)

        best = min([0.0] + sorted({d / r for d, r, *_ in ratio}), key=lambda t: (round(cost(t), 9), t))
        out[product] = {"ratio": round(best, 4), "shapes": len(ratio),
                        "time_vs_all_views": round(math.exp(cost(best) / len(ratio)), 3),
                        "copied_rows_at": sorted(f"{d}/{r}" for d, r, *_ in ratio if d <= best * r)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--fit", nargs="+", metavar="JSONL", help="fit the records of earlier runs instead of measuring")
    p.add_argument("--winograd", action="store_true", help="calibrate WINOGRAD_CHANNELS instead of THIN_RATIO")
    args = p.parse_args(argv)
    fitter, measurer = (fit_winograd, measure_winograd) if args.winograd else (fit, measure)
    if args.fit:
        records = [json.loads(line) for path in args.fit for line in open(path) if '"product"' in line]
        print(json.dumps({"fit": fitter(records), "runs": len(args.fit)}))
        return 0
    from threadpoolctl import threadpool_limits
    records = []
    with threadpool_limits(1, user_api="blas"):
        for r in measurer(args.batch, args.pairs):
            print(json.dumps(r), flush=True)
            records.append(r)
    print(json.dumps({"fit": fitter(records), "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
