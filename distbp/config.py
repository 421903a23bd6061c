"""Typed configuration: one declaration per key (default, type, allowed values, doc), TOML files,
--set overrides and validation before training."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import schedules
from .errors import UserError, require
from .nn.blocks import nested_specs
from .nn.layers import activation_names, layer_class
from .nn.losses import loss_class
from .datasets.augment import KINDS as AUGMENT_KINDS
from .datasets.normalize import KINDS as NORMALIZE_KINDS
from .reporting.scores import BEST_CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(UserError):
    """A config file, key or value is wrong; the message names it and the fix."""


_INTERVAL = re.compile(r"^([\[(])(\S+), (\S+)([\])])$")  # "[0, 1)", "(0, inf)"


class KeysOnly:
    """A config (section) whose attributes are its keys only: setting another (a typo such as
    c.train.epoch = 5) raises instead of being silently ignored."""

    def __setattr__(self, name: str, value):
        known = [f.name for f in dataclasses.fields(self)]
        if name not in known:
            section = next((n for n, c in SECTIONS.items() if c is type(self)), None)
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"unknown config key {f'{section}.{name}' if section else name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; known keys here: {', '.join(sorted(known))}")
        object.__setattr__(self, name, value)


def key(default, doc: str, *, within: str = "", choices: tuple | Callable[[], tuple] = (),
        optimizer: bool = False, schedule: bool = False):
    """Declare a config key: default, doc, allowed range ("[0, 1)", "[1, inf)") or choices.

    optimizer/schedule mark keys passed by name to the optimizer class / make_schedule; an
    optimizer key whose default is None is resolved to the chosen optimizer's own default.
    """
    if within and not _INTERVAL.match(within):
        raise ValueError(f"within={within!r} must be an interval like '[0, 1)' or '(0, inf)'")
    meta = {"doc": doc, "within": within, "choices": choices, "optimizer": optimizer, "schedule": schedule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig(KeysOnly):
    """The network: an MLP from `hidden` widths, or explicit `layers` specs."""
    hidden: list[int] = key([128], "hidden layer widths of the MLP", within="[1, inf)")
    activation: str = key("relu", "activation between layers", choices=activation_names)
    dropout: float = key(0.0, "dropout probability after each hidden activation (0 = none)", within="[0, 1)")
    layers: list[dict] = key([], "explicit layer specs (overrides hidden/activation/dropout), e.g. conv "
                                 "models; see the layer types below")
    resnet_depth: int = key(0, "the CIFAR ResNet of He et al. at this depth (6n+2: 8, 14, 20, ...) for the "
                               "dataset's images and classes, instead of hidden/layers (0 = none)",
                            within="[0, inf)")


@dataclass
class DataConfig(KeysOnly):
    """Where the data is and how it is held in memory."""
    path: str = key("", "dataset HDF5 file; empty = the digits dataset shipped with distbp")
    train_split: str = key("train", "split trained on")
    val_split: str = key("val", "split evaluated after each epoch (empty = none)")
    memory_mb: int = key(2048, "splits up to this size are held in memory once per node; larger ones "
                               "stream", within="[0, inf)")
    normalize: str = key("standard", "input normalization with train split statistics: standard (zero mean, "
                                     "unit variance per feature, per channel for images), minmax ([0, 1]) or "
                                     "none; constant features get scale 1", choices=NORMALIZE_KINDS)
    normalize_targets: bool = key(True, "regression: standardize targets for training; metrics and "
                                        "predictions stay in the original units")
    augment: str = key("none", "training-time augmentation of image inputs: crop_flip (a random crop of the "
                               "4-pixel zero-padded image and a horizontal flip, drawn from seed, epoch and "
                               "row: the same at any rank count) or none", choices=AUGMENT_KINDS)


@dataclass
class TrainConfig(KeysOnly):
    """The loop: epochs, global batch, seed, precision, logging and safety."""
    epochs: int = key(30, "passes over the training split", within="[1, inf)")
    max_steps: int = key(-1, "stop after exactly this many optimizer steps (-1 = no limit)", within="[-1, inf)")
    batch_size: int = key(64, "GLOBAL batch size, split over the ranks", within="[1, inf)")
    seed: int = key(0, "seed of initialisation, data order and dropout", within="[0, inf)")
    dtype: str = key("float32", "precision of parameters and compute", choices=("float32", "float64"))
    drop_last: bool = key(False, "drop the last partial batch of each epoch (a warning says when that discards "
                                   "more than 10% of the rows)")
    eval_every: int = key(0, "also evaluate every N steps (0 = end of epoch only)", within="[0, inf)")
    log_every: int = key(50, "print a progress line every N steps when not on a terminal", within="[1, inf)")
    deterministic: bool = key(False, "bitwise-identical results on any number of ranks")
    micro_batch: int = key(64, "rows per fixed micro-shard in deterministic mode", within="[1, inf)")
    shard_optimizer: bool | str = key("auto", "ZeRO-1: each rank keeps and updates 1/N of the optimizer state "
                                      "(reduce-scatter, update, allgather); \"auto\": at 2 or more ranks for "
                                      "models of 1M parameters or more, where it was measured to win, unless "
                                      "train.overlap")
    overlap: bool = key(False, "reduce the gradient in buckets, each started as soon as backward has produced "
                               "it, while backward goes on (train.bucket_mb)")
    bucket_mb: float = key(1.0, "with train.overlap: megabytes of gradient per bucket (whole layers in reverse "
                                "layer order; a larger linear layer in pieces of this size)", within="(0, inf)")
    check_every: int = key(0, "compare a hash of the parameters across ranks every N steps (0 = off)",
                           within="[0, inf)")
    stall_timeout: float = key(300.0, "abort when a collective waits longer than this many seconds (0 = off); "
                                      "until a command has read its config, and before MPI is up, the bound is "
                                      "$DISTBP_STALL_TIMEOUT (default 300)", within="[0, inf)")
    best_metric: str = key("auto", "the metric that makes a checkpoint or epoch the best: auto = "
                                   "val_accuracy (max) for classification and binary, val_loss (min) for "
                                   "regression and sequences", choices=BEST_CHOICES)
    nonfinite: str = key("abort", "on a NaN/Inf loss or gradient: abort, or skip the step",
                         choices=("abort", "skip"))
    accumulate_steps: int = key(1, "forward/backward passes of batch_size rows each per optimizer step: "
                                   "a step's batch is batch_size * accumulate_steps rows", within="[1, inf)")
    early_stop_patience: int = key(0, "stop after this many evaluations without improvement of the best "
                                      "metric (0 = off)", within="[0, inf)")
    restore_best: bool = key(False, "end training on the weights of the best evaluation (train.best_metric): "
                                    "the final checkpoint and the summary's val metrics are theirs")
    early_stop_min_delta: float = key(0.0, "an evaluation improves only if it beats the best by more than "
                                           "this", within="[0, inf)")


@dataclass
class OptimConfig(KeysOnly):
    """The optimizer and its learning-rate schedule (PyTorch's names, equations and defaults)."""
    name: str = key("sgd", "optimizer", choices=lambda: tuple(_optim().OPTIMIZERS))
    lr: float = key(0.05, "peak learning rate", within="(0, inf)")
    momentum: float | None = key(None, "momentum (sgd, rmsprop)", within="[0, 1)", optimizer=True)
    dampening: float = key(0.0, "dampening of the momentum (sgd)", within="[0, 1]", optimizer=True)
    nesterov: bool = key(False, "Nesterov momentum (sgd; needs momentum > 0, dampening 0)", optimizer=True)
    weight_decay: float | None = key(None, "L2 penalty (sgd, adam, rmsprop) or decoupled decay (adamw)",
                                     within="[0, inf)", optimizer=True)
    beta1: float = key(0.9, "Adam first-moment decay", within="[0, 1)", optimizer=True)
    beta2: float = key(0.999, "Adam second-moment decay", within="[0, 1)", optimizer=True)
    eps: float = key(1e-8, "Adam/RMSprop denominator term", within="(0, inf)", optimizer=True)
    alpha: float = key(0.99, "RMSprop smoothing constant", within="[0, 1)", optimizer=True)
    centered: bool = key(False, "RMSprop: normalise by the centered second moment (variance)", optimizer=True)
    schedule: str = key("constant", "learning-rate schedule", choices=lambda: schedules.SCHEDULES)
    warmup_steps: int = key(0, "linear warm-up steps before the schedule", within="[0, inf)", schedule=True)
    step_size: int = key(1000, "steps between decays (step schedule)", within="[1, inf)", schedule=True)
    gamma: float = key(0.1, "decay factor: per step_size steps (step), per milestone (multistep), per step "
                            "(exponential), per plateau (plateau)", within="(0, inf)", schedule=True)
    min_lr: float = key(0.0, "final learning rate (cosine schedule), lowest one (plateau); at most optim.lr",
                        within="[0, inf)", schedule=True)
    milestones: list[int] = key([], "steps at which the multistep schedule multiplies the rate by gamma",
                                within="[1, inf)", schedule=True)
    pct_start: float = key(0.3, "onecycle: share of the steps spent rising to optim.lr", within="(0, 1)",
                           schedule=True)
    div_factor: float = key(25.0, "onecycle: starts at optim.lr / div_factor", within="(0, inf)", schedule=True)
    final_div_factor: float = key(1e4, "onecycle: ends at optim.lr / div_factor / final_div_factor",
                                  within="(0, inf)", schedule=True)
    plateau_patience: int = key(10, "plateau: evaluations without improvement of train.best_metric before the "
                                    "rate is multiplied by gamma", within="[0, inf)")
    plateau_threshold: float = key(1e-4, "plateau: relative improvement that counts", within="[0, inf)")
    plateau_cooldown: int = key(0, "plateau: evaluations to wait after a reduction", within="[0, inf)")
    clip_grad_norm: float = key(0.0, "scale the gradient down to this global L2 norm when above it, as "
                                     "torch.nn.utils.clip_grad_norm_ (0 = off)", within="[0, inf)")
    clip_grad_value: float = key(0.0, "clip every gradient entry to [-v, v], as torch.nn.utils.clip_grad_value_ "
                                      "(0 = off)", within="[0, inf)")
    schedule_steps: int = key(0, "steps the schedule spans (0 = the run's total steps); fix it to keep the "
                                 "horizon when train.epochs is raised on resume", within="[0, inf)")

    def resolve(self):
        """Set unset optimizer keys to the chosen optimizer's own default (None if it has none)."""
        optim = _optim()
        own = optim.defaults(self.name) if self.name in optim.OPTIMIZERS else {}
        for f in dataclasses.fields(self):
            if f.metadata["optimizer"] and getattr(self, f.name) is None:
                setattr(self, f.name, own.get(f.name))

    def unused_options(self) -> list[str]:
        """'optim.momentum=0.9' for each optimizer key set away from its default that the chosen optimizer
        does not take (momentum with adam): the run warns that it is ignored."""
        own = set(_optim().defaults(self.name) if self.name in _optim().OPTIMIZERS else ())
        own |= {"beta1", "beta2"} if "betas" in own else set()  # the config's halves of torch's betas pair
        return [f"optim.{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if f.metadata["optimizer"] and f.name not in own and getattr(self, f.name) is not None
                and getattr(self, f.name) != f.default]

    def optimizer_options(self) -> dict:
        """Keyword arguments for optim.make_optimizer (beta1, beta2 go as torch's betas pair)."""
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["optimizer"]}
        opts["betas"] = (opts.pop("beta1"), opts.pop("beta2"))
        return opts

    def schedule_options(self) -> dict:
        """Keyword arguments for schedules.make_schedule besides kind, lr and total_steps."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["schedule"]}


@dataclass
class LossConfig(KeysOnly):
    """The loss: the dataset task's own (with the options of the classification loss, softmax cross-entropy,
    as torch.nn.CrossEntropyLoss), or one of your own."""
    name: str = key("", "empty = the dataset task's (classification cross_entropy, regression mse, binary bce); "
                        "or a registered name, or module:ClassName of a loss registered in your own module")
    label_smoothing: float = key(0.0, "mix eps of the uniform distribution into the targets", within="[0, 1]")
    class_weights: list[float] | str = key([], "per-class weights: a list with one weight per class, or "
                                               "\"balanced\" (rows / (classes * rows of the class), from the "
                                               "train split); [] = none", within="[0, inf)")


@dataclass
class CheckpointConfig(KeysOnly):
    """When checkpoints are written and how many are kept."""
    every_steps: int = key(0, "write a checkpoint every N steps (0 = off)", within="[0, inf)")
    every_seconds: float = key(0.0, "write a checkpoint every N seconds (0 = off)", within="[0, inf)")
    keep: int = key(3, "keep the newest K checkpoints", within="[1, inf)")
    keep_best: bool | str = key("auto", "also keep the best checkpoint (train.best_metric) as checkpoints/best.h5, "
                                        "\"auto\": with early stopping or train.restore_best; "
                                 "never pruned; `--best` of eval, predict and ckpt selects it")


@dataclass
class LogConfig(KeysOnly):
    """Experiment trackers fed from the records of metrics.jsonl (rank 0)."""
    tensorboard: bool = key(False, "write TensorBoard event files into the run dir (pip install "
                                   "'distbp[tensorboard]')")
    mlflow: bool = key(False, "log params, metrics and the final checkpoint to MLflow (pip install "
                              "'distbp[mlflow]')")


@dataclass(init=False)
class Config(KeysOnly):
    """The whole resolved configuration of a run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __init__(self, tables: dict | None = None, /, *, training: bool = True, **sections):
        """A validated config from TOML-layout tables ({"train": {"epochs": 2}}) and/or keyword sections
        (train={"epochs": 2}; a keyword replaces the same table); unset keys keep their defaults.
        training=False (a trained model's stored config) takes the optim section as stored, unchecked."""
        if tables is not None and not isinstance(tables, dict):
            raise ConfigError(f"a config is a dict of sections like {{'train': {{'epochs': 2}}}}, not {tables!r}")
        given = {**(tables or {}), **sections}
        for name in given:
            if name not in SECTIONS:
                raise _unknown(name, SECTIONS)
        errors = []  # every key's error, reported together
        for name, section in SECTIONS.items():
            value = given.get(name, {})
            try:
                setattr(self, name, value if isinstance(value, section) else _section(name, value, errors))
            except ConfigError as e:
                errors.append(str(e))
                setattr(self, name, section())
        if training:
            self.optim.resolve()
        validate(self, training, errors)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    """Field name -> field of one config section."""
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _check_type(key: str, value, tp):
    """Return value converted to tp, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # `float | None`: None means unset
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:
            return _check_type(key, value, options[0])
        for option in options:  # `list[float] | str`: the first type that fits
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
        names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {names}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[128, 64]")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a table, e.g. {{type = \"linear\", out = 64}}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{key}={value!r} holds a NUL character, which no path or name can hold; HINT: remove it")
    if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp.__name__}")


def _range_phrase(within: str) -> str:
    """'[1, inf)' -> 'at least 1', '(0, inf)' -> 'positive', else 'in [0, 1)'."""
    lo_bracket, lo, hi, _ = _INTERVAL.match(within).groups()
    if hi == "inf":
        return f"at least {lo}" if lo_bracket == "[" else ("positive" if lo == "0" else f"greater than {lo}")
    return f"in {within}"


def _in_range(value: float, within: str) -> bool:
    """Whether value lies in the interval written like '[0, 1)'."""
    lo_bracket, lo, hi, hi_bracket = _INTERVAL.match(within).groups()
    lo, hi = float(lo), float(hi)
    above = value >= lo if lo_bracket == "[" else value > lo
    below = value <= hi if hi_bracket == "]" else value < hi
    return bool(above and below and not math.isnan(value))


def _choices(f: dataclasses.Field) -> tuple:
    """The allowed values of a key with choices (read from its registry when callable)."""
    c = f.metadata["choices"]
    return tuple(c() if callable(c) else c)


def _check_key(key: str, value, f: dataclasses.Field):
    """Raise ConfigError unless value is in the key's declared range or choices."""
    within, choices = f.metadata["within"], _choices(f)
    items = value if isinstance(value, list) else [value]
    if within and any(isinstance(v, int | float) and not _in_range(v, within) for v in items):
        what = "hold values" if isinstance(value, list) else "be"
        raise ConfigError(f"{key}={value!r} must {what} {_range_phrase(within)}")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _unknown(key: str, known) -> ConfigError:
    """An error for an unknown key that suggests the closest known one and lists them all."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(sorted(known))}")


def _section(section: str, values, errors: list | None = None) -> object:
    """One section's dataclass from its TOML table, every value type-checked; with errors, each bad key's
    message is appended there and the key keeps its default (else the first one is raised)."""
    if section not in SECTIONS:
        raise _unknown(section, SECTIONS)
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' must be a table ([{section}] in TOML)")
    types_, good, found = typing.get_type_hints(SECTIONS[section]), {}, []
    for k, v in values.items():
        try:
            if k not in types_:
                raise _unknown(f"{section}.{k}", [f"{section}.{n}" for n in types_])
            good[k] = _check_type(f"{section}.{k}", v, types_[k])
        except ConfigError as e:
            if errors is None:
                raise
            found.append(str(e))
    (errors if errors is not None else []).extend(found)
    return SECTIONS[section](**good)


def _all(errors: list[str]) -> ConfigError:
    """One ConfigError for all of errors, on one line (the CLI's one `distbp: error:` line)."""
    if len(errors) == 1:
        return ConfigError(errors[0])
    return ConfigError(f"{len(errors)} config errors: " + "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1)))


def config_from_dict(d: dict, training: bool = True) -> Config:
    """Build and validate a Config from nested dicts (TOML layout); unset optimizer keys are resolved
    (training=False: a stored config for inference, whose optim section is neither resolved nor checked)."""
    return Config(d, training=training)


def _optim():
    """The optimizer module, imported only where optim.* keys are resolved or checked (never for inference)."""
    from . import optim
    return optim


def _require(ok: bool, msg: str):
    """Raise ConfigError(msg) unless ok."""
    require(ok, msg, ConfigError)


def _resolves(find, name, key: str) -> None:
    """Raise ConfigError naming key unless find(name) finds a registered class (importing its module)."""
    try:
        find(name)
    except ValueError as e:
        raise ConfigError(f"{key}={name!r} {e}") from None


def validate(cfg: Config, training: bool = True, errors: list | None = None) -> None:
    """Check every key's range or choices, then the checks that span keys; raise one ConfigError naming every
    bad key with the errors found before (training=False: all but the optim section)."""
    errors = list(errors or [])
    for section in SECTIONS if training else [s for s in SECTIONS if s != "optim"]:
        for name, f in _fields(section).items():
            try:
                _check_key(f"{section}.{name}", getattr(getattr(cfg, section), name), f)
            except ConfigError as e:
                errors.append(str(e))
    if errors:  # the checks across keys need each key's own value right
        raise _all(errors)
    m, t, o = cfg.model, cfg.train, cfg.optim
    for path, spec in nested_specs(m.layers):
        _resolves(layer_class, spec.get("type"), f"model.layers[{path}].type")
    _require(not (m.resnet_depth and m.layers), f"model.resnet_depth={m.resnet_depth} and model.layers are both "
             "set: choose one (set model.resnet_depth=0 to train the layers)")
    _require(not m.resnet_depth or (m.resnet_depth >= 8 and (m.resnet_depth - 2) % 6 == 0),
             f"model.resnet_depth={m.resnet_depth} must be 6n + 2 with n >= 1: 8, 14, 20, 32, 44, 56 or 110")
    if cfg.loss.name:
        _resolves(loss_class, cfg.loss.name, "loss.name")
    _require(not (cfg.loss.name and (cfg.loss.label_smoothing or cfg.loss.class_weights)),
             f"loss.label_smoothing and loss.class_weights are options of the task's own loss, not of "
             f"loss.name={cfg.loss.name!r}: remove them, or loss.name")
    _require(isinstance(cfg.loss.class_weights, list) or cfg.loss.class_weights == "balanced",
             f"loss.class_weights={cfg.loss.class_weights!r} must be a list of weights, one per class, or \"balanced\"")
    _require(cfg.checkpoint.keep_best in (True, False, "auto"),
             f"checkpoint.keep_best={cfg.checkpoint.keep_best!r} must be true, false or \"auto\"")
    _require(not (t.restore_best and not cfg.data.val_split),
             "train.restore_best=true needs evaluations: set data.val_split")
    _require(t.shard_optimizer in (True, False, "auto"),
             f"train.shard_optimizer={t.shard_optimizer!r} must be true, false or \"auto\"")
    _require(not (o.clip_grad_norm and o.clip_grad_value),
             f"optim.clip_grad_norm={o.clip_grad_norm} and optim.clip_grad_value={o.clip_grad_value} are both "
             "set: choose one of them (set the other to 0)")
    _require(not (t.early_stop_patience and not cfg.data.val_split),
             f"train.early_stop_patience={t.early_stop_patience} needs evaluations: set data.val_split")
    norms = [f"model.layers[{p}]" for p, s in nested_specs(m.layers) if s.get("type") == "batchnorm"]
    _require(not (t.deterministic and (norms or m.resnet_depth)),
             f"train.deterministic=true cannot train a batchnorm layer ({(norms or ['model.resnet_depth'])[0]}): "
             "its batch statistics tie the micro-shards together; use layernorm, or train.deterministic=false")
    if not training:
        return
    try:  # the optimizer and schedule check their own arguments across keys (e.g. nesterov needs momentum)
        _optim().make_optimizer(o.name, 1, "float64", **o.optimizer_options())
        schedules.make_schedule(o.schedule, o.lr, total_steps=o.warmup_steps + 2, **o.schedule_options())
        if o.schedule == "plateau":
            schedules.Plateau(o.lr, "min", o.gamma, o.plateau_patience, o.plateau_threshold, o.plateau_cooldown,
                                 o.min_lr)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {source}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {source} is not UTF-8 text (byte {e.start}), so not a TOML "
                              "config; HINT: give a .toml file, e.g. one written by `distbp train` as "
                              "RUN_DIR/config.toml") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {source} is not valid TOML: {e}") from None
    except (RecursionError, ValueError) as e:  # arrays nested thousands deep; an integer of over 4300 digits
        raise ConfigError(f"config file {source}: {_unparsable(e)}") from None


def _unparsable(e: Exception) -> str:
    """Why valid-looking TOML could not be read: nesting too deep, or an integer too long."""
    if isinstance(e, RecursionError):
        return "a value nested too deeply to read (arrays or tables inside each other); HINT: no config key " \
               "nests more than a list of tables"
    return f"a value Python cannot read ({e}); HINT: integers of a config have at most a few digits"


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
    except (RecursionError, ValueError) as e:
        raise ConfigError(f"--set {dotted.strip()}=...: {_unparsable(e)}") from None
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
    """The config as a TOML document that load_config reads back (unset keys left out)."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _optimizer_defaults(name: str) -> str:
    """'sgd 0.0, rmsprop 0.0': the own default of every optimizer that takes the option."""
    optim = _optim()
    own = {o: optim.defaults(o) for o in optim.OPTIMIZERS}
    return ", ".join(f"{o} {_toml_value(d[name])}" for o, d in own.items() if name in d)


def describe_keys() -> list[tuple[str, str, object, str, str]]:
    """(key, type, default, allowed values, meaning) for every config key, for docs and --help."""
    rows = []
    for section in SECTIONS:
        types_ = typing.get_type_hints(SECTIONS[section])
        for f in dataclasses.fields(SECTIONS[section]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata["doc"]
            if default is None:
                doc += f"; unset = the optimizer's own default ({_optimizer_defaults(f.name)})"
            allowed = f.metadata["within"] or ", ".join(_choices(f))
            tp = str(types_[f.name]).replace("typing.", "").replace(" | None", "").replace(" | ", " or ")
            rows.append((f"{section}.{f.name}", tp, default, allowed, doc))
    return rows
