"""The layers' threaded passes (nn.threads): forward and backward give the same bits at 1, 2 and 4 threads."""
import threading

import numpy as np
import pytest

from distbp import optim
from distbp.nn import Sequential, make_loss, threads
from distbp.nn.layers import LAYER_TYPES

COUNTS = (1, 2, 4)


@pytest.fixture(autouse=True)
def small_items(monkeypatch):
    """Small blocks and no serial cut-off, so the small test arrays are spread over every thread."""
    monkeypatch.setattr(threads, "BLOCK", 96)
    monkeypatch.setattr(threads, "SERIAL_BELOW", 0)


def at_counts(fn):
    """fn() run at 1, 2 and 4 threads: its outputs (a tuple of arrays) as bytes, one entry per count."""
    runs = []
    for n in COUNTS:
        with threads.using(n):
            runs.append(tuple(np.ascontiguousarray(a).tobytes() for a in fn()))
    return runs


def test_run_spreads_items_over_the_threads_and_covers_each_once():
    seen, idents, together = [], set(), threading.Barrier(4, timeout=20)

    def work(lo, hi):
        idents.add(threading.get_ident())
        seen.extend(range(lo, hi))
        together.wait()  # passes only when 4 runs are in flight at once

    with threads.using(4):
        threads.run(work, 10, 10)
    assert sorted(seen) == list(range(10)) and len(idents) == 4
    idents.clear()
    with threads.using(1):
        threads.run(lambda lo, hi: idents.add((threading.get_ident(), lo, hi)), 10, 10)
    assert idents == {(threading.get_ident(), 0, 10)}


def test_a_pass_inside_a_pass_runs_on_its_thread():
    inner = []

    def outer(lo, hi):
        threads.run(lambda a, b: inner.append((threading.current_thread().name, a, b)), 3, 3)

    with threads.using(2):
        threads.run(outer, 2, 2)
    from_pool = [(a, b) for name, a, b in inner if name.startswith("distbp-pass")]
    assert (0, 3) in from_pool and (1, 3) in from_pool  # the pool thread's pass ran whole; the caller's was split


def test_a_thread_count_dependent_split_would_be_caught():
    """The bitwise comparison can fail: float32 partial sums per thread's run differ with the count."""
    x = np.array([1e8, 1, -1e8, 1], np.float32)

    def per_thread_sum():
        parts = {}

        def run_sum(lo, hi):
            acc = np.float32(0)
            for v in x[lo:hi]:
                acc += v
            parts[lo] = acc
        threads.run(run_sum, len(x), x.size)
        total = np.float32(0)
        for lo in sorted(parts):
            total += parts[lo]
        return (np.array(total),)

    assert len(set(at_counts(per_thread_sum))) > 1


