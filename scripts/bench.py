"""Benchmark distbp's own training loop beside PyTorch and the matmul-only floor; memory per rank.

    python scripts/bench.py W1 --ranks 2 --threads 1     one JSON line per workload
    python scripts/bench.py --all                         the README table (W1, W2, W5, W6, W6-plain at 1x1, 2x1, 1x2 ...)
    python scripts/bench.py --memory                      peak RSS per rank, in memory vs streamed, 100 MB..GB
    python scripts/bench.py W5 --layers                   forward and backward ms of each layer beside PyTorch's, one process
    python scripts/bench.py W8-char --kinds               forward and backward ms per layer kind (inside blocks too)

Without a launcher the script starts `mpirun -n RANKS` on itself; under mpirun it is the worker.
Each worker runs `rounds` interleaved rounds of (distbp, matmul floor, PyTorch) and reports
medians, and the ratios as medians of the per-round ratios (the machine is noisy: compare
only numbers measured in the same run). distbp runs through distbp.training.loop.run on a dataset
file written to a temporary folder; PyTorch is used only here, and only if importable.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
WORKER_ENV = "DISTBP_BENCH_WORKER"
WARMUP = 10  # steps before the steady state (distbp's StepTimer warm-up), unless the workload sets fewer


@dataclass(frozen=True)
class Workload:
    """A network (an MLP of `hidden` widths, or explicit layers), its data and steady-state steps per round."""
    what: str
    features: int = 784
    hidden: tuple = (1024, 1024)
    layers: tuple = ()  # model.layers specs; () = the MLP of `hidden`
    image: tuple = ()  # (C, H, W) of each input row when the layers take images; () = flat `features`
    classes: int = 10
    batch: int = 256
    dtype: str = "float32"
    rows: int = 16384  # synthetic rows; 0 = the digits shipped with distbp
    steps: int = 40
    torch_steps: int = 40
    extra: tuple = field(default=())  # --set overrides that are part of the workload
    default_of: str | None = None  # a workload whose default-mode run each round times too, for the cost
    warmup: int = WARMUP  # steps before the steady state
    text: str = ""  # a token dataset of the repository (relative path) instead of synthetic rows

    @property
    def input_shape(self) -> tuple:
        """Shape of one input row: (T,) token ids of a text workload."""
        if self.text:
            with h5py.File(ROOT / self.text, "r") as f:
                return f["train/x"].shape[1:]
        return self.image or (self.features,)

    def specs(self) -> list[dict]:
        """The layer specs distbp builds: `layers`, or the MLP distbp's train builds from `hidden`."""
        from distbp.nn import mlp_specs
        if self.text:  # the embedding's vocab is the dataset's, as distbp train fills it in
            with h5py.File(ROOT / self.text, "r") as f:
                vocab = int(f.attrs["vocab_size"])
            return [{**s, "vocab": vocab} if s["type"] == "embedding" else dict(s) for s in self.layers]
        return [dict(s) for s in self.layers] or mlp_specs([self.features, *self.hidden, self.classes])


