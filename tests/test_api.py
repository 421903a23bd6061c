"""The public Python API: its surface, Config, train, load, user layers and losses (also from TOML by
module:Name), check_gradients, the example under mpirun, and every code block of docs/API.md."""
import importlib
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import distbp
from distbp import nn
from distbp.nn.layers import LAYER_TYPES
from distbp.nn.losses import LOSS_TYPES
from conftest import run_distbp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_layer.py"

PUBLIC = ["Callback", "Config", "ConfigError", "Model", "NonFiniteError", "UserError", "__version__", "load", "load_config",
          "nn", "rank", "train", "world_size"]
PUBLIC_NN = ["Activation", "AvgPool2D", "BCEWithLogits", "BatchNorm", "Block", "Chain", "Concat", "Context", "Conv2D",
             "Dropout", "Flatten", "Fork", "GELU", "GlobalAvgPool", "Layer",
             "LayerNorm", "LeakyReLU", "Linear", "Loss", "MSE", "MaxPool2D", "ReLU", "Reshape", "Residual", "Sequential",
             "Sigmoid", "SoftmaxCrossEntropy", "Softplus", "Tanh", "WeightLayer", "check_gradients", "check_spec",
             "register", "register_loss", "resnet_specs", "spec_value", "Embedding", "PositionEmbedding",
             "CausalSelfAttention", "TiedOutput", "TransformerBlock", "SequenceCrossEntropy"]


@pytest.fixture(autouse=True)
def registries():
    """Layers and losses a test registers leave with it (other tests list the registries)."""
    layers, losses = dict(LAYER_TYPES), dict(LOSS_TYPES)
    yield
    for registry, before in ((LAYER_TYPES, layers), (LOSS_TYPES, losses)):
        registry.clear()
        registry.update(before)
    for module in ("custom_layer", "ckmod_layers"):
        sys.modules.pop(module, None)


@pytest.fixture
def launch(serial):
    """run_distbp, in the serial session only (it starts its own mpirun jobs)."""
    return run_distbp


def test_public_surface_is_exported_and_documented():
    """Every public name exists, __all__ lists exactly them, and docs/API.md names each one."""
    assert sorted(distbp.__all__) == PUBLIC and sorted(nn.__all__) == sorted(PUBLIC_NN)
    doc = (ROOT / "docs" / "API.md").read_text()
    for name in PUBLIC:
        assert getattr(distbp, name) is not None and f"distbp.{name}" in doc, name
    for name in PUBLIC_NN:
        assert getattr(nn, name) is not None and f"nn.{name}" in doc, name
    importlib.import_module("distbp.training.loop")  # importing the loop's package leaves distbp.train the function
    assert callable(distbp.train) and distbp.train.__module__ == "distbp.api"


def test_config_from_dict_keywords_and_toml_agree(tmp_path):
    """The dict form, keyword sections and a TOML file give the same validated config."""
    (tmp_path / "c.toml").write_text("[train]\nepochs = 2\n[optim]\nlr = 0.1\n")
    a = distbp.Config({"train": {"epochs": 2}, "optim": {"lr": 0.1}})
    b = distbp.Config(train={"epochs": 2}, optim={"lr": 0.1})
    assert a == b == distbp.load_config(str(tmp_path / "c.toml"))
    assert a.train.epochs == 2 and a.optim.momentum == 0.0  # sgd's own default, resolved
    assert distbp.Config() == distbp.load_config(None)


@pytest.mark.parametrize("kwargs, message", [
    ({"train": {"epochz": 2}}, "unknown config key 'train.epochz'"),
    ({"train": {"epochs": "2"}}, "train.epochs='2' has the wrong type"),
    ({"optim": {"lr": -1}}, "optim.lr=-1.0 must be positive"),
    ({"trian": {}}, "unknown config key 'trian'"),
    ({"model": {"layers": [{"type": "nomodule_xyz:Layer"}]}},
     "model.layers[0].type='nomodule_xyz:Layer' names module nomodule_xyz, which is not in the current directory"),
    ({"model": {"layers": [{"type": "distbp.nn:Linear2"}]}},
     "names no registered layer class: decorate Linear2 in distbp.nn with @distbp.nn.register(\"linear2\")"),
    ({"loss": {"name": "huber"}}, "loss.name='huber' is not one of bce, cross_entropy, mse, sequence_cross_entropy, or module:ClassName"),
])
def test_config_rejects_what_toml_rejects(kwargs, message):
    """The same validation as a TOML file: a ConfigError naming the key."""
    with pytest.raises(distbp.ConfigError, match=re.escape(message)):
        distbp.Config(**kwargs)


