"""Training: config -> state -> one jitted step -> metrics and checkpoints."""

from bnlab.train.checkpoint import Checkpointer, CheckpointMismatchError, NonFiniteError
from bnlab.train.config import PRESETS, Config, ConfigError, load_config
from bnlab.train.loop import fit
from bnlab.train.rundir import DiskFullError, RunDirError
from bnlab.train.state import TrainState, build_model, build_optimizer, init_state

__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "Checkpointer",
    "Config",
    "ConfigError",
    "DiskFullError",
    "NonFiniteError",
    "RunDirError",
    "TrainState",
    "build_model",
    "build_optimizer",
    "fit",
    "init_state",
    "load_config",
]