def conv_block(channels: int, kernel: int, batchnorm: bool = False) -> tuple:
    """conv (padding keeps H, W), [BatchNorm,] ReLU."""
    conv = {"type": "conv2d", "out_channels": channels, "kernel": kernel, "padding": kernel // 2}
    return (conv, *([{"type": "batchnorm"}] if batchnorm else []), {"type": "relu"})


POOL, FLATTEN, RELU = {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "relu"}
LENET = (*conv_block(16, 5), POOL, *conv_block(32, 5), POOL, FLATTEN,
         {"type": "linear", "out": 128}, RELU, {"type": "linear", "out": 10})
CIFAR = (*conv_block(32, 3, True) * 2, POOL, *conv_block(64, 3, True) * 2, POOL, FLATTEN,
         {"type": "linear", "out": 256}, RELU, {"type": "linear", "out": 10})
ROOT = Path(__file__).resolve().parents[1]


def char_transformer() -> tuple:
    """The layers of the shipped char-transformer config."""
    from distbp.config import load_config
    return tuple(load_config("char-transformer").model.layers)


def resnet(depth: int) -> tuple:
    """The shipped resnet's layers (distbp/configs/resnet.toml) for 10 classes."""
    from distbp.nn import resnet_specs
    return tuple(resnet_specs(depth, 10))

PLAIN3 = (*conv_block(16, 3), POOL, *conv_block(32, 3), *conv_block(32, 3), POOL, *conv_block(64, 3), POOL,
          FLATTEN, {"type": "linear", "out": 128}, RELU, {"type": "linear", "out": 10})

WORKLOADS = {
    "W1": Workload("MLP 784-1024-1024-10 ReLU, batch 256, float32, SGD momentum 0.9"),
    "W2": Workload("MLP 64-128-10 ReLU on the shipped digits, batch 64, float32", features=64,
                   hidden=(128,), batch=64, rows=0, steps=1500, torch_steps=400),
    "W1-f64": Workload("W1 in float64", dtype="float64", steps=20, torch_steps=20),
    "W3-deep": Workload("MLP 784-(1024 x 6)-10 ReLU, batch 256", hidden=(1024,) * 6, steps=15, torch_steps=15),
    "W4-wide": Workload("MLP 784-4096-10 ReLU, batch 256", hidden=(4096,), steps=20, torch_steps=20),
    "W1-det": Workload("W1 with train.deterministic=true (micro_batch 64, the default)",
                       extra=("train.deterministic=true",), default_of="W1"),
    "W1-det32": Workload("W1 with train.deterministic=true, micro_batch 32",
                         extra=("train.deterministic=true", "train.micro_batch=32"), default_of="W1"),
    "W1-rep": Workload("W1 with train.shard_optimizer=false: the optimizer step replicated on every rank "
                       "(the default, \"auto\", shards W1 at 2+ ranks)", extra=("train.shard_optimizer=false",),
                       default_of="W1"),
    "W1-ovl": Workload("W1 with train.overlap=true: each gradient bucket's reduction started as backward "
                       "finishes it", extra=("train.overlap=true",), default_of="W1"),
    "W1-rep-ovl": Workload("W1-rep with train.overlap=true", extra=("train.shard_optimizer=false",
                                                                   "train.overlap=true"), default_of="W1-rep"),
    "W5": Workload("LeNet-style CNN on (1, 28, 28): conv5x5 16, pool, conv5x5 32, pool, 128, 10; batch 128",
                   layers=LENET, image=(1, 28, 28), batch=128, rows=8192, steps=20, torch_steps=20, warmup=5),
    "W6": Workload("CIFAR-style CNN on (3, 32, 32): [conv3x3 32, BN, ReLU] x2, pool, [conv3x3 64, BN, ReLU] x2, "
                   "pool, 256, 10; batch 128", layers=CIFAR, image=(3, 32, 32), batch=128, rows=2048,
                   steps=5, torch_steps=5, warmup=3),
    "W7-resnet": Workload("ResNet-8 (the shipped resnet config, He et al. CIFAR style) on (3, 32, 32); batch 128",
                          layers=resnet(8), image=(3, 32, 32), batch=128, rows=2048, steps=5, torch_steps=5,
                          warmup=3),
    "W8-char": Workload("the shipped char-transformer (4 pre-LN blocks, d 128, 4 heads, tied head) on "
                        "data/shakespeare.h5 (context 64); batch 32", layers=char_transformer(), batch=32, rows=0,
                        text="data/shakespeare.h5", steps=10, torch_steps=10, warmup=3),
    "W5-ovl": Workload("W5 with train.overlap=true", layers=LENET, image=(1, 28, 28), batch=128, rows=8192,
                       steps=20, torch_steps=20, warmup=5, extra=("train.overlap=true",), default_of="W5"),
    "W6-ovl": Workload("W6 with train.overlap=true", layers=CIFAR, image=(3, 32, 32), batch=128, rows=2048, steps=5,
                       torch_steps=5, warmup=3, extra=("train.overlap=true",), default_of="W6"),
    "W7-resnet-ovl": Workload("W7-resnet with train.overlap=true", layers=resnet(8), image=(3, 32, 32), batch=128,
                              rows=2048, steps=5, torch_steps=5, warmup=3, extra=("train.overlap=true",),
                              default_of="W7-resnet"),
    "W6-plain": Workload("3x3 CNN on (3, 32, 32), no normalization (a check against tuning to W5/W6): conv 16, pool, "
                   "conv 32, conv 32, pool, conv 64, pool, 128, 10; batch 128", layers=PLAIN3, image=(3, 32, 32),
                   batch=128, rows=2048, steps=8, torch_steps=8, warmup=3),
}
ALL = [("W1", 1, 1), ("W1", 2, 1), ("W2", 1, 1), ("W2", 2, 1), ("W1-det", 2, 1), ("W1-det32", 2, 1),
       ("W1-rep", 2, 1), ("W1", 1, 2), ("W5", 1, 1), ("W5", 2, 1), ("W5", 1, 2), ("W6", 1, 1), ("W6", 2, 1),
       ("W6", 1, 2), ("W7-resnet", 1, 1), ("W7-resnet", 2, 1), ("W7-resnet", 1, 2), ("W8-char", 1, 1),
       ("W8-char", 2, 1), ("W8-char", 1, 2), ("W6-plain", 1, 1),
       ("W6-plain", 2, 1), ("W6-plain", 1, 2)]


# ---------------------------------------------------------------- measurements (worker side)

def rss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pss_mb() -> float:
    """Proportional set size now (shared pages divided among the processes mapping them), MB."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_synthetic(path: Path, rows: int, shape: tuple, classes: int, dtype=np.float32, block=1 << 16):
    """A distbp dataset file of random rows of the given shape, written block by block (memory independent of rows)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "classification",
                        "num_classes": classes})
        g = f.create_group("train")
        x = g.create_dataset("x", (rows, *shape), dtype=dtype)
        y = g.create_dataset("y", (rows,), dtype=np.int64)
        for lo in range(0, rows, block):
            n = min(block, rows - lo)
            x[lo:lo + n] = rng.standard_normal((n, *shape), dtype=np.float32)
            y[lo:lo + n] = rng.integers(0, classes, n)
    return path