def test_train_checks_a_config_changed_after_it_was_built(serial, tmp_path):
    """Fields set on a Config are checked again by train, before any run directory exists."""
    cfg = distbp.Config()
    cfg.train.batch_size = 0
    with pytest.raises(distbp.ConfigError, match="train.batch_size=0 must be at least 1"):
        distbp.train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def small_config(make_dataset, **train):
    """A small MLP config on a tiny dataset."""
    return distbp.Config(data={"path": str(make_dataset())}, model={"hidden": [8]},
                         train={"batch_size": 8, "epochs": 2, **train}, optim={"lr": 0.1})


def test_train_returns_the_summary_and_resumes(serial, tmp_path, make_dataset):
    """train returns metrics.jsonl's summary; a second call with more epochs continues from the checkpoint."""
    cfg = small_config(make_dataset)
    first = distbp.train(cfg, run_dir=tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert first["exit_code"] == 0 and first["steps"] == 10 and first["world_size"] == 1
    assert f'"params_crc32": "{first["params_crc32"]}"' in lines[-1]
    cfg.train.epochs = 3
    second = distbp.train(cfg, run_dir=tmp_path / "run", resume="auto")
    assert second["steps"] == 15
    assert '"resume": true' in (tmp_path / "run" / "metrics.jsonl").read_text()
    fresh = distbp.train(cfg, run_dir=tmp_path / "fresh")  # 3 epochs in one go: the same parameters
    assert fresh["params_crc32"] == second["params_crc32"]


def test_load_predicts_like_the_cli(serial, tmp_path, make_dataset):
    """distbp.load(run dir).predict_proba equals `distbp predict`'s probabilities; flat rows work too."""
    cfg = small_config(make_dataset)
    distbp.train(cfg, run_dir=tmp_path / "run")
    from distbp import cli
    ck = sorted((tmp_path / "run" / "checkpoints").glob("step-*.h5"))[-1]
    assert cli.main(["predict", str(ck), cfg.data.path, str(tmp_path / "p.h5")]) == 0
    model = distbp.load(tmp_path / "run")
    assert model.checkpoint == ck and model.task == "classification" and model.config == cfg
    with h5py.File(cfg.data.path) as f, h5py.File(tmp_path / "p.h5") as p:
        x = f["val/x"][:]
        np.testing.assert_allclose(model.predict_proba(x, batch=5), p["probabilities"][:], rtol=1e-6)
        np.testing.assert_array_equal(model.predict(x), p["class"][:])
    with pytest.raises(ValueError, match=r"x of shape \(2, 5\) and dtype float64 does not hold rows of the "
                                         r"model's input \(6,\)"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="dtype complex128 does not hold rows"):
        model.predict(np.zeros((2, 6), complex))
    x[1, 2] = np.nan
    with pytest.raises(distbp.UserError, match="x: NaN or Inf inputs, first at row 1"):
        model.predict(x)
    with pytest.raises(distbp.UserError, match="no valid checkpoint"):
        distbp.load(tmp_path)


def test_predict_edge_cases_of_the_api(serial, tmp_path, make_dataset):
    """0 rows give empty results; batch < 1 is refused; inputs overflowing after normalization are named."""
    distbp.train(small_config(make_dataset), run_dir=tmp_path / "run")
    model = distbp.load(tmp_path / "run")
    empty = np.zeros((0, 6), np.float32)
    assert model.predict(empty).shape == (0,) and model.predict(empty).dtype == np.int64
    assert model.predict_proba(empty).shape == (0, 3)
    for batch in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"batch={batch!r} must be a whole number of rows, at least 1"):
            model.predict(np.zeros((4, 6)), batch=batch)
    x = np.ones((9, 6))
    x[7, 1] = 1e300  # finite in float64, Inf in the model's float32
    with pytest.raises(distbp.UserError, match="x: NaN or Inf inputs, first at row 7"):
        model.predict(x, batch=4)


