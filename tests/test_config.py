"""Config: TOML files, shipped names, --set overrides, and one clear error per mistake."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distbp.config import (Config, ConfigError, config_from_dict, config_to_json, config_to_toml,
                           describe_keys, load_config, named_configs, parse_override)
from distbp.optim import make_optimizer


def test_defaults_and_named_configs():
    assert "digits" in named_configs()
    cfg = load_config("digits")
    assert cfg.model.hidden == [128] and cfg.train.batch_size == 64
    assert load_config(None) == Config()


def test_overrides_are_typed():
    cfg = load_config("digits", ["train.epochs=3", "optim.lr=1e-3", "model.hidden=[32, 16]",
                                 "optim.name=adam", "train.drop_last=false"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-3 and cfg.model.hidden == [32, 16]
    assert cfg.optim.name == "adam" and cfg.train.drop_last is False
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize("override, fragment", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("optim.schedule_step=3", "(did you mean 'optim.schedule_steps'?)"),
    ("train.batch_size=abc", "train.batch_size='abc' has the wrong type"),
    ("train.batch_size=0", "train.batch_size=0 must be at least 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be positive"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("optim.name=sgdx", "optim.name='sgdx' is not one of"),
    ("train.epochs=true", "train.epochs=True has the wrong type"),
    ("train.shard_optimizer=yes", 'train.shard_optimizer=\'yes\' must be true, false or "auto"'),
    ("train.shard_optimizer=1", "train.shard_optimizer=1 has the wrong type: expected bool or str"),
    ("epochs=3", "must look like section.key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert fragment in str(e.value)


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no config file or named config 'nosuch'"):
        load_config("nosuch")


def test_toml_round_trip(tmp_path):
    cfg = load_config("digits", ["model.layers=[{type = \"linear\", out = 10}]", "optim.name=adamw"])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(str(path)) == cfg


def test_every_key_documented():
    rows = describe_keys()
    assert len(rows) > 30 and all(meaning for *_, meaning in rows)


def test_override_parsing():
    assert parse_override("data.path=/tmp/x.h5") == ("data", "path", "/tmp/x.h5")
    assert parse_override("train.seed=7") == ("train", "seed", 7)


values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
keys = st.sampled_from([r[0] for r in describe_keys()] + ["train.nope", "zzz.epochs", "model"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=4))
def test_random_configs_give_config_or_clear_error(flat):
    d = {}
    for dotted, v in flat.items():
        section, _, key = dotted.partition(".")
        if not key:
            d[section] = v
        elif isinstance(d.setdefault(section, {}), dict):
            d[section][key] = v
    try:
        config_from_dict(d)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


def test_unset_optimizer_keys_take_that_optimizers_own_default():
    assert load_config(None, ["optim.name=adamw"]).optim.weight_decay == 0.01
    assert load_config(None, ["optim.name=adamw", "optim.weight_decay=0"]).optim.weight_decay == 0.0
    sgd = load_config(None).optim
    assert (sgd.momentum, sgd.weight_decay) == (0.0, 0.0)
    assert load_config("digits").optim.momentum == 0.9  # the shipped config sets it
    adam = load_config(None, ["optim.name=adam"])
    assert adam.optim.momentum is None  # adam has no momentum: left unset, and out of the TOML
    assert "momentum" not in config_to_toml(adam)
    assert config_from_dict(json.loads(config_to_json(adam))) == adam  # as evaluate reads a checkpoint's


def test_optimizer_options_reach_the_optimizer():
    opt = make_optimizer("rmsprop", 3, "float64", **load_config(None, [
        "optim.name=rmsprop", "optim.centered=true", "optim.momentum=0.5"]).optim.optimizer_options())
    assert opt.centered and opt.momentum == 0.5 and sorted(opt.state) == ["grad_avg", "momentum_buffer",
                                                                          "square_avg"]
    opt = make_optimizer("sgd", 3, "float64", **load_config(None, [
        "optim.dampening=0.3", "optim.momentum=0.9"]).optim.optimizer_options())
    assert (opt.dampening, opt.momentum) == (0.3, 0.9)


@pytest.mark.parametrize("overrides, fragments", [
    (["optim.nesterov=true", "optim.momentum=0"], ["optim.nesterov=true", "optim.momentum"]),
    (["optim.nesterov=true"], ["optim.nesterov=true", "optim.momentum"]),
    (["optim.nesterov=true", "optim.momentum=0.9", "optim.dampening=0.1"], ["optim.dampening=0"]),
    (["optim.schedule=cosine", "optim.min_lr=0.1"], ["optim.min_lr=0.1", "optim.lr=0.05"]),
    (["optim.dampening=1.5"], ["optim.dampening=1.5 must be in [0, 1]"]),
    (['model.layers=[{type = "dense"}]'], ["model.layers[0].type='dense' is not one of", "softplus"]),
    (["model.activation=swish"], ["model.activation='swish' is not one of", "softplus"]),
])
def test_cross_key_errors_name_every_key(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert all(f in str(e.value) for f in fragments), str(e.value)
