"""The shipped resnet and models with blocks trained end to end: equal to PyTorch on the same batches, bitwise
across rank counts and resumes in deterministic mode, sharded equal to replicated, bad blocks refused."""
import json

import numpy as np
import pytest

from conftest import import_torch, rel_err, run_distbp
from distbp.config import _toml_value
from distbp.datasets.augment import crop_flip
from distbp.datasets.dataset import write_dataset
from distbp.files import checkpoint as ckpt
from distbp.nn import Sequential, resnet_specs
from distbp.parallel.sampler import epoch_order
from torch_twin import flat, twin

CLASSES = 10


@pytest.fixture
def serial(comm):
    """Launches its own mpirun jobs: the serial session only."""
    if comm.size > 1:
        pytest.skip("launches its own mpirun jobs: run in the serial session")


def images(path, side=32, train=96, val=32, seed=0):
    """A learnable (3, side, side) set of 10 classes: a class-dependent brightness plus noise."""
    rng = np.random.default_rng(seed)
    n = train + val
    y = rng.integers(0, CLASSES, n)
    x = (rng.standard_normal((n, 3, side, side)) + 0.3 * y[:, None, None, None]).astype(np.float32)
    return write_dataset(path, {"train": (x[:train], y[:train]), "val": (x[train:], y[train:])},
                         num_classes=CLASSES), x[:train], y[:train]


