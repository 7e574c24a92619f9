"""Training: :func:`fit` trains your own Flax model on your data, seeds x
hyper-parameters as arms of one program, on every device; :func:`load`
reads a run back. :func:`fit_config` is ``bnlab train``'s preset path."""

from bnlab.train.arms import Arm, make_arms
from bnlab.train.checkpoint import Checkpointer, CheckpointMismatchError, NonFiniteError
from bnlab.train.config import PRESETS, Config, ConfigError, load_config
from bnlab.train.early import EarlyStopping
from bnlab.train.loop import DATA_AXIS, fit
from bnlab.train.model import nnx_update
from bnlab.train.presets import build_model, build_optimizer, fit_config
from bnlab.train.result import FitResult, Loaded, load
from bnlab.train.rundir import (
    DiskFullError,
    RunDirError,
    WriteError,
    WritePermissionError,
)
from bnlab.train.step import TrainState

__all__ = [
    "DATA_AXIS",
    "PRESETS",
    "Arm",
    "CheckpointMismatchError",
    "Checkpointer",
    "Config",
    "ConfigError",
    "DiskFullError",
    "EarlyStopping",
    "FitResult",
    "Loaded",
    "NonFiniteError",
    "RunDirError",
    "TrainState",
    "WriteError",
    "WritePermissionError",
    "build_model",
    "build_optimizer",
    "fit",
    "fit_config",
    "load",
    "load_config",
    "make_arms",
    "nnx_update",
]