def steady_timer_class(warmup: int):
    """distbp's StepTimer with `warmup` steps, also keeping phase totals and wall time from the end of the warm-up."""
    from distbp.reporting.metrics import StepTimer

    class SteadyTimer(StepTimer):
        last = None

        def __init__(self):
            super().__init__(warmup)
            SteadyTimer.last, self.mark, self.end = self, None, None

        def step_done(self, step_seconds, samples):
            super().step_done(step_seconds, samples)
            self.end = time.perf_counter()
            if self.steps == self.warmup:
                self.mark = (self.end, dict(self.totals))

        def after_warmup(self) -> dict:
            """samples/s and ms per phase over the steps after the warm-up (wall clock, all code)."""
            t0, totals0 = self.mark
            steps, wall = self.steps - self.warmup, self.end - t0
            ms = {k: 1e3 * (self.totals[k] - totals0[k]) / steps
                  for k in ("data", "forward", "backward", "allreduce", "optimizer")}
            ms["other"] = 1e3 * wall / steps - sum(ms.values())
            ms["step"] = 1e3 * wall / steps
            return {"samples_per_s": self.steady_samples / wall, "ms": ms}

    return SteadyTimer


def toml_specs(specs) -> str:
    """Layer specs (blocks' nested lists too) as a TOML array of inline tables."""
    from distbp.config import _toml_value
    return _toml_value(list(specs))


def distbp_round(wl: Workload, data_path: str, overrides: list, comm, tmp: Path, r: int) -> dict:
    """One run of distbp.training.loop.run on the workload; steady-state rate and step split."""
    import importlib
    from distbp.config import load_config
    loop = importlib.import_module("distbp.training.loop")  # the module: distbp.train is the API function
    # inputs as stored (data.normalize="none"): the PyTorch peer and the matmul floor read them raw too
    sets = [f"data.path={json.dumps(data_path)}", 'data.val_split=""', 'data.normalize="none"',
            f"model.layers={toml_specs(wl.layers)}", f"model.hidden={list(wl.hidden)}",
            "model.activation=\"relu\"", f"train.batch_size={wl.batch}",
            f"train.dtype=\"{wl.dtype}\"", f"train.max_steps={wl.warmup + wl.steps}", "train.epochs=100000",
            "optim.name=\"sgd\"", "optim.lr=0.01", "optim.momentum=0.9", *wl.extra, *overrides]
    cfg = load_config(None, sets)
    timer_cls = steady_timer_class(wl.warmup)
    loop.StepTimer = timer_cls
    run_dir = tmp / f"run-{r}"
    with contextlib.redirect_stdout(io.StringIO()):
        code = loop.run(cfg, comm, run_dir, resume="never")["exit_code"]
    if code != 0:
        raise SystemExit(f"distbp run exited {code}; see {run_dir}/train.log")
    if comm.is_root:
        shutil.rmtree(run_dir, ignore_errors=True)
    return timer_cls.last.after_warmup()


def products(wl: Workload, n: int) -> list[tuple[int, int, int]]:
    """(m, k, p) of each weight layer's forward product X (m, k) @ W (k, p) at n local rows.

    A linear layer is (n, d_in, d_out); a convolution is its im2col form (n Ho Wo, C kh kw, F).
    A linear layer on (T, D) rows and the attention's projections are (n T, D_in, D_out), the tied output
    (n T, D, V); the attention's per-head products (q k^T, p v) are not counted.
    """
    from distbp.nn import Sequential
    shapes, model = [], Sequential(wl.specs(), wl.input_shape)
    T = model.input_shape[0] if wl.text else 1
    for _, _, layer in model.units:  # blocks' sub-layers too
        if layer.kind == "linear":
            shapes.append((n * T, layer.d_in, layer.d_out))
        elif layer.kind == "conv2d":
            shapes.append((n * layer.Ho * layer.Wo, layer.C * layer.kh * layer.kw, layer.F))
        elif layer.kind == "causal_self_attention":
            shapes += [(n * T, layer.D, 3 * layer.D), (n * T, layer.D, layer.D)]
        elif layer.kind == "tied_output":
            shapes.append((n * T, layer.table.dim, layer.table.vocab))
    return shapes


def floor_round(wl: Workload, comm, steps: int, threads: int) -> float:
    """samples/s if a step were only its matrix products (forward, dW, dx but the first), all ranks at once, BLAS on
    the rank's threads (distbp's run, earlier in this process, left BLAS at one thread for its own pool)."""
    from threadpoolctl import threadpool_limits
    from distbp.parallel.sampler import shard
    lo, hi = shard(wl.batch, comm.rank, comm.size)
    dt, rng = np.dtype(wl.dtype), np.random.default_rng(comm.rank)

    def rand(*shape):  # finite values: no NaN/denormal slow paths
        return rng.standard_normal(shape, dtype=np.float32).astype(dt)

    shapes = products(wl, hi - lo)
    X, W, dY = ([rand(m, k) for m, k, _ in shapes], [rand(k, p) for _, k, p in shapes],
                [rand(m, p) for m, _, p in shapes])
    Y, dW, dX = [np.empty_like(d) for d in dY], [np.empty_like(w) for w in W], [np.empty_like(x) for x in X]
    elapsed = np.zeros(1)
    with threadpool_limits(threads, user_api="blas"):
        for i in range(wl.warmup + steps):
            if i == wl.warmup:
                comm.barrier()
                t0 = time.perf_counter()
            for k in range(len(W)):
                np.matmul(X[k], W[k], out=Y[k])
            for k in reversed(range(len(W))):
                np.matmul(X[k].T, dY[k], out=dW[k])
                if k:
                    np.matmul(dY[k], W[k].T, out=dX[k])
        elapsed[0] = time.perf_counter() - t0
    comm.allreduce_max(elapsed)
    return wl.batch * steps / elapsed[0]


_TORCH_GROUP = []