def train(run_dir, ranks, sets, steps, config="resnet", resume="never"):
    """`distbp train CONFIG` on `ranks` ranks (0: no launcher) to `steps`; the checkpoint's params and buffers."""
    args = ["train", config, "--run-dir", run_dir, "--resume", resume, "--set", f"train.max_steps={steps}",
            "--set", "train.stall_timeout=0"]
    for s in sets:
        args += ["--set", s]
    proc = run_distbp(args, ranks, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ck = ckpt.load(run_dir / "checkpoints" / ckpt.checkpoint_name(steps))
    return ck, proc.stdout


def arrays_bytes(ck) -> dict:
    """Every parameter, buffer and optimizer array of a checkpoint as bytes."""
    out = {f"params/{k}": v.tobytes() for k, v in ck.params.items()}
    out.update({f"buffers/{k}": v.tobytes() for k, v in ck.buffers.items()})
    out.update({f"{s}/{k}": v.tobytes() for s, d in ck.opt_arrays.items() for k, v in d.items()})
    return out


def test_resnet8_trains_like_pytorch_on_the_same_batches_at_1_and_2_ranks(serial, tmp_path):
    torch = import_torch()
    data, x, y = images(tmp_path / "img.h5", side=16)  # 16x16 images keep the test short; the net is the shipped one
    batch, steps = 16, 10  # 6 steps per epoch: the run crosses an epoch and its reshuffle
    sets = [f"data.path={json.dumps(str(data))}", 'train.dtype="float64"', f"train.batch_size={batch}",
            'data.normalize="none"', 'optim.schedule="constant"']
    runs = {n: train(tmp_path / f"r{n}", n, sets, steps)[0] for n in (1, 2)}

    model = Sequential(resnet_specs(8, CLASSES), (3, 16, 16), dtype=np.float64, seed=0)  # distbp's initial params
    reference, pairs = twin(model, torch)
    opt = torch.optim.SGD([p for _, p, _ in pairs], lr=0.1, momentum=0.9, weight_decay=5e-4)
    per_epoch = len(x) // batch
    for k in range(steps):
        order = epoch_order(0, k // per_epoch, len(x))
        rows = order[(k % per_epoch) * batch:(k % per_epoch + 1) * batch]
        opt.zero_grad()
        batch_x = crop_flip(x[rows].astype(np.float64), 0, k // per_epoch, rows)  # the shipped data.augment
        out = reference(torch.tensor(batch_x))
        torch.nn.functional.cross_entropy(out, torch.tensor(y[rows])).backward()
        opt.step()
    want = flat(pairs, "data")
    for n, ck in runs.items():
        got = np.concatenate([ck.params[name].ravel() for name in model.names])
        assert rel_err(got, want) < 1e-10, f"{n} rank(s): {rel_err(got, want):.3g}"
        bn = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        names = [b for b in model.buffer_names if b.endswith("running_var")]
        assert len(bn) == len(names) == 9
        assert all(rel_err(ck.buffers[b], m.running_var.numpy()) < 1e-10 for b, m in zip(names, bn))


def small_resnet_sets(data) -> list:
    """ResNet-8 with LayerNorm (deterministic mode refuses BatchNorm) on 16x16 images, deterministic, dropout-free."""
    layers = resnet_specs(8, CLASSES, width=8, norm="layernorm")
    return [f"data.path={json.dumps(str(data))}", "model.resnet_depth=0", f"model.layers={_toml_value(layers)}",
            "train.batch_size=24", "train.deterministic=true", "train.micro_batch=5", 'optim.name="adam"',
            'data.augment="crop_flip"',
            "optim.lr=0.01", "optim.schedule_steps=5", "checkpoint.every_steps=3"]  # one cosine horizon for every run


def test_resnet_is_bitwise_identical_on_1_2_3_4_ranks_and_resumes_on_another_count(serial, tmp_path):
    data, _, _ = images(tmp_path / "img.h5", side=16)
    sets = small_resnet_sets(data)
    want = arrays_bytes(train(tmp_path / "r1", 0, sets, 5)[0])
    assert "params/7.residual.shortcut.0.conv2d.W" in want and "exp_avg/7.residual.body.3.conv2d.W" in want
    for n in (2, 3, 4):
        assert arrays_bytes(train(tmp_path / f"r{n}", n, sets, 5)[0]) == want, f"{n} ranks differ from 1 rank"
    train(tmp_path / "moved", 3, sets, 3)
    ck, log = train(tmp_path / "moved", 2, sets, 5, resume="auto")
    assert "written by 3 rank(s), now 2" in log
    assert arrays_bytes(ck) == want


BLOCKS_TOML = """
[model]
layers = [
  { type = "linear", out = 12 },
  { type = "residual", body = [{ type = "relu" }, { type = "linear", out = 12 }, { type = "dropout", p = 0.2 },
    { type = "residual", body = [{ type = "tanh" }, { type = "linear", out = 12 }] }] },
  { type = "concat", branches = [[{ type = "linear", out = 4 }, { type = "relu" }], [],
                                 [{ type = "layernorm" }, { type = "linear", out = 3 }]] },
  { type = "residual", body = [{ type = "linear", out = 6 }], shortcut = [{ type = "linear", out = 6, bias = false }] },
  { type = "relu" },
  { type = "linear", out = 3 },
]

[train]
batch_size = 30
deterministic = true
micro_batch = 7
epochs = 20

[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
"""


def test_a_residual_and_concat_toml_model_is_bitwise_on_1_2_4_ranks_resumes_and_shards(serial, tmp_path):
    from test_train import synthetic_file
    data = synthetic_file(tmp_path / "data.h5", rows=150, features=6, classes=3, val=30)
    config = tmp_path / "blocks.toml"
    config.write_text(BLOCKS_TOML)
    sets = [f"data.path={json.dumps(str(data))}", "checkpoint.every_steps=4"]
    want = arrays_bytes(train(tmp_path / "b1", 0, sets, 8, str(config))[0])
    assert "params/1.residual.body.3.residual.body.1.linear.W" in want
    assert "params/2.concat.branches.2.0.layernorm.W" in want and "params/3.residual.shortcut.0.linear.W" in want
    for n in (2, 4):
        ck, _ = train(tmp_path / f"b{n}", n, [*sets, "train.shard_optimizer=false"], 8, str(config))
        assert arrays_bytes(ck) == want, f"{n} ranks differ from 1 rank"
    sharded, log = train(tmp_path / "zero", 2, [*sets, "train.shard_optimizer=true"], 8, str(config))
    assert "1/2 of it (train.shard_optimizer)" in log and arrays_bytes(sharded) == want
    train(tmp_path / "moved", 4, sets, 4, str(config))
    resumed, log = train(tmp_path / "moved", 2, sets, 8, str(config), resume="auto")
    assert "written by 4 rank(s), now 2" in log and arrays_bytes(resumed) == want


def test_sharded_and_replicated_resnet_agree(serial, tmp_path):
    data, _, _ = images(tmp_path / "img.h5", side=16, train=48)
    sets = [f"data.path={json.dumps(str(data))}", 'train.dtype="float64"', "train.batch_size=16"]
    replicated, _ = train(tmp_path / "rep", 2, [*sets, "train.shard_optimizer=false"], 4)
    sharded, log = train(tmp_path / "zero", 2, [*sets, "train.shard_optimizer=true"], 4)
    assert "1/2 of it (train.shard_optimizer)" in log
    for name, a in replicated.params.items():
        np.testing.assert_allclose(sharded.params[name], a, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("layers, words", [
    ('[{type="conv2d", out_channels=8, kernel=3, padding=1}, {type="residual", body=[{type="conv2d", '
     'out_channels=16, kernel=3, padding=1, stride=2}]}, {type="flatten"}, {type="linear", out=10}]',
     ["layer 1 (residual)", "projection shortcut", "stride = 2"]),
    ('[{type="concat", branches=[[{type="conv2d", out_channels=4, kernel=3, padding=1}], '
     '[{type="maxpool2d", kernel=2}]]}, {type="flatten"}, {type="linear", out=10}]',
     ["layer 0 (concat): branch 1 gives shape (3, 8, 8)", "same spatial size"]),
    ('[{type="residual", body=[]}]', ["layer 0 (residual): body is empty"]),
])
def test_a_bad_block_exits_2_before_anything_is_written(serial, tmp_path, layers, words):
    data, _, _ = images(tmp_path / "img.h5", side=16, train=20, val=5)
    run_dir = tmp_path / "run"
    proc = run_distbp(["train", "resnet", "--run-dir", run_dir, "--set", f"data.path={json.dumps(str(data))}",
                       "--set", "model.resnet_depth=0", "--set", f"model.layers={layers}", "--set", "train.batch_size=8"])
    assert proc.returncode == 2 and proc.stderr.count("distbp: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words), proc.stderr
    assert not run_dir.exists()


def test_ckpt_inspect_shows_the_block_tree(serial, tmp_path):
    data, _, _ = images(tmp_path / "img.h5", side=16, train=16, val=4)
    train(tmp_path / "run", 0, [f"data.path={json.dumps(str(data))}", "train.batch_size=8"], 1)
    proc = run_distbp(["ckpt", "inspect", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr
    tree = proc.stdout.split("parameter tree", 1)[1].splitlines()
    assert "  5.residual" in tree and "      0.conv2d.W  (32, 16, 3, 3)" in tree and "    shortcut" in tree


def test_synthetic_images_for_the_readme_recipe(serial, tmp_path):
    out = tmp_path / "images.h5"
    proc = run_distbp(["data", "synthetic", out, "--shape", "3,8,8", "--rows", "50", "--classes", "4"])
    assert proc.returncode == 0, proc.stderr
    from distbp.datasets.dataset import Dataset
    with Dataset(out) as d:
        assert d.input_shape == (3, 8, 8) and d.num_classes == 4 and d.split("train").n == 40
    bad = run_distbp(["data", "synthetic", tmp_path / "bad.h5", "--shape", "3,8"])
    assert bad.returncode == 2 and "must be C,H,W" in bad.stderr and not (tmp_path / "bad.h5").exists()