def test_a_typo_in_a_config_attribute_is_refused():
    c = distbp.Config()
    c.train.epochs = 5
    with pytest.raises(distbp.ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"):
        c.train.epoch = 5
    with pytest.raises(distbp.ConfigError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        c.trian = {}
    assert c.train.epochs == 5 and not hasattr(c.train, "epoch")


SWISH_MODULE = EXAMPLE.read_text()


def test_layer_and_loss_from_toml_by_module_name(launch, tmp_path):
    """`type = "custom_layer:Swish"` and `loss.name = "custom_layer:SmoothCrossEntropy"` from a TOML config
    train the example's layer and loss with the CLI: the same parameters as the example's Python run."""
    shutil.copy(EXAMPLE, tmp_path / "custom_layer.py")
    (tmp_path / "c.toml").write_text(
        '[model]\nlayers = [{ type = "linear", out = 64 }, { type = "custom_layer:Swish" }, '
        '{ type = "linear", out = 10 }]\n[loss]\nname = "custom_layer:SmoothCrossEntropy"\n'
        '[train]\nepochs = 5\n[optim]\nname = "adamw"\nlr = 0.003\n')
    toml = launch(["train", "c.toml", "--run-dir", "toml"], cwd=tmp_path)
    assert toml.returncode == 0, toml.stderr
    (ck,) = (tmp_path / "toml" / "checkpoints").glob("step-*.h5")
    with h5py.File(ck) as f:
        assert f["params/1.swish.beta"].shape == (64,)  # the layer's parameter, a view of the flat vector
    script = launch(["api"], cwd=tmp_path, script=tmp_path / "custom_layer.py")
    assert script.returncode == 0, script.stderr
    crc = re.findall(r"parameters crc32: (\w+)", toml.stdout)
    assert crc and crc == re.findall(r"parameters crc32: (\w+)", script.stdout)[-1:]


def test_example_under_mpirun_4(launch, tmp_path):
    """`mpirun -n 4 python examples/custom_layer.py` checks, trains and resumes a user layer and loss."""
    proc = launch([tmp_path / "run"], 4, script=EXAMPLE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = re.search(r"4 rank\(s\): after 3 epochs val_accuracy ([\d.]+); resumed to 5 epochs \(46 more steps\): "
                     r"val_accuracy ([\d.]+)", proc.stdout)
    assert line and float(line.group(2)) > 0.85, proc.stdout[-3000:]
    assert proc.stdout.count("Swish gradient check: max relative error") == 1  # printed by rank 0 only


FAILING = """
import sys
import numpy as np
import distbp
from distbp import nn

@nn.register("flaky")
class Flaky(nn.Activation):
    def forward(self, x):
        if distbp.rank() == 1 and self.ctx.step == 3:
            raise RuntimeError("flaky layer broke on rank 1")
        return x
    def backward(self, dy):
        return dy

try:
    distbp.train(distbp.Config(train={"epochs": "2"}), run_dir=sys.argv[1])
except distbp.ConfigError as e:
    print(f"rank {distbp.rank()} caught: {e}", flush=True)
layers = [{"type": "linear", "out": 16}, {"type": "flaky"}, {"type": "linear", "out": 10}]
distbp.train(distbp.Config(model={"layers": layers}, train={"epochs": 2}), run_dir=sys.argv[1])
print("not reached", flush=True)
"""


def test_errors_under_mpirun(launch, tmp_path):
    """A config error reaches every rank as an exception; a failure on one rank aborts the whole job."""
    (tmp_path / "failing.py").write_text(FAILING)
    proc = launch([tmp_path / "run"], 2, script=tmp_path / "failing.py", timeout=60)
    assert sorted(re.findall(r"rank (\d) caught: train.epochs='2' has the wrong type", proc.stdout)) == ["0", "1"]
    assert proc.returncode != 0 and "not reached" not in proc.stdout
    assert re.search(r"distbp: rank 1 on \S+ failed: RuntimeError: flaky layer broke on rank 1", proc.stderr)


def test_checkpoint_never_imports_a_module(serial, tmp_path, make_dataset, monkeypatch):
    """A checkpoint naming module:Class loads only once the user imported the module (a file runs no code)."""
    (tmp_path / "ckmod_layers.py").write_text(
        "from distbp import nn\n\n@nn.register('ckmod_id')\nclass Identity(nn.Activation):\n"
        "    def forward(self, x):\n        return x\n\n    def backward(self, dy):\n        return dy\n")
    monkeypatch.chdir(tmp_path)  # found in the current directory, as the CLI would
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    layers = [{"type": "linear", "out": 4}, {"type": "ckmod_layers:Identity"}, {"type": "linear", "out": 3}]
    cfg = distbp.Config(data={"path": str(make_dataset())}, model={"layers": layers}, train={"batch_size": 8})
    distbp.train(cfg, run_dir=tmp_path / "run")
    del sys.modules["ckmod_layers"]
    with pytest.raises(distbp.UserError, match="'ckmod_layers:Identity' is in module ckmod_layers, which distbp "
                                                "does not import for .*HINT: import ckmod_layers"):
        distbp.load(tmp_path / "run")
    from distbp import cli
    ck = str(next((tmp_path / "run" / "checkpoints").glob("step-*.h5")))
    assert cli.main(["eval", ck]) == 2 and "ckmod_layers" not in sys.modules
    import ckmod_layers  # noqa: F401
    assert distbp.load(tmp_path / "run").predict(np.zeros((2, 6))).shape == (2,)


def test_check_gradients_finds_a_wrong_backward():
    """check_gradients returns a tiny error for a right layer and names the wrong gradient otherwise."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from custom_layer import Swish
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    x = np.random.default_rng(1).standard_normal((3, 5))
    assert nn.check_gradients(Swish((5,)), x) < 1e-8

    class Wrong(Swish):
        def backward(self, dy):
            dx = super().backward(dy)
            self.dbeta *= 1.01
            return dx
    with pytest.raises(AssertionError, match=r"Wrong: dbeta differs from finite differences by 0.0\d+"):
        nn.check_gradients(Wrong((5,)), x)


    class InPlace(nn.Activation):
        def forward(self, x):
            x *= 2
            return x

        def backward(self, dy):
            return 2 * dy
    with pytest.raises(AssertionError, match="InPlace.forward changed its input x"):
        nn.check_gradients(InPlace((5,)), x)


def test_a_registered_name_belongs_to_one_class():
    """Registering another class under a taken name fails; the same class again (a module re-run) does not."""
    with pytest.raises(ValueError, match="layer type 'relu' registered twice"):
        nn.register("relu")(type("MyReLU", (nn.Activation,), {}))
    assert nn.register("relu")(nn.ReLU) is nn.ReLU


@pytest.mark.mpi(min_size=2)
def test_train_in_process_on_every_rank(comm, shared_tmp, make_dataset):
    """distbp.train called by every rank of the session trains one data-parallel run; all get one summary."""
    summary = distbp.train(small_config(make_dataset), run_dir=shared_tmp / "run")
    assert summary["world_size"] == comm.size and summary["steps"] == 10
    assert len(set(comm.gather_obj(summary["params_crc32"]) or [])) == (1 if comm.is_root else 0)


def test_every_code_block_of_API_md_runs(serial, tmp_path, monkeypatch):
    """The ```python blocks of docs/API.md, in order in one namespace, in an empty folder, twice in a row there
    (what a reader who runs the page again gets)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "API.md").read_text(), re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    for time in ("first", "second"):
        namespace = {"__name__": "api_md"}
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"docs/API.md block {i + 1}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"docs/API.md block {i + 1} fails the {time} time: {type(e).__name__}: {e}\n{block}")
    assert (tmp_path / "runs" / "huber" / "metrics.jsonl").is_file()