def torch_model(wl: Workload, dtype):
    """The workload's network in torch.nn, layer for layer.

    BatchNorm normalizes with each rank's own batch statistics under DDP: torch's SyncBatchNorm
    (distbp's semantics) works only on GPU, so the peer skips the statistics allreduce distbp does.
    """
    from distbp.nn import Sequential
    model = Sequential(wl.specs(), wl.input_shape)
    if wl.text:
        return torch_gpt(model, dtype)
    return _torch_chain(model.chain, dtype)


def _torch_chain(chain, dtype):
    """torch.nn.Sequential of a distbp Chain; a residual or concat block becomes a module over its chains' twins."""
    import torch

    class Fork(torch.nn.Module):
        def __init__(self, kind, paths):
            super().__init__()
            self.kind, self.paths = kind, torch.nn.ModuleList(paths)

        def forward(self, x):
            outs = [p(x) for p in self.paths]
            return outs[0] + outs[1] if self.kind == "residual" else torch.cat(outs, dim=1)

    layers = []
    for layer, (shape, _) in zip(chain.layers, chain.shapes_io):
        if layer.kind in ("residual", "concat"):
            layers.append(Fork(layer.kind, [_torch_chain(c, dtype) for _, c in layer.chains()]))
        elif layer.kind == "global_avgpool":
            layers.append(torch.nn.AdaptiveAvgPool2d(1))
        elif layer.kind == "linear":
            layers.append(torch.nn.Linear(layer.d_in, layer.d_out, bias=layer.bias, dtype=dtype))
        elif layer.kind == "conv2d":
            layers.append(torch.nn.Conv2d(layer.C, layer.F, (layer.kh, layer.kw), (layer.sh, layer.sw),
                                          (layer.ph, layer.pw), bias=layer.bias, dtype=dtype))
        elif layer.kind == "batchnorm":
            norm = torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d
            layers.append(norm(layer.C, eps=layer.eps, momentum=layer.momentum, dtype=dtype))
        elif layer.kind == "maxpool2d":
            layers.append(torch.nn.MaxPool2d((layer.kh, layer.kw), (layer.sh, layer.sw)))
        else:
            layers.append({"relu": torch.nn.ReLU, "flatten": torch.nn.Flatten}[layer.kind]())
    return torch.nn.Sequential(*layers)


