"""Models with the norm layer injected as one factory (``functools.partial``)."""

from bnlab.models.cnn import CNN, BasicBlock, Bottleneck, ResNet20, ResNet50
from bnlab.models.mlp import ACTIVATIONS, MLP, PLACEMENTS, kernel_init
from bnlab.models.variant_mlp import VariantMLP, set_gates

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "PLACEMENTS",
    "BasicBlock",
    "Bottleneck",
    "ResNet20",
    "ResNet50",
    "VariantMLP",
    "kernel_init",
    "set_gates",
]
