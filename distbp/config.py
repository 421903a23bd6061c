"""Typed configuration: dataclasses, TOML files, --set overrides and validation."""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine")


class ConfigError(UserError):
    """A config file, key or value is wrong; the message names it and the fix."""


@dataclass
class ModelConfig:
    """The network: an MLP from `hidden` widths, or explicit `layers` specs."""
    hidden: list[int] = field(default_factory=lambda: [128])
    activation: str = "relu"
    dropout: float = 0.0
    layers: list[dict] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where the data is and how it is held in memory."""
    path: str = ""
    train_split: str = "train"
    val_split: str = "val"
    memory_mb: int = 2048


@dataclass
class TrainConfig:
    """The loop: epochs, global batch, seed, precision, logging and safety."""
    epochs: int = 30
    max_steps: int = -1
    batch_size: int = 64
    seed: int = 0
    dtype: str = "float32"
    drop_last: bool = True
    eval_every: int = 0
    log_every: int = 50
    deterministic: bool = False
    micro_batch: int = 64
    check_every: int = 0
    stall_timeout: float = 300.0
    nonfinite: str = "abort"


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule."""
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    alpha: float = 0.99
    schedule: str = "constant"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.1
    min_lr: float = 0.0
    schedule_steps: int = 0


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""
    every_steps: int = 0
    every_seconds: float = 0.0
    keep: int = 3


@dataclass
class LogConfig:
    """Experiment trackers fed from the records of metrics.jsonl (rank 0)."""
    tensorboard: bool = False
    mlflow: bool = False


@dataclass
class Config:
    """The whole resolved configuration of a run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(name: str) -> dict[str, object]:
    """Field name -> resolved type of one config section."""
    cls = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
           "optim": OptimConfig, "checkpoint": CheckpointConfig, "log": LogConfig}[name]
    return typing.get_type_hints(cls)


def _check_type(key: str, value, tp):
    """Return value converted to tp, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[128, 64]")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a table, e.g. {{type = \"linear\", out = 64}}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp.__name__}")


