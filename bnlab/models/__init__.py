"""Models with the norm layer injected as one factory (``functools.partial``)."""

from bnlab.models.cnn import CNN, BasicBlock, Bottleneck, ResNet20, ResNet50
from bnlab.models.mlp import ACTIVATIONS, MLP, PLACEMENTS, kernel_init

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "PLACEMENTS",
    "BasicBlock",
    "Bottleneck",
    "ResNet20",
    "ResNet50",
    "kernel_init",
]
