"""Training controls in the loop: PyTorch on the same weights and batches, 1 vs n ranks, resume, early stopping."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distbp.training.loop import Trainer
from distbp.files.checkpoint import checkpoint_name, load
from distbp.parallel.comm import SerialComm
from distbp.config import load_config
from distbp.datasets.dataset import Dataset, synthetic, write_dataset
from distbp.errors import UserError
from distbp.inference.evaluate import evaluate_checkpoint
from distbp.parallel.sampler import GlobalBatches
from distbp.inference.builders import build_model
from conftest import import_torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def imbalanced_file(path, rows=232, classes=3, val=40, seed=0) -> Path:
    """A learnable dataset whose classes hold about 1/2, 1/3 and 1/6 of the rows."""
    x, _ = synthetic(rows, 6, classes, seed)
    y = np.array([0, 0, 0, 1, 1, 2])[np.random.default_rng(seed).permutation(rows) % 6]
    x[np.arange(rows), y] += 2.0  # the label shows in the features
    return write_dataset(path, {"train": (x[val:], y[val:]), "val": (x[:val], y[:val])}, num_classes=classes)


def config(path, *sets):
    """A float64 MLP config on path, logging every step, no periodic checkpoints; inputs as stored (the
    PyTorch reference reads them so)."""
    return load_config(None, [f'data.path="{path}"', 'data.normalize="none"', 'train.dtype="float64"', "model.hidden=[8]",
                              "train.log_every=1", f"train.max_steps={STEPS}", *sets])


def run(cfg, comm, run_dir, resume="never") -> Trainer:
    """Train in this process; the Trainer after its run (exit code checked)."""
    trainer = Trainer(cfg, comm, run_dir, resume)
    assert trainer.train() == 0
    return trainer


def records(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- each control against PyTorch on the same weights and batches --------------------------------


def torch_run(cfg, path, steps: int):
    """(final parameters by name, pre-clip gradient norms) of the same MLP, batches and optimizer in PyTorch."""
    torch = import_torch()
    t, o, lc = cfg.train, cfg.optim, cfg.loss
    with Dataset(path) as ds:
        split = ds.split("train")
        x, y = split.read(np.arange(split.n), np.float64)
        model = build_model(cfg, ds)
        counts = np.bincount(y, minlength=ds.num_classes)
    linears = [layer for layer in model.layers if layer.kind == "linear"]
    modules = []
    for layer in linears:
        lin = torch.nn.Linear(layer.d_in, layer.d_out, dtype=torch.float64)
        lin.weight.data, lin.bias.data = torch.tensor(layer.W.T.copy()), torch.tensor(layer.b.copy())
        modules += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*modules[:-1])
    weights = lc.class_weights or None
    if weights == "balanced":
        weights = len(y) / (len(counts) * counts)
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=lc.label_smoothing)
    opt = (torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum) if o.name == "sgd"
           else torch.optim.Adam(net.parameters(), lr=o.lr))
    batches = GlobalBatches(len(y), t.batch_size * t.accumulate_steps, t.seed, t.drop_last)
    norms = []
    for step in range(steps):  # one large batch per step: what accumulation must equal
        idx = batches.indices(*divmod(step, batches.steps_per_epoch))
        opt.zero_grad()
        criterion(net(torch.tensor(x[idx])), torch.tensor(y[idx])).backward()
        params = list(net.parameters())
        norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in params]))))
        if o.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad_norm)
        if o.clip_grad_value:
            torch.nn.utils.clip_grad_value_(params, o.clip_grad_value)
        opt.step()
    final = {}
    for i, lin in zip(range(0, 2 * len(linears), 2), modules[::2]):
        final[f"{i}.linear.W"], final[f"{i}.linear.b"] = lin.weight.detach().numpy().T, lin.bias.detach().numpy()
    return final, norms


CONTROLS = {
    "clip-norm": ["optim.clip_grad_norm=0.3", "optim.momentum=0.9"],
    "clip-value": ["optim.clip_grad_value=0.05", 'optim.name="adam"', "optim.lr=0.01"],
    "accumulate": ["train.batch_size=8", "train.accumulate_steps=4", "optim.momentum=0.9"],
    "accumulate-clip": ["train.batch_size=6", "train.accumulate_steps=3", "optim.clip_grad_norm=0.2",
                        'optim.name="adam"', "optim.lr=0.01"],
    "label-smoothing": ["loss.label_smoothing=0.2", "optim.momentum=0.9"],
    "class-weights": ["loss.class_weights=[0.5, 2.0, 3.0]", "optim.momentum=0.9"],
    "balanced-smoothing-accumulate": ['loss.class_weights="balanced"', "loss.label_smoothing=0.1",
                                      "train.batch_size=10", "train.accumulate_steps=2", "optim.momentum=0.9"],
}


@pytest.mark.parametrize("control", CONTROLS)
def test_control_matches_pytorch_over_20_steps(control, tmp_path):
    path = imbalanced_file(tmp_path / "data.h5")
    cfg = config(path, "train.batch_size=24", "optim.lr=0.1", *CONTROLS[control])
    trainer = run(cfg, SerialComm(), tmp_path / "run")
    expected, norms = torch_run(cfg, path, STEPS)
    ours = trainer.model.views(trainer.model.params)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    logged = [r["grad_norm"] for r in records(tmp_path / "run") if "grad_norm" in r]
    np.testing.assert_allclose(logged, norms, rtol=1e-10)  # the norm before clipping, every step


# --- the same parameters at 1, 2 and 4 ranks, and across a resume at another rank count ---------


EQUAL_RUNS = {  # (settings, whether deterministic mode makes them bitwise)
    "accumulate-clip-dropout": (["train.batch_size=12", "train.accumulate_steps=3", "optim.clip_grad_norm=0.2",
                                 "model.dropout=0.3", 'loss.class_weights="balanced"'], False),
    "accumulate-batchnorm": (["train.batch_size=12", "train.accumulate_steps=2", "optim.clip_grad_value=0.02",
                              'model.layers=[{type="linear", out=8}, {type="batchnorm"}, {type="relu"}, '
                              '{type="linear", out=3}]'], False),
    "sharded-accumulate-clip": (["train.shard_optimizer=true", "train.batch_size=12", "train.accumulate_steps=3",
                                 "optim.clip_grad_norm=0.2", 'optim.name="adam"', "optim.lr=0.01"], False),
    "deterministic-sharded": (["train.deterministic=true", "train.shard_optimizer=true", "train.micro_batch=6",
                               "train.batch_size=12", "train.accumulate_steps=2", "optim.clip_grad_value=0.02"],
                              True),
    "deterministic": (["train.deterministic=true", "train.micro_batch=5", "train.batch_size=12",
                       "train.accumulate_steps=3", "optim.clip_grad_norm=0.2", "model.dropout=0.3",
                       "loss.label_smoothing=0.1", 'loss.class_weights="balanced"'], True),
}


def same(a: np.ndarray, b: np.ndarray, bitwise: bool) -> bool:
    """Bitwise equal, or equal to float64 rounding over a few steps."""
    return a.tobytes() == b.tobytes() if bitwise else np.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.mpi
@pytest.mark.parametrize("case", EQUAL_RUNS)
def test_world_equals_one_rank_and_resumes_at_another_rank_count(case, comm, shared_tmp):
    sets, bitwise = EQUAL_RUNS[case]
    path = shared_tmp / "data.h5"
    if comm.is_root:
        imbalanced_file(path)
    comm.barrier()
    full = config(path, "optim.lr=0.1", "optim.momentum=0.9", "train.eval_every=4", *sets)
    half = config(path, "optim.lr=0.1", "optim.momentum=0.9", "train.eval_every=4", *sets,
                  f"train.max_steps={STEPS // 2}")
    mine = Path(shared_tmp) / f"rank{comm.rank}"  # each rank's own single-rank runs
    alone = run(full, SerialComm(), mine / "alone").model.params.copy()
    world = run(full, comm, shared_tmp / "world").model.params.copy()
    run(half, comm, shared_tmp / "world-half")  # n ranks, then 1 rank
    comm.barrier()
    shutil.copytree(shared_tmp / "world-half", mine / "resumed-alone")
    resumed_alone = run(full, SerialComm(), mine / "resumed-alone", resume="auto")
    run(half, SerialComm(), mine / "alone-half")  # 1 rank, then n ranks
    if comm.is_root:
        shutil.copytree(mine / "alone-half", shared_tmp / "resumed-world")
    comm.barrier()
    resumed_world = run(full, comm, shared_tmp / "resumed-world", resume="auto")
    assert resumed_alone.pos.step == resumed_world.pos.step == STEPS
    t = full.train  # an epoch's last, smaller batch takes fewer passes of batch_size rows
    batches = GlobalBatches(resumed_world.train_split.n, t.batch_size * t.accumulate_steps, t.seed, t.drop_last)
    assert resumed_world.pos.micro_steps == sum(
        -(-len(batches.indices(*divmod(s, batches.steps_per_epoch))) // t.batch_size) for s in range(STEPS))
    checks = {"world": world, "resumed on 1 rank": resumed_alone.model.params,
              "resumed on the world": resumed_world.model.params}
    bad = comm.gather_obj([name for name, params in checks.items() if not same(params, alone, bitwise)])
    assert comm.bcast_obj(bad) == [[]] * comm.size


def test_accumulation_equals_the_large_batch_bitwise_in_deterministic_mode(tmp_path):
    path = imbalanced_file(tmp_path / "data.h5")
    common = ["train.deterministic=true", "train.micro_batch=4", "model.dropout=0.25", "optim.clip_grad_norm=0.3",
              "loss.label_smoothing=0.1", "loss.class_weights=[1.0, 2.0, 0.5]", "train.drop_last=false"]
    large = run(config(path, "train.batch_size=36", *common), SerialComm(), tmp_path / "large")
    for b, k in ((12, 3), (18, 2), (4, 9)):
        accumulated = run(config(path, f"train.batch_size={b}", f"train.accumulate_steps={k}", *common),
                          SerialComm(), tmp_path / f"acc{b}")
        assert accumulated.model.params.tobytes() == large.model.params.tobytes(), (b, k)
        assert accumulated.pos.samples_seen == large.pos.samples_seen
        assert accumulated.pos.micro_steps > large.pos.micro_steps == STEPS
    plain = run(config(path, "train.batch_size=36", *common[1:]), SerialComm(), tmp_path / "plain")
    plain_acc = run(config(path, "train.batch_size=12", "train.accumulate_steps=3", *common[1:]), SerialComm(),
                    tmp_path / "plain-acc")
    np.testing.assert_allclose(plain_acc.model.params, plain.model.params, rtol=1e-10, atol=1e-13)


def test_resume_needs_the_same_rows_per_step_in_any_split(tmp_path):
    path = imbalanced_file(tmp_path / "data.h5")
    run(config(path, "train.batch_size=8", "train.accumulate_steps=4", "train.max_steps=5"), SerialComm(),
        tmp_path / "run")
    resumed = run(config(path, "train.batch_size=16", "train.accumulate_steps=2", "train.max_steps=8"),
                  SerialComm(), tmp_path / "run", resume="auto")
    assert (resumed.pos.step, resumed.pos.samples_seen, resumed.pos.micro_steps) == (8, 8 * 32, 5 * 4 + 3 * 2)
    straight = run(config(path, "train.batch_size=32", "train.max_steps=8"), SerialComm(), tmp_path / "straight")
    np.testing.assert_allclose(resumed.model.params, straight.model.params, rtol=1e-10, atol=1e-13)
    with pytest.raises(UserError, match=r"8 \* 2 differs from 16 \* 2 .*--set train.batch_size=16 --set "
                                        "train.accumulate_steps=2"):
        Trainer(config(path, "train.batch_size=8", "train.accumulate_steps=2", "train.max_steps=9"),
                      SerialComm(), tmp_path / "run", "auto")


# --- early stopping ----------------------------------------------------------------------------


STOP = ["train.batch_size=8", "train.eval_every=2",  # 24 steps per epoch: evaluations every 2 steps
        "train.early_stop_patience=3", "train.early_stop_min_delta=1.0"]  # no accuracy improves by more than 1


@pytest.mark.mpi
def test_early_stopping_stops_every_rank_at_the_same_step_and_resumes_counting(comm, shared_tmp):
    path = shared_tmp / "data.h5"
    if comm.is_root:
        imbalanced_file(path)
    comm.barrier()
    # evaluations at 2 (the best), 4, 6, 8: the third without improvement stops after step 8
    stopped = run(config(path, "train.max_steps=40", *STOP), comm, shared_tmp / "a")
    assert comm.bcast_obj(comm.gather_obj(stopped.pos.step)) == [8] * comm.size
    comm.barrier()
    if comm.is_root:
        summary = records(shared_tmp / "a")[-1]
        assert summary["steps"] == 8 and summary["exit_code"] == 0
        assert summary["stopped"].startswith("early stop: val_accuracy did not improve by more than 1 for 3 ")
        ck = load(shared_tmp / "a" / "checkpoints" / checkpoint_name(8))
        assert (ck.attrs["early_stop_wait"], ck.attrs["early_stop_best_step"]) == (3, 2)
    # to step 6 (two evaluations without improvement), then on one rank: the third one, at 8, stops
    run(config(path, "train.max_steps=6", *STOP), comm, shared_tmp / "b")
    comm.barrier()
    mine = Path(shared_tmp) / f"b-rank{comm.rank}"
    shutil.copytree(shared_tmp / "b", mine)
    resumed = run(config(path, "train.max_steps=40", *STOP), SerialComm(), mine, resume="auto")
    assert resumed.pos.step == 8 and resumed.stopped_early
    again = run(config(path, "train.max_steps=40", *STOP), SerialComm(), mine, resume="auto")
    assert again.pos.step == 8  # a stopped run stays stopped
    more = run(config(path, "train.max_steps=40", *STOP, "train.early_stop_patience=4"), SerialComm(), mine,
               resume="auto")
    assert more.pos.step == 10  # raising the patience trains on until it runs out again


def test_early_stopping_on_val_loss_for_regression(tmp_path):
    x, _ = synthetic(120, 4, 2, 0)
    y = x[:, :1] * 2.0
    path = write_dataset(tmp_path / "reg.h5", {"train": (x[20:], y[20:]), "val": (x[:20], y[:20])},
                         task="regression")
    cfg = load_config(None, [f'data.path="{path}"', "train.batch_size=10", "train.max_steps=200",
                             "train.eval_every=1", "train.early_stop_patience=2", "optim.lr=1e-9"])
    trainer = run(cfg, SerialComm(), tmp_path / "run")
    assert trainer.early.metric == "val_loss" and trainer.pos.step < 200
    assert "val_loss did not improve" in records(tmp_path / "run")[-1]["stopped"]


# --- class weights, bad input, the example ------------------------------------------------------


def test_labels_read_alone_match_read_in_memory_and_from_file(tmp_path):
    path = imbalanced_file(tmp_path / "data.h5")
    with Dataset(path) as ds:
        split = ds.split("train")
        idx = np.array([5, 3, 3, 190, 0])
        streamed = split.labels(idx)
        assert split.load()
        np.testing.assert_array_equal(streamed, split.labels(idx))
        np.testing.assert_array_equal(streamed, split.read(idx)[1])
        assert split.labels([]).shape == (0,)


@pytest.mark.parametrize("sets, match", [
    (["loss.class_weights=[1.0, 2.0]"], "loss.class_weights has 2 weights .* has 3 classes"),
    (["loss.class_weights=[0, 0, 0]"], "not all 0"),
    (['loss.class_weights="balanced"', "data.train_split='empty2'"], r"class\(es\) \[2\] have no rows"),
])
def test_bad_class_weights_name_the_key_and_the_fix(tmp_path, sets, match):
    path = imbalanced_file(tmp_path / "data.h5")
    x, y = synthetic(30, 6, 2, 1)
    write_dataset(tmp_path / "two.h5", {"empty2": (x, y), "val": (x, y)}, num_classes=3)
    if "data.train_split='empty2'" in sets:
        path = tmp_path / "two.h5"
    with pytest.raises(UserError, match=match):
        Trainer(config(path, "train.batch_size=10", *sets), SerialComm(), tmp_path / "run", "never")


def test_loss_options_on_a_regression_dataset_are_an_error(tmp_path):
    x, _ = synthetic(60, 4, 2, 0)
    path = write_dataset(tmp_path / "reg.h5", {"train": (x, x[:, :1]), "val": (x, x[:, :1])}, task="regression")
    with pytest.raises(UserError, match="apply to classification, but .* is a regression dataset"):
        Trainer(load_config(None, [f'data.path="{path}"', "train.batch_size=10",
                                                     "loss.label_smoothing=0.1"]), SerialComm(),
                      tmp_path / "run", "never")


def test_the_training_controls_example_runs(tmp_path):
    cfg = load_config(str(ROOT / "examples" / "training-controls.toml"), ["train.max_steps=6", "train.eval_every=3"])
    trainer = run(cfg, SerialComm(), tmp_path / "run")
    assert trainer.pos.micro_steps == 6 * 4 and trainer.loss.weighted and trainer.loss.eps == 0.1
    assert all(r["grad_norm"] > 0 for r in records(tmp_path / "run") if "grad_norm" in r)
    final = tmp_path / "run" / "checkpoints" / checkpoint_name(6)
    assert evaluate_checkpoint(str(final), SerialComm())["loss"] == pytest.approx(trainer.result["val_loss"],
                                                                                  rel=1e-6)