def torch_gpt(model, dtype):
    """nanoGPT's GPT (pre-LN blocks, fused q/k/v, causal scaled_dot_product_attention, tanh GELU, tied head)
    shaped as a distbp model of embedding, position_embedding, transformer_blocks, layernorm, tied_output."""
    import torch
    nn, F = torch.nn, torch.nn.functional
    emb, blocks = model.layers[0], [layer for layer in model.layers if layer.kind == "transformer_block"]
    T, D, V = emb.T, emb.dim, emb.vocab
    heads = blocks[0].chain.layers[0].paths[0][1].layers[1].H

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D, dtype=dtype), nn.LayerNorm(D, dtype=dtype)
            self.qkv, self.proj = nn.Linear(D, 3 * D, dtype=dtype), nn.Linear(D, D, dtype=dtype)
            self.fc, self.out = nn.Linear(D, 4 * D, dtype=dtype), nn.Linear(4 * D, D, dtype=dtype)

        def forward(self, x):
            n = len(x)
            q, k, v = (a.view(n, T, heads, D // heads).transpose(1, 2) for a in self.qkv(self.ln_1(x)).split(D, -1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, T, D)
            x = x + self.proj(a)
            return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, D, dtype=dtype), nn.Parameter(torch.zeros(T, D, dtype=dtype))
            self.blocks, self.ln_f = nn.Sequential(*(Block() for _ in blocks)), nn.LayerNorm(D, dtype=dtype)

        def forward(self, ids):
            return self.ln_f(self.blocks(self.wte(ids) + self.wpe)) @ self.wte.weight.T
    return GPT()


def torch_round(wl: Workload, x: np.ndarray, y: np.ndarray, comm, threads: int, seed: int) -> float | None:
    """Steady-state samples/s of the same training in PyTorch (DDP over gloo when size > 1); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from distbp.parallel.sampler import epoch_order, shard
    torch.set_num_threads(threads)
    if comm.size > 1 and not _TORCH_GROUP:
        # rank 0's host by name: on several nodes (the emulated cluster) 127.0.0.1 is every node's own
        host, port = comm.bcast_obj((socket.gethostname(), _free_port()) if comm.is_root else None)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{host}:{port}",
                                             rank=comm.rank, world_size=comm.size)
        _TORCH_GROUP.append(True)
    dt = {"float32": torch.float32, "float64": torch.float64}[wl.dtype]
    torch.manual_seed(seed)
    model = torch_model(wl, dt)
    if comm.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    X = torch.from_numpy(x.astype(np.int64 if wl.text else wl.dtype, copy=False))  # token ids stay integers
    Y = torch.from_numpy(y.astype(np.int64, copy=False))
    lo, hi = shard(wl.batch, comm.rank, comm.size)
    per_epoch, order = len(x) // wl.batch, None
    for i in range(wl.warmup + wl.torch_steps):
        if i == wl.warmup:
            comm.barrier()
            t0 = time.perf_counter()
        epoch, k = divmod(i, per_epoch)
        if k == 0:
            order = torch.from_numpy(epoch_order(seed, epoch, len(x)))
        idx = order[k * wl.batch + lo:k * wl.batch + hi]
        opt.zero_grad()
        out = model(X[idx])  # (n, C), or (n, T, V) for sequences: the mean over all tokens
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), Y[idx].reshape(-1))
        loss.backward()
        opt.step()
    elapsed = np.array([time.perf_counter() - t0])
    comm.allreduce_max(elapsed)
    return wl.batch * wl.torch_steps / elapsed[0]


def _free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _median_ratio(a: list, b: list) -> float | None:
    """Median over rounds of a[i] / b[i] (paired: same round, same machine state)."""
    pairs = [p / q for p, q in zip(a, b) if p and q]
    return round(statistics.median(pairs), 3) if pairs else None


def bench_workload(name: str, args, comm, tmp: Path) -> dict:
    """Interleaved rounds of distbp, floor and PyTorch on one workload; the JSON record."""
    from distbp.datasets.dataset import Dataset, digits_path
    wl = WORKLOADS[name]
    if args.steps:
        wl = Workload(**{**wl.__dict__, "steps": args.steps, "torch_steps": args.steps})
    path = str(ROOT / wl.text if wl.text else digits_path()) if wl.rows == 0 else str(tmp / f"{name}.h5")
    if wl.rows and comm.is_root:
        write_synthetic(Path(path), wl.rows, wl.input_shape, wl.classes)
    comm.barrier()
    runs, floors, torches, defaults, rss, pss, xy = [], [], [], [], None, None, None
    for r in range(args.rounds):
        runs.append(distbp_round(wl, path, args.set, comm, tmp, r))
        if wl.default_of:
            defaults.append(distbp_round(WORKLOADS[wl.default_of], path, args.set, comm, tmp, r))
        if r == 0:  # before PyTorch is imported: distbp's own peak
            rss, pss = comm.gather_obj(round(rss_mb(), 1)), comm.gather_obj(round(pss_mb(), 1))
        floors.append(floor_round(wl, comm, max(5, min(wl.steps, 200)), args.threads))
        if not args.no_torch:
            if xy is None:  # after distbp's peak RSS is taken
                with Dataset(path) as d:
                    xy = d.split("train").read(np.arange(d.split("train").n))
            torches.append(torch_round(wl, *xy, comm, args.threads, r))
        else:
            torches.append(None)
    rates = [s["samples_per_s"] for s in runs]
    rec = {"workload": name, "what": wl.what, "ranks": comm.size, "threads": args.threads,
           "rounds": args.rounds, "set": args.set, "load_avg_1min": round(os.getloadavg()[0], 1),
           "samples_per_s": round(statistics.median(rates)),
           "step_ms": {k: round(statistics.median(s["ms"][k] for s in runs), 3) for k in runs[0]["ms"]},
           "floor_samples_per_s": round(statistics.median(floors)),
           "vs_floor": _median_ratio(rates, floors),
           "torch": None if all(t is None for t in torches) else ("ddp-gloo" if comm.size > 1 else "single"),
           "torch_samples_per_s": round(statistics.median(torches)) if torches[0] else None,
           "vs_torch": _median_ratio(rates, torches) if torches[0] else None,
           "peak_rss_mb": rss, "pss_mb": pss,
           "step_time_vs_default": _median_ratio([d["samples_per_s"] for d in defaults], rates) if defaults else None,
           "default_step_ms": {k: round(statistics.median(d["ms"][k] for d in defaults), 3)
                               for k in defaults[0]["ms"]} if defaults else None,
           "rounds_samples_per_s": {"distbp": [round(v) for v in rates], "floor": [round(v) for v in floors],
                                    "default": [round(d["samples_per_s"]) for d in defaults],
                                    "torch": [round(v) if v else None for v in torches]}}
    return rec


def memory_round(args, comm, tmp: Path) -> dict:
    """Peak RSS and PSS per rank after a short distbp run on the dataset file args.data."""
    with h5py.File(args.data, "r") as f:
        rows, features = f["train/x"].shape
    nbytes = rows * (features * 4 + 8)
    wl = Workload("memory", features=features, hidden=(64,), batch=256, rows=rows, steps=20)
    base = rss_mb()
    held = distbp_round(wl, args.data, [f"data.memory_mb={args.memory_mb}"], comm, tmp, 0)
    return {"dataset_mb": round(nbytes / 2**20), "ranks": comm.size, "memory_mb": args.memory_mb,
            "mode": "in memory, node-shared" if nbytes <= args.memory_mb * 2**20 else "streamed",
            "rss_before_mb": comm.gather_obj(round(base, 1)),
            "peak_rss_mb": comm.gather_obj(round(rss_mb(), 1)), "pss_mb": comm.gather_obj(round(pss_mb(), 1)),
            "samples_per_s": round(held["samples_per_s"])}


def memory_sweep(args, base: list) -> list[dict]:
    """For each dataset size: write it once, then run it in memory (if it fits) and streamed at each rank count."""
    records = []
    for mb in map(float, args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="distbp-bench-mem-", dir=args.tmp) as tmp:
            path = Path(tmp) / "memory.h5"
            write_synthetic(path, int(mb * 2**20) // (256 * 4 + 8), (256,), 10, block=1 << 14)
            for ranks in map(int, args.memory_ranks.split(",")):
                for mem in (args.memory_mb, 64):  # in memory when it fits, then streamed in blocks
                    if mem == args.memory_mb and mb > mem:
                        continue
                    rec, = launch(base + ["--memory", "--data", str(path), "--memory-mb", str(mem)], ranks, 1,
                                  args.timeout, args.mpirun)
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
    return records


def worker(args) -> int:
    """Under mpirun: run the requested measurements, rank 0 prints one JSON line each."""
    from threadpoolctl import threadpool_limits
    for k in THREAD_ENV:  # distbp keeps a user's thread setting as it is
        os.environ[k] = str(args.threads)
    limiter = threadpool_limits(limits=args.threads, user_api="blas")
    from distbp.parallel.comm import world
    comm = world()
    tmp = Path(comm.bcast_obj(tempfile.mkdtemp(prefix="distbp-bench-", dir=args.tmp) if comm.is_root else None))
    try:
        if args.memory:
            records = [memory_round(args, comm, tmp)]
        else:
            records = [bench_workload(name, args, comm, tmp) for name in args.workloads]
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
    if comm.is_root:
        for rec in records:
            print(json.dumps(rec), flush=True)
    del limiter
    return 0


# ---------------------------------------------------------------- launching (no MPI here)

def launch(argv: list[str], ranks: int, threads: int, timeout: float, mpirun: str = "") -> list[dict]:
    """Run this script as an mpirun worker (mpirun: a launcher command line, default this venv's); its JSON records."""
    if not mpirun:
        path = Path(sys.executable).parent / "mpirun"
        mpirun = str(path if path.exists() else shutil.which("mpirun") or "mpirun")
    env = {**os.environ, WORKER_ENV: "1", **{k: str(threads) for k in THREAD_ENV}}
    cmd = [*shlex.split(mpirun), "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__, *argv,
           "--threads", str(threads)]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"bench worker failed (exit {p.returncode}): {' '.join(cmd)}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def table(records: list[dict]) -> str:
    """The README's markdown table from bench records."""
    def k(v):
        return "-" if v is None else f"{v:,.0f}" if v < 1000 else f"{v / 1000:,.1f}k"

    rows = ["| workload | ranks x threads | distbp | PyTorch | matmul floor | distbp / PyTorch | distbp / floor |"
            " step ms: data, fwd, bwd, allreduce, optim, other |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ms = r["step_ms"]
        split = ", ".join(f"{ms[p]:.2f}" for p in ("data", "forward", "backward", "allreduce", "optimizer", "other"))
        torch = f"{k(r['torch_samples_per_s'])} ({r['torch']})" if r["torch"] else "-"
        rows.append(f"| {r['workload']} | {r['ranks']} x {r['threads']} | {k(r['samples_per_s'])} | {torch} | "
                    f"{k(r['floor_samples_per_s'])} | {r['vs_torch'] or '-'} | {r['vs_floor']} | {split} |")
    return "\n".join(rows)


def layer_table(name: str, rounds: int, threads: int) -> str:
    """Markdown table of each layer's forward and backward ms (median over rounds) at the workload's batch,
    distbp beside the same layer in PyTorch, in interleaved rounds (a model with blocks: unit_table)."""
    from threadpoolctl import threadpool_limits
    from distbp.nn import Block, Sequential, threads as passes
    wl = WORKLOADS[name]
    model = Sequential(wl.specs(), wl.input_shape, dtype=np.dtype(wl.dtype))
    if wl.text or any(isinstance(layer, Block) for layer in model.layers):  # no layer-by-layer PyTorch twin
        return unit_table(name, rounds, threads)
    first = next(i for i, layer in enumerate(model.layers) if layer.param_shapes())
    model.layers[first].need_dx = False  # as in training: no gradient for the input
    x = np.random.default_rng(0).standard_normal((wl.batch, *wl.input_shape)).astype(wl.dtype)
    times, peer = np.zeros((rounds, len(model.layers), 2)), np.full((rounds, len(model.layers), 2), np.nan)
    try:
        import torch
        peer_model = torch_model(wl, {"float32": torch.float32, "float64": torch.float64}[wl.dtype])
    except ImportError:
        peer_model = None
    with threadpool_limits(threads, user_api="blas"), passes.using(threads):
        for r in range(-1, rounds):  # round -1 warms up
            model.zero_grad(skip_written=True)
            h = x
            for i, layer in enumerate(model.layers):
                t0 = time.perf_counter()
                h = layer.forward(h)
                times[r, i, 0] = time.perf_counter() - t0
            dy = np.full_like(h, 1 / len(h))
            for i in reversed(range(first, len(model.layers))):
                t0 = time.perf_counter()
                dy = model.layers[i].backward(dy)
                times[r, i, 1] = time.perf_counter() - t0
            torch_layer_round(peer_model, x, first, threads, peer[r])
    med, ref = 1e3 * np.median(times, axis=0), 1e3 * np.median(peer, axis=0)
    rows = [f"{name}, batch {wl.batch}, {threads} thread(s), {rounds} interleaved rounds: ms per layer, median, "
            "distbp / PyTorch", "| layer | out shape | forward | PyTorch fwd | backward | PyTorch bwd |",
            "|---|---|---|---|---|---|"]
    for i, layer in enumerate(model.layers):
        rows.append(f"| {i} {layer.kind} | {model.shapes_io[i][1]} | {med[i, 0]:.2f} | {ref[i, 0]:.2f} | "
                    f"{med[i, 1]:.2f} | {ref[i, 1]:.2f} |")
    total, peer_total = times.sum(axis=(1, 2)), np.nansum(peer, axis=(1, 2))
    ratio = _median_ratio(list(peer_total), list(total)) if not np.isnan(peer).all() else None
    rows.append(f"| all | | step {1e3 * np.median(total):.1f} | {1e3 * np.median(peer_total):.1f} | "
                f"PyTorch time / distbp time {ratio} | |")
    return "\n".join(rows)


def torch_layer_round(model, x: np.ndarray, first: int, threads: int, out: np.ndarray) -> None:
    """One forward and backward of a torch.nn.Sequential, layer by layer: seconds into out[layer, (fwd, bwd)]."""
    if model is None:
        return
    import torch
    torch.set_num_threads(threads)
    model.zero_grad()
    ins, outs, h = [], [], torch.from_numpy(x)
    for i, module in enumerate(model):
        h = h.detach().requires_grad_(i > first)  # as distbp: no gradient for the input
        t0 = time.perf_counter()
        y = module(h)
        out[i, 0] = time.perf_counter() - t0
        ins.append(h)
        outs.append(y)
        h = y
    dy = torch.full_like(h, 1 / len(h))
    for i in reversed(range(first, len(model))):
        t0 = time.perf_counter()
        outs[i].backward(dy)
        out[i, 1] = time.perf_counter() - t0
        dy = ins[i].grad


def unit_times(wl: Workload, rounds: int, threads: int, batch: int = 0) -> tuple:
    """(model, seconds (rounds, units, forward/backward)) of every layer and sub-layer over rounds of one step
    of batch rows (0: the workload's batch)."""
    from threadpoolctl import threadpool_limits
    from distbp.nn import Sequential, threads as passes
    model = Sequential(wl.specs(), wl.input_shape, dtype=np.dtype(wl.dtype))
    rng = np.random.default_rng(0)
    if wl.text:  # token ids
        x = rng.integers(0, model.layers[0].vocab, (batch or wl.batch, *wl.input_shape))
    else:
        x = rng.standard_normal((batch or wl.batch, *wl.input_shape)).astype(wl.dtype)
    times, r = np.zeros((rounds + 1, len(model.units), 2)), [0]
    for i, (_, _, layer) in enumerate(model.units):
        _time_layer(layer, times, r, i)
    with threadpool_limits(threads, user_api="blas"), passes.using(threads):
        for r[0] in range(-1, rounds):  # round -1 (the last row of times) warms up
            model.zero_grad(skip_written=True)
            h = model.forward(x)
            model.backward(np.full_like(h, 1 / len(h)), need_dx=False)  # as in training: no gradient for the input
    return model, times[:rounds]


def kind_table(name: str, rounds: int, threads: int) -> str:
    """Markdown table of forward and backward ms per layer kind (every layer of the kind, inside blocks too)."""
    from distbp.nn import Block
    model, times = unit_times(WORKLOADS[name], rounds, threads)
    leaves = [(i, layer.kind) for i, (_, _, layer) in enumerate(model.units) if not isinstance(layer, Block)]
    kinds = sorted({k for _, k in leaves})
    per_kind = {k: times[:, [i for i, q in leaves if q == k]].sum(axis=1) for k in kinds}  # (rounds, 2) each
    step = 1e3 * np.median(times[:, [i for i, _ in leaves]].sum(axis=(1, 2)))
    rows = [f"{name}, batch {WORKLOADS[name].batch}, {threads} thread(s), {rounds} rounds: ms per step by layer kind "
            "(median)", "| layer kind | forward | backward | share |", "|---|---|---|---|"]
    for k in sorted(kinds, key=lambda k: -per_kind[k].sum()):
        f, b = 1e3 * np.median(per_kind[k], axis=0)
        rows.append(f"| {k} | {f:.2f} | {b:.2f} | {100 * (f + b) / step:.0f}% |")
    rows.append(f"| all layers | | | {step:.1f} ms |")
    return "\n".join(rows)


def _time_layer(layer, times, r: list, i: int) -> None:
    """Wrap the layer's forward and backward so each adds its seconds into times[r[0], i]."""
    forward, backward = layer.forward, layer.backward

    def timed(f, phase):
        def run(a):
            t0 = time.perf_counter()
            out = f(a)
            times[r[0], i, phase] += time.perf_counter() - t0
            return out
        return run
    layer.forward, layer.backward = timed(forward, 0), timed(backward, 1)


def unit_table(name: str, rounds: int, threads: int) -> str:
    """Markdown table of each layer's forward and backward ms (median and min over rounds) at the workload's batch;
    a block's sub-layers get rows of their own (path-named) after the block's row, which includes them."""
    wl = WORKLOADS[name]
    model, times = unit_times(wl, rounds, threads)
    med, low = 1e3 * np.median(times, axis=0), 1e3 * times.min(axis=0)
    rows = [f"{name}, batch {wl.batch}, {threads} thread(s), {rounds} rounds: ms per layer, median (min)",
            "| layer | out shape | forward | backward |", "|---|---|---|---|"]
    for i, (path, _, layer) in enumerate(model.units):
        rows.append(f"| {path} {layer.kind} | {tuple(layer.out_shape)} | {med[i, 0]:.2f} ({low[i, 0]:.2f}) | "
                    f"{med[i, 1]:.2f} ({low[i, 1]:.2f}) |")
    top = [i for i, (_, key, _) in enumerate(model.units) if len(key) == 1]
    total = times[:, top].sum(axis=(1, 2))
    rows.append(f"| all | | step {1e3 * np.median(total):.1f} ({1e3 * total.min():.1f}) | |")
    return "\n".join(rows)


def memory_table(records: list[dict]) -> str:
    """Markdown table of the --memory records."""
    rows = ["| dataset MB | ranks | mode | peak RSS per rank MB | PSS per rank MB | PSS sum MB |", "|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['dataset_mb']} | {r['ranks']} | {r['mode']} | {', '.join(f'{v:.0f}' for v in r['peak_rss_mb'])} | "
                    f"{', '.join(f'{v:.0f}' for v in r['pss_mb'])} | {sum(r['pss_mb']):.0f} |")
    return "\n".join(rows)


def parse(argv=None) -> argparse.Namespace:
    """Command line of the launcher and of the worker."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="*", default=["W1"], help=f"any of {', '.join(WORKLOADS)}")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="BLAS (and PyTorch) threads per rank")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds; medians are reported (default: %(default)s)")
    p.add_argument("--steps", type=int, default=0, help="steady-state steps per round (0: the workload's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="distbp config override")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--all", action="store_true", help="the README table (only the named workloads' rows if any): " +
                   ", ".join(f"{w} {r}x{t}" for w, r, t in ALL))
    p.add_argument("--memory", action="store_true", help="peak RSS per rank vs dataset size")
    p.add_argument("--layers", action="store_true", help="ms per layer of each workload's forward and backward")
    p.add_argument("--kinds", action="store_true", help="ms per layer kind of each workload, inside blocks too")
    p.add_argument("--sizes", default="100,800,3200", help="--memory dataset sizes, MB")
    p.add_argument("--memory-ranks", default="1,2,4", help="--memory rank counts")
    p.add_argument("--memory-mb", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help="folder for the temporary datasets (default: the system's)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per mpirun launch")
    p.add_argument("--mpirun", default="", help="launcher command the workers start under, e.g. an mpiexec "
                   "with -hosts for several nodes (default: this venv's mpirun)")
    p.add_argument("--nodes", type=int, default=0, help="run on an emulated cluster of this many nodes "
                   "(scripts/cluster.sh, root), --ranks spread evenly over them")
    p.add_argument("--link", default="", help="with --nodes: the nodes' link, RATE[,DELAY] of cluster.sh start")
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return args


def _without(argv: list[str], options) -> list[str]:
    """argv less the given options and their values (--opt VALUE or --opt=VALUE)."""
    out, skip = [], False
    for a in argv:
        if skip or a.split("=", 1)[0] in options:
            skip = not skip and "=" not in a and a in options
            continue
        out.append(a)
    return out


@contextlib.contextmanager
def emulated_cluster(nodes: int, link: str, ranks: int):
    """The emulated cluster started with nodes and link, held from other test/bench users; yields the launcher."""
    import fcntl
    scripts = Path(__file__).resolve().parent
    lock_path = os.environ.get("DISTBP_SLURM_DIR", "/var/tmp/distbp-slurm").rstrip("/") + ".tests.lock"
    with open(lock_path, "w") as lock:  # the lock tests/test_cluster.py takes
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = ["bash", str(scripts / "cluster.sh"), "start", "--nodes", str(nodes), *(["--link", link] if link else [])]
        subprocess.run(start, check=True, stdout=subprocess.DEVNULL)
        hosts = ",".join(f"n{i}" for i in range(1, nodes + 1))
        yield (f"bash {scripts / 'cluster.sh'} exec n1 {Path(sys.executable).parent / 'mpiexec'} -launcher ssh "
               f"-launcher-exec {scripts / 'cluster_ssh.sh'} -hosts {hosts} -ppn {max(1, ranks // nodes)}")


def main(argv=None) -> int:
    """Launch workers (or be one under mpirun) and print JSON lines, plus tables for --all/--memory."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    under_mpi = os.environ.get(WORKER_ENV) or any(os.environ.get(v) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if under_mpi:
        return worker(args)
    base = [a for a in argv if a not in ("--all", "--memory")]
    if args.memory:
        print(memory_table(memory_sweep(args, base)))
        return 0
    if args.layers:
        print("\n\n".join(layer_table(name, args.rounds, args.threads) for name in args.workloads))
        return 0
    if args.kinds:
        print("\n\n".join(kind_table(name, args.rounds, args.threads) for name in args.workloads))
        return 0
    if args.all:
        records = []
        chosen = [w for w in argv if w in WORKLOADS]  # `--all W5 W6`: only those workloads' rows
        for name, ranks, threads in ALL:
            if chosen and name not in chosen:
                continue
            base = [a for a in base if a not in WORKLOADS]
            for rec in launch([name, *base], ranks, threads, args.timeout, args.mpirun):
                print(json.dumps(rec), flush=True)
                records.append(rec)
        print(table(records))
        for r in records:
            if r["step_time_vs_default"]:
                print(f"{r['workload']} at {r['ranks']} x {r['threads']}: step time {r['step_time_vs_default']}x "
                      f"the default mode's, measured in the same rounds")
        return 0
    if args.nodes:  # the datasets in a folder every node sees: a node's /tmp is its own
        tmp = args.tmp or "/var/tmp"
        argv = _without(argv, ("--nodes", "--link")) + ["--tmp", tmp]
        with emulated_cluster(args.nodes, args.link, args.ranks) as mpirun:
            records = launch(argv, args.ranks, args.threads, args.timeout, mpirun)
        for rec in records:
            rec.update(nodes=args.nodes, link=args.link or "unshaped")
            print(json.dumps(rec), flush=True)
        return 0
    for rec in launch(argv, args.ranks, args.threads, args.timeout, args.mpirun):
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