def _unknown(key: str, known) -> ConfigError:
    """An error for an unknown key that suggests the closest known one and lists them all."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(sorted(known))}")


def config_from_dict(d: dict) -> Config:
    """Build and validate a Config from nested dicts (TOML layout)."""
    cfg = Config()
    for section, values in d.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS)
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' must be a table ([{section}] in TOML)")
        types = _section_types(section)
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in types:
                raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k in types])
            setattr(target, key, _check_type(f"{section}.{key}", value, types[key]))
    validate(cfg)
    return cfg


def _require(ok: bool, msg: str):
    """Raise ConfigError(msg) unless ok."""
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Check value ranges; raise ConfigError naming the key and the fix."""
    m, t, o, c = cfg.model, cfg.train, cfg.optim, cfg.checkpoint
    _require(all(h >= 1 for h in m.hidden), f"model.hidden={m.hidden} must hold positive widths")
    _require(m.activation in ACTIVATIONS,
             f"model.activation={m.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1), e.g. 0.1")
    _require(all("type" in s for s in m.layers), "every entry of model.layers needs a 'type' key")
    _require(t.epochs >= 1, f"train.epochs={t.epochs} must be at least 1")
    _require(t.max_steps >= -1, f"train.max_steps={t.max_steps} must be -1 (no limit) or >= 0")
    _require(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be at least 1, e.g. 64")
    _require(t.dtype in ("float32", "float64"), f"train.dtype={t.dtype!r} must be float32 or float64")
    _require(t.eval_every >= 0 and t.log_every >= 1 and t.check_every >= 0,
             "train.eval_every and train.check_every must be >= 0, train.log_every >= 1")
    _require(t.micro_batch >= 1, f"train.micro_batch={t.micro_batch} must be at least 1")
    _require(not (t.deterministic and any(s.get("type") == "batchnorm" for s in m.layers)),
             "train.deterministic=true cannot train a batchnorm layer (model.layers): its batch statistics "
             "tie the micro-shards together; use layernorm, or train.deterministic=false")
    _require(t.stall_timeout >= 0, f"train.stall_timeout={t.stall_timeout} must be >= 0 (0 = off)")
    _require(t.nonfinite in ("abort", "skip"), f"train.nonfinite={t.nonfinite!r} must be abort or skip")
    _require(o.name in OPTIMIZERS, f"optim.name={o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    _require(o.lr > 0, f"optim.lr={o.lr} must be positive, e.g. 0.01")
    _require(0.0 <= o.momentum < 1.0, f"optim.momentum={o.momentum} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(o.eps > 0 and 0.0 <= o.alpha < 1.0, "optim.eps must be > 0 and optim.alpha in [0, 1)")
    _require(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    _require(o.warmup_steps >= 0 and o.step_size >= 1 and o.gamma > 0 and o.min_lr >= 0,
             "optim.warmup_steps >= 0, optim.step_size >= 1, optim.gamma > 0, optim.min_lr >= 0")
    _require(o.schedule_steps >= 0, f"optim.schedule_steps={o.schedule_steps} must be >= 0 (0 = the run's steps)")
    _require(c.every_steps >= 0 and c.every_seconds >= 0,
             "checkpoint.every_steps and checkpoint.every_seconds must be >= 0 (0 = off)")
    _require(c.keep >= 1, f"checkpoint.keep={c.keep} must be at least 1")


def named_configs() -> list[str]:
    """Names of the configs that ship with the package."""
    files = resources.files("distbp") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def _read_toml(source: str) -> dict:
    """Parse a config file path or a shipped config name into a dict."""
    path = Path(source)
    if not path.suffix and not path.exists():
        if source not in named_configs():
            raise ConfigError(f"no config file or named config '{source}'; "
                              f"named configs: {', '.join(named_configs())}")
        text = (resources.files("distbp") / "configs" / f"{source}.toml").read_text()
    else:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {source}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {source} is not valid TOML: {e}") from None


def parse_override(item: str) -> tuple[str, str, object]:
    """Split 'section.key=value' into (section, key, value), value parsed as TOML."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. train.epochs=5")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(source: str | None = None, overrides: list[str] = ()) -> Config:
    """Load a TOML file or named config, apply --set overrides, validate."""
    d = _read_toml(source) if source else {}
    for item in overrides:
        section, key, value = parse_override(item)
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"'{section}' must be a table")
        d[section][key] = value
    return config_from_dict(d)


def config_to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def config_to_json(cfg: Config) -> str:
    """The config as one JSON string (stored in checkpoints)."""
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def _toml_value(v) -> str:
    """One value in TOML syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def config_to_toml(cfg: Config) -> str:
    """The config as a TOML document that load_config reads back."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def describe_keys() -> list[tuple[str, str, object, str]]:
    """(key, type, default, meaning) for every config key, for docs and --help."""
    rows = []
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{f.name}", str(_section_types(section)[f.name]).replace("typing.", ""),
                         default, KEY_DOCS.get(f"{section}.{f.name}", "")))
    return rows


KEY_DOCS = {
    "model.hidden": "hidden layer widths of the MLP",
    "model.activation": "activation between layers: " + ", ".join(ACTIVATIONS),
    "model.dropout": "dropout probability after each hidden activation (0 = none)",
    "model.layers": "explicit layer specs (overrides hidden/activation/dropout), e.g. conv models",
    "data.path": "dataset HDF5 file; empty = the digits dataset shipped with distbp",
    "data.train_split": "split trained on",
    "data.val_split": "split evaluated after each epoch (empty = none)",
    "data.memory_mb": "splits up to this size are held in memory once per node; larger ones stream",
    "train.epochs": "passes over the training split",
    "train.max_steps": "stop after exactly this many optimizer steps (-1 = no limit)",
    "train.batch_size": "GLOBAL batch size, split over the ranks",
    "train.seed": "seed of initialisation, data order and dropout",
    "train.dtype": "float32 or float64 for parameters and compute",
    "train.drop_last": "drop the last partial batch of each epoch",
    "train.eval_every": "also evaluate every N steps (0 = end of epoch only)",
    "train.log_every": "print a progress line every N steps when not on a terminal",
    "train.deterministic": "bitwise-identical results on any number of ranks",
    "train.micro_batch": "rows per fixed micro-shard in deterministic mode",
    "train.check_every": "compare a hash of the parameters across ranks every N steps (0 = off)",
    "train.stall_timeout": "abort when a collective waits longer than this many seconds (0 = off)",
    "train.nonfinite": "on a NaN/Inf loss or gradient: abort, or skip the step",
    "optim.name": "optimizer: " + ", ".join(OPTIMIZERS),
    "optim.lr": "peak learning rate",
    "optim.momentum": "momentum (sgd, rmsprop)",
    "optim.nesterov": "Nesterov momentum (sgd)",
    "optim.weight_decay": "L2 penalty (sgd, adam, rmsprop) or decoupled decay (adamw)",
    "optim.beta1": "Adam first-moment decay",
    "optim.beta2": "Adam second-moment decay",
    "optim.eps": "Adam/RMSprop denominator term",
    "optim.alpha": "RMSprop smoothing constant",
    "optim.schedule": "learning-rate schedule: " + ", ".join(SCHEDULES),
    "optim.warmup_steps": "linear warm-up steps before the schedule",
    "optim.step_size": "steps between decays (step schedule)",
    "optim.gamma": "decay factor (step schedule)",
    "optim.min_lr": "final learning rate (cosine schedule)",
    "optim.schedule_steps": "steps the schedule spans (0 = the run's total steps); fix it to keep the "
                            "horizon when train.epochs is raised on resume",
    "checkpoint.every_steps": "write a checkpoint every N steps (0 = off)",
    "checkpoint.every_seconds": "write a checkpoint every N seconds (0 = off)",
    "checkpoint.keep": "keep the newest K checkpoints",
    "log.tensorboard": "write TensorBoard event files into the run dir (pip install 'distbp[tensorboard]')",
    "log.mlflow": "log params, metrics and the final checkpoint to MLflow (pip install 'distbp[mlflow]')",
}
