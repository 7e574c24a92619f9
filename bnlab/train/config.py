"""Validated training configuration: presets, JSON files, ``key=value`` overrides.

Configs are plain JSON (never pickle). Every error is raised before any work
starts and says what to change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.train.options import RunLength

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "load_config",
    "norm_spec",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


_CHOICES = {
    "dataset": ("digits", "fashion_mnist", "fashion_mnist_small", "mnist", "synthetic"),
    "model": ("mlp", "cnn", "resnet20"),
    "activation": ("relu", "sigmoid", "tanh"),
    "init": ("normal", "he", "lecun"),
    "optimizer": ("sgd", "momentum", "adam"),
    "schedule": ("constant", "step", "cosine"),
    "parallel": ("single", "pmap", "shard_map", "jit"),
}

# (key, low, high, low is exclusive): finite values in [low, high] / (low, high]
_RANGES = (
    ("lr", 0.0, 1e3, True),
    ("momentum", 0.0, 1.0, False),
    ("weight_decay", 0.0, 1.0, False),
    ("init_std", 0.0, 1e3, True),
    ("step_factor", 0.0, 1e3, True),
    ("bn_momentum", 0.0, 1.0, False),
    ("bn_epsilon", 0.0, 1.0, True),
    ("seed", 0, 2**32 - 1, False),
    ("steps", 1, 10**9, False),
    ("batch_size", 1, 10**7, False),
    ("width", 1, 2**16, False),
    ("depth", 1, 1000, False),
    ("validation", 0.0, 0.5, False),
)
# The largest model a config may build (float32 parameters): beyond this a
# typo (width=1e9) would abort, hang or exhaust memory instead of failing.
MAX_PARAMETERS = 10**9

# How long a run trains and when it evaluates and saves: a run may resume
# with other values of these (every other field must agree). The same keys
# as fit's RunLength.
RUN_LENGTH_FIELDS = tuple(f.name for f in dataclasses.fields(RunLength))


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. See ``PRESETS`` for ready-made ones.

    Attributes:
      dataset: digits | fashion_mnist | fashion_mnist_small (shipped 14x14
        subset) | mnist | synthetic.
      data_dir: where IDX files live (see :func:`bnlab.data.find_idx_files`).
      model: mlp | cnn | resnet20 (the NNX MLP is bnlab.models.nnx_mlp).
      depth: hidden layers of the MLP.
      width: hidden width of the MLP.
      activation: relu | sigmoid | tanh.
      norm: normalization: none | before | after (BN before / after the
        activation) | a variant ``bn``, ``ghost:G`` (ghost batches of G
        examples), ``renorm`` (batch renormalization, r_max 3, d_max 5) or
        ``frozen`` (running statistics only), optionally ``@after``.
      init: kernel init: normal (N(0, init_std^2)) | he | lecun.
      init_std: std of the ``normal`` init.
      zero_init_last_gamma: ResNet: last BN scale of each block starts at 0.
      optimizer: sgd | momentum | adam.
      lr: peak learning rate.
      momentum: SGD momentum (optimizer=momentum).
      weight_decay: decoupled weight decay (AdamW-style, arXiv:1711.05101):
        each step adds ``-lr_t * weight_decay * w`` to the optimizer's update
        ``-lr_t * direction`` (``lr_t`` the scheduled rate; the decay enters
        neither momentum nor Adam's moments), for parameters with ``ndim >
        1`` only (kernels; not biases or BN scale / bias). 0 disables.
      schedule: constant | step | cosine.
      warmup_steps: linear warm-up steps before the schedule.
      step_every: step schedule: multiply the lr by ``step_factor`` every N.
      step_factor: see ``step_every``.
      batch_size: global batch size (all devices and processes).
      steps: total training steps.
      seed: PRNG seed of the initialization and the batch order; the data
        split does not depend on it (every seed sees the same test set).
      parallel: single | pmap | shard_map | jit (data parallel over devices).
      bn_momentum: BN running-statistics momentum (Flax convention).
      bn_epsilon: BN epsilon.
      bn_group_size: devices per BN statistics group under pmap / shard_map
        (0 = all devices); each group normalizes with its own statistics and
        the running statistics are averaged over the groups.
      checkpoint_every: save every N steps (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      eval_every: evaluate every N steps (and at the end).
      eval_batch_stats: also evaluate with test-batch statistics.
      validation: fraction of the training set held out as the validation
        split (records ``val_*``); 0 for none.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    depth: int = 3
    width: int = 128
    activation: str = "relu"
    norm: str = "before"
    init: str = "lecun"
    init_std: float = 1.0
    zero_init_last_gamma: bool = False
    optimizer: str = "momentum"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_every: int = 1000
    step_factor: float = 0.1
    batch_size: int = 128
    steps: int = 600
    seed: int = 0
    parallel: str = "single"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 200
    eval_batch_stats: bool = False
    validation: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(
                    f"{key}={getattr(self, key)!r} is not one of {choices}."
                )
        positive = (
            "depth",
            "width",
            "batch_size",
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "step_every",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1.")
        norm_spec(self.norm)  # raises ConfigError for a bad spelling
        if self.bn_group_size < 0:
            raise ConfigError(f"bn_group_size={self.bn_group_size} must be >= 0.")
        if self.bn_group_size and self.parallel not in ("pmap", "shard_map"):
            raise ConfigError(
                f"bn_group_size={self.bn_group_size} needs parallel='pmap' or "
                "'shard_map' (explicit device groups)."
            )
        for key, lo, hi, lo_open in _RANGES:
            v = getattr(self, key)
            ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                left = "(" if lo_open else "["
                raise ConfigError(
                    f"{key}={v!r} is outside its valid range "
                    f"{left}{_num(lo)}, {_num(hi)}]."
                )
        if norm_spec(self.norm)[0] != "none" and self.batch_size < 2:
            raise ConfigError(
                f"batch_size={self.batch_size}: BN needs at least 2 examples per "
                "batch for batch statistics (or set norm='none')."
            )
        if self.momentum >= 1.0:
            raise ConfigError(f"momentum={self.momentum} must be < 1.")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"bn_momentum={self.bn_momentum} must lie in [0, 1).")
        if float(np.float32(self.bn_epsilon)) <= 0.0:
            raise ConfigError(
                f"bn_epsilon={self.bn_epsilon} rounds to 0 in float32; use >= 1e-30."
            )
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})."
            )
        if self.dataset == "synthetic" and self.model != "mlp":
            raise ConfigError(
                "dataset='synthetic' is a 2-feature regression: use model='mlp'."
            )
        if self.model == "resnet20" and norm_spec(self.norm)[0] == "none":
            raise ConfigError("model='resnet20' always uses BN: set norm='before'.")
        if self.model == "mlp":
            inputs = {
                "fashion_mnist": 784,
                "mnist": 784,
                "fashion_mnist_small": 196,
            }.get(self.dataset, 64)
            n = inputs * self.width + (self.depth - 1) * self.width**2 + 10 * self.width
            if n > MAX_PARAMETERS:
                raise ConfigError(
                    f"width={self.width}, depth={self.depth} make an MLP of {n:.2g} "
                    f"parameters ({4 * n / 2**30:.3g} GiB); the limit is "
                    f"{MAX_PARAMETERS:.0e}. Use a smaller width or depth."
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {unknown}; valid keys: {sorted(known)}."
            )
        return cls(**d)

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**self.to_dict(), **changes})

    def check_devices(self, device_count: int, process_count: int = 1) -> None:
        """Raises ConfigError if the batch cannot be split over the devices."""
        if self.parallel == "single":
            if process_count > 1:
                raise ConfigError(
                    f"parallel='single' cannot run on {process_count} processes; "
                    "use parallel='shard_map', 'jit' or 'pmap'."
                )
            return
        if self.batch_size % device_count:
            raise ConfigError(
                f"batch_size={self.batch_size} does not divide over {device_count} "
                f"devices (parallel={self.parallel!r}); use a multiple of "
                f"{device_count}, e.g. {device_count * max(1, self.batch_size // device_count)}."
            )
        if self.batch_size // device_count < 2 and norm_spec(self.norm)[0] != "none":
            raise ConfigError(
                "fewer than 2 examples per device: BN statistics are synced, but "
                "use a larger batch_size for meaningful per-device work."
            )


VARIANTS = ("bn", "renorm", "frozen")


def norm_spec(norm: str) -> tuple[str, str, int | None]:
    """``(variant, placement, ghost_size)`` of a ``norm`` value.

    Example:
      >>> norm_spec("ghost:64@after"), norm_spec("before"), norm_spec("none")
      (('bn', 'after', 64), ('bn', 'before', None), ('none', 'none', None))
    """
    if norm == "none":
        return "none", "none", None
    if norm in ("before", "after"):
        return "bn", norm, None
    variant, _, placement = norm.partition("@")
    placement = placement or "before"
    ghost = None
    if variant.startswith("ghost:"):
        try:
            ghost = int(variant.split(":", 1)[1])
        except ValueError:
            ghost = 0
        if ghost < 1:
            raise ConfigError(
                f"norm={norm!r}: ghost:G needs a positive integer G (examples per "
                "ghost batch), e.g. norm=ghost:32."
            )
        variant = "bn"
    if variant not in VARIANTS or placement not in ("before", "after"):
        raise ConfigError(
            f"norm={norm!r} is not one of none | before | after | "
            "bn | ghost:G | renorm | frozen, optionally followed by @after."
        )
    return variant, placement, ghost


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e12 else f"{v:g}"


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _check_type(name: str, value: Any, annotation: str) -> None:
    optional = "None" in annotation
    base = annotation.replace(" | None", "").strip()
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must not be None.")
    want = _TYPES[base]
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(
            f"{name}={value!r} has type {type(value).__name__}; expected {base}."
        )


PRESETS: dict[str, dict[str, Any]] = {
    # BN MLP on digits: >= 95% test accuracy in well under a minute on CPU.
    "digits": {},
    "digits_sigmoid": {"activation": "sigmoid", "optimizer": "sgd", "lr": 1.0},
    "digits_nobn": {"norm": "none"},
    "fashion_cnn": {
        "dataset": "fashion_mnist",
        "model": "cnn",
        "steps": 2000,
        "lr": 0.05,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
    "fashion_resnet20": {
        "dataset": "fashion_mnist",
        "model": "resnet20",
        "steps": 3000,
        "lr": 0.1,
        "zero_init_last_gamma": True,
        "warmup_steps": 100,
        "weight_decay": 5e-4,
        "eval_every": 500,
        "checkpoint_every": 500,
    },
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.3", "norm=none"]`` -> typed changes to a :class:`Config`."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value.")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys: {sorted(fields)}."
            )
        kind = fields[key].replace(" | None", "").strip()
        if raw.lower() in ("none", "null") and "None" in fields[key]:
            out[key] = None
        elif kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"{key} is a bool: use {key}=true or {key}=false.")
            out[key] = raw.lower() in ("true", "1")
        elif kind in ("int", "float"):
            try:
                out[key] = _TYPES[kind](raw)
            except ValueError:
                raise ConfigError(f"{key}={raw!r} is not a valid {kind}.") from None
        else:
            out[key] = raw
    return out


def load_config(spec: str | None = None, overrides: list[str] | None = None) -> Config:
    """A preset name or a JSON file path, then ``key=value`` overrides."""
    base: dict[str, Any] = {}
    if spec is not None:
        if spec in PRESETS:
            base = dict(PRESETS[spec])
        elif os.path.exists(spec):
            if os.path.isdir(spec):
                raise ConfigError(
                    f"--config {spec} is a directory; give a preset name or a JSON file."
                )
            try:
                base = json.loads(Path(spec).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise ConfigError(
                    f"config file {spec} is not UTF-8 text; give a JSON file."
                ) from None
            except OSError as e:
                raise ConfigError(
                    f"cannot read config file {spec}: {e.strerror}."
                ) from None
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"config file {spec} is not valid JSON: {e}"
                ) from None
            if not isinstance(base, dict):
                raise ConfigError(f"config file {spec} must hold a JSON object.")
        else:
            raise ConfigError(
                f"--config {spec!r} is neither a preset ({sorted(PRESETS)}) nor a file."
            )
    config = Config.from_dict(base)
    if overrides:
        config = config.replace(**parse_overrides(overrides))
    return config
