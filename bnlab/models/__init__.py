"""Models with the norm layer injected as one factory (``functools.partial``)."""

from bnlab.models.cnn import CNN, BasicBlock, ResNet20
from bnlab.models.mlp import ACTIVATIONS, MLP, PLACEMENTS, kernel_init

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "PLACEMENTS",
    "BasicBlock",
    "ResNet20",
    "kernel_init",
]