def layer_run(specs, shape, seed=0, train=True, dtype=np.float32):
    """A function doing one forward and backward of the model; returns (output, dx, gradients)."""
    def run():
        model = Sequential(specs, shape, dtype=np.dtype(dtype), seed=3)
        model.layers[0].need_dx = True
        model.train() if train else model.eval()
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((12, *shape)).astype(dtype)
        model.zero_grad()
        out = model.forward(x)
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = model.backward(dy)
        return out, dx, model.grads.copy()
    return run


ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "softplus"]


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation_forward_and_backward_bits_do_not_depend_on_threads(kind):
    assert kind in LAYER_TYPES
    run = layer_run([{"type": "conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, {"type": kind},
                     {"type": "flatten"}, {"type": "linear", "out": 3}], (2, 9, 9))
    a, b, c = at_counts(run)
    assert a == b == c


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_bits_do_not_depend_on_threads(train):
    run = layer_run([{"type": "conv2d", "out_channels": 6, "kernel": 3}, {"type": "batchnorm"},
                     {"type": "flatten"}, {"type": "batchnorm"}, {"type": "linear", "out": 3}], (3, 8, 8), train=train)
    a, b, c = at_counts(run)
    assert a == b == c


@pytest.mark.parametrize("pool", [{"type": "maxpool2d", "kernel": 2}, {"type": "maxpool2d", "kernel": 3, "stride": 2},
                                  {"type": "avgpool2d", "kernel": 3, "stride": 2, "padding": 1},
                                  {"type": "global_avgpool"}])
def test_pooling_bits_do_not_depend_on_threads(pool):
    run = layer_run([{"type": "conv2d", "out_channels": 5, "kernel": 3, "padding": 1}, pool, {"type": "flatten"},
                     {"type": "linear", "out": 3}], (2, 11, 11))
    a, b, c = at_counts(run)
    assert a == b == c


def test_maxpool_alone_on_an_nchw_input_and_ties():
    x = np.random.default_rng(1).integers(0, 3, (6, 4, 8, 8)).astype(np.float32)  # many ties
    dy = np.random.default_rng(2).standard_normal((6, 4, 4, 4)).astype(np.float32)

    def run():
        model = Sequential([{"type": "maxpool2d", "kernel": 2}], (4, 8, 8))
        y = model.layers[0].forward(x)
        return y, model.layers[0].backward(dy.copy())
    a, b, c = at_counts(run)
    assert a == b == c


@pytest.mark.parametrize("conv", [
    {"out_channels": 4, "kernel": 5, "padding": 2},                  # thin windows (kh*C = 5): a row's copy
    {"out_channels": 5, "kernel": 3, "padding": 1},                  # views on the padded input
    {"out_channels": 3, "kernel": [3, 2], "stride": 2, "padding": 1},  # strided: col2im backward
    {"out_channels": 4, "kernel": 1, "bias": False},
])
def test_conv_forward_and_backward_bits_do_not_depend_on_threads(conv, monkeypatch):
    from distbp.nn import conv as conv_module
    monkeypatch.setattr(conv_module, "PARTS_BYTES", 1)  # one partial dW per output row
    channels = 1 if conv["kernel"] == 5 else 24
    run = layer_run([{"type": "conv2d", **conv}, {"type": "relu"}, {"type": "flatten"},
                     {"type": "linear", "out": 3}], (channels, 10, 9))
    a, b, c = at_counts(run)
    assert a == b == c


def test_linear_bias_add_bits_do_not_depend_on_threads():
    run = layer_run([{"type": "linear", "out": 40}, {"type": "relu"}, {"type": "linear", "out": 7}], (30,))
    a, b, c = at_counts(run)
    assert a == b == c


FUSED = [  # a layer that rectifies its own output, with what follows the ReLU (dy's memory order and owner)
    [{"type": "conv2d", "out_channels": 4, "kernel": 5, "padding": 2}, {"type": "relu"}, {"type": "flatten"}],
    [{"type": "conv2d", "out_channels": 5, "kernel": 3, "padding": 1}, {"type": "relu"},
     {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}],
    [{"type": "conv2d", "out_channels": 3, "kernel": [3, 2], "stride": 2, "padding": 1, "bias": False},
     {"type": "relu"}, {"type": "flatten"}],
    [{"type": "residual", "body": [{"type": "conv2d", "out_channels": 2, "kernel": 3, "padding": 1}, {"type": "relu"}],
      "shortcut": []}, {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}],  # dy is the shortcut's too: kept
    [{"type": "flatten"}, {"type": "linear", "out": 40}, {"type": "relu"}],
    [{"type": "conv2d", "out_channels": 5, "kernel": 3, "padding": 1}, {"type": "batchnorm"}, {"type": "relu"},
     {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}],
    [{"type": "residual", "body": [{"type": "conv2d", "out_channels": 2, "kernel": 3, "padding": 1},
                                   {"type": "batchnorm"}, {"type": "relu"}],
      "shortcut": []}, {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}],
    [{"type": "flatten"}, {"type": "batchnorm"}, {"type": "relu"}],
]


@pytest.mark.parametrize("specs", FUSED)
def test_fused_relu_gives_the_bits_of_the_relu_layer_at_any_thread_count(specs, monkeypatch):
    """Conv2D, BatchNorm or Linear followed by a ReLU rectifies in its own pass (and the first two mask dy): forward,
    dx and gradients bitwise those of the separate ReLU layer, at 1, 2 and 4 threads, in train and in eval mode."""
    from distbp.nn import blocks, conv as conv_module
    monkeypatch.setattr(conv_module, "PARTS_BYTES", 1)  # one partial dW per output row
    monkeypatch.setattr(conv_module, "COLS_BYTES", 1)  # one col2im block per output row
    channels = 1 if specs[0].get("kernel") == 5 else 2
    specs = specs + [{"type": "linear", "out": 3}]
    runs = {}
    for fuse in (True, False):
        monkeypatch.setattr(blocks, "FUSE_RELU", fuse)
        runs[fuse] = at_counts(layer_run(specs, (channels, 10, 9))) + at_counts(layer_run(specs, (channels, 10, 9),
                                                                                          train=False))
        relus = [u for _, _, u in Sequential(specs, (channels, 10, 9)).units if type(u).__name__ == "ReLU"]
        assert [u.fused is not None for u in relus] == [fuse]
    assert runs[True] == runs[False] and len(set(runs[True][:3])) == len(set(runs[True][3:])) == 1


def test_strided_col2im_in_blocks_gives_the_bits_of_one_block(monkeypatch):
    """dx of a strided convolution, its rows' products and adds split in blocks over 1, 2, 4 threads: the bits of
    the whole matrix on one thread, with windows overlapping between output rows (kernel 4 > stride 2)."""
    from distbp.nn import conv as conv_module
    specs = [{"type": "conv2d", "out_channels": 6, "kernel": 4, "stride": [2, 3], "padding": 1}, {"type": "tanh"},
             {"type": "flatten"}, {"type": "linear", "out": 3}]
    monkeypatch.setattr(conv_module, "COLS_BYTES", 1 << 40)
    with threads.using(1):
        whole = tuple(np.ascontiguousarray(a).tobytes() for a in layer_run(specs, (5, 13, 14))())
    for cols in (1, 3000):  # one output row per block; a few rows per block
        monkeypatch.setattr(conv_module, "COLS_BYTES", cols)
        assert set(at_counts(layer_run(specs, (5, 13, 14)))) == {whole}


@pytest.mark.parametrize("name,options", [("sgd", {"momentum": 0.9, "weight_decay": 1e-3}), ("adam", {}),
                                          ("adamw", {}), ("rmsprop", {"momentum": 0.5, "centered": True})])
def test_optimizer_step_bits_do_not_depend_on_threads(name, options, monkeypatch):
    monkeypatch.setattr(optim, "CHUNK_BYTES", 400)  # many blocks

    def run():
        rng = np.random.default_rng(0)
        p = rng.standard_normal(1001).astype(np.float32)
        opt = optim.make_optimizer(name, p.size, p.dtype, **options)
        for _ in range(3):
            opt.step(p, rng.standard_normal(p.size).astype(np.float32), 0.01)
        return (p, *opt.state_arrays().values())
    a, b, c = at_counts(run)
    assert a == b == c


@pytest.mark.parametrize("task", ["classification", "binary", "regression"])
def test_loss_bits_do_not_depend_on_threads(task):
    rng = np.random.default_rng(0)
    out = rng.standard_normal((300, 7)).astype(np.float32) * 5
    y = {"classification": rng.integers(0, 7, 300), "binary": rng.integers(0, 2, (300, 7)),
         "regression": rng.standard_normal((300, 7))}[task]

    def run():
        loss = make_loss(task)
        value = loss.forward(out, y)
        return np.array(value), loss.backward()
    a, b, c = at_counts(run)
    assert a == b == c


def test_elementwise_takes_mixed_memory_orders_in_one_call():
    x = np.random.default_rng(0).standard_normal((6, 5, 4)).astype(np.float32)
    y = np.empty((4, 5, 6), np.float32).transpose(2, 1, 0)  # another memory order
    calls = []
    threads.elementwise(lambda o, a: calls.append(np.multiply(a, 2, out=o)), y, x)
    assert len(calls) == 1 and np.array_equal(y, 2 * x)
    threads.elementwise(lambda o, a: calls.append(np.multiply(a, 2, out=o)), np.empty_like(x), x)
    assert len(calls) == 1 + -(-x.size // threads.BLOCK)


def test_small_arrays_take_one_call(monkeypatch):
    monkeypatch.setattr(threads, "SERIAL_BELOW", 1000)
    calls = []
    x = np.ones((10, 99), np.float32)
    threads.elementwise(lambda o, a: calls.append(np.add(a, 1, out=o)), x, x)
    assert len(calls) == 1 and (x == 2).all()
    threads.elementwise(lambda o, a: calls.append(np.add(a, 1, out=o)), np.ones((11, 99)), np.ones((11, 99)))
    assert len(calls) == 1 + -(-11 * 99 // threads.BLOCK)


# ---- deterministic mode: the threads change no bit of training ----

W5_LIKE = ('model.layers=[{type="reshape", shape=[1, 24, 24]}, {type="conv2d", out_channels=32, kernel=5, padding=2}, '
           '{type="relu"}, {type="maxpool2d", kernel=2}, {type="conv2d", out_channels=32, kernel=3, padding=1}, '
           '{type="relu"}, {type="conv2d", out_channels=16, kernel=5, padding=2}, {type="relu"}, '
           '{type="maxpool2d", kernel=2}, {type="flatten"}, {type="linear", out=16}, {type="relu"}, '
           '{type="linear", out=4}]')


def test_deterministic_training_has_the_same_bits_at_1_2_4_threads_and_1_2_3_ranks(tmp_path):
    """A W5-like CNN (no batchnorm; its 3x3 convolution, 32 to 32 channels, and a 5x5 one, 32 to 16, on Winograd's
    paths), 20 SGD steps of 3 micro-shards large enough for the pool to split them."""
    from distbp.nn.conv import winograd_path
    assert winograd_path((3, 3), (1, 1), 32, 32) and winograd_path((5, 5), (1, 1), 32, 16)
    import json
    from conftest import run_distbp
    from distbp.datasets.dataset import write_dataset
    from distbp.files import checkpoint as ckpt
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((520, 576)).astype(np.float32), (np.arange(520) % 4).astype(np.int64)
    data = tmp_path / "images.h5"
    write_dataset(data, {"train": (x[:480], y[:480]), "val": (x[480:], y[480:])}, num_classes=4)
    params = {}
    for ranks, n in ((1, 1), (1, 2), (1, 4), (2, 2), (3, 1)):
        run_dir = tmp_path / f"r{ranks}t{n}"
        args = ["train", "--run-dir", run_dir]
        for s in (f"data.path={json.dumps(str(data))}", W5_LIKE, "train.batch_size=96", "train.micro_batch=32",
                  "train.max_steps=20", "train.epochs=10", "train.deterministic=true", "optim.momentum=0.9",
                  "train.stall_timeout=0"):
            args += ["--set", s]
        proc = run_distbp(args, ranks, env={"OMP_NUM_THREADS": str(n)}, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"{n} thread{'s' * (n > 1)} per rank for the layers' products and passes" in proc.stdout + proc.stderr
        ck = ckpt.load(run_dir / "checkpoints" / ckpt.checkpoint_name(20))
        params[ranks, n] = {k: v.tobytes() for k, v in ck.params.items()}
    want = params[1, 1]
    assert "1.conv2d.W" in want
    for key, got in params.items():
        assert got == want, f"{key[0]} rank(s) x {key[1]} threads differ from 1 x 1"
