"""The benchmark's models, from the model zoo (``aon_func/_zoo.py``; nothing is downloaded).

Only the weight shapes matter for the ``apply`` benchmarks; the two models of
the training-step benchmark (ResNet-18 for 32 x 32 inputs and the MNIST-1D
MLP) also run forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from .._zoo import (
    MLP,
    DeepMLP,
    ShapeSet,
    gpt2_small,
    llama_1b,
    resnet18_cifar,
    resnet50,
    vit_s16,
)

__all__ = ["MODELS", "STEP_MODELS", "ModelSpec", "ShapeSet", "StepSpec", "resnet18_cifar"]


class ModelSpec(NamedTuple):
    """A weight-shape set: its description and a builder of the module."""

    description: str
    build: Callable[[], nn.Module]


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "8-layer 512-wide MLP (784-512x7-10)",
        lambda: DeepMLP(784, 10, depth=8, width=512, activation="relu"),
    ),
    "blocks12": ModelSpec(
        "12 blocks of 512x512 plus odd shapes (MLP 784-512x13-10)",
        lambda: DeepMLP(784, 10, depth=14, width=512, activation="relu"),
    ),
    "resnet18": ModelSpec("ResNet-18 for 32x32 inputs, 10 classes", resnet18_cifar),
    "resnet50": ModelSpec("ResNet-50, ImageNet, 1000 classes", resnet50),
    "vit_s16": ModelSpec("ViT-S/16 encoder, 1000 classes", vit_s16),
    "gpt2": ModelSpec("GPT-2 small, 48 attention/MLP matrices (no embeddings)", gpt2_small),
    "llama1b": ModelSpec("LLaMA-1B-like, 112 matrices up to 8192x2048 (4 GiB)", llama_1b),
    "tiny": ModelSpec(
        "tiny MLP 16-32-32-32-4 (smoke tests)",
        lambda: DeepMLP(16, 4, depth=4, width=32, activation="relu"),
    ),
}
"""The weight-shape sets of ``aon-func bench --models``."""


class StepSpec(NamedTuple):
    """A training-step benchmark: model, input shape, classes, batch, optimiser."""

    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    n_classes: int
    batch: int
    optimizer: str


STEP_MODELS: dict[str, StepSpec] = {
    "resnet18": StepSpec(
        "ResNet-18, batch 128, 3x32x32 inputs, SGD momentum 0.9",
        resnet18_cifar,
        (3, 32, 32),
        10,
        128,
        "sgd",
    ),
    "mnist1d_mlp": StepSpec(
        "MNIST-1D MLP 40-100-100-10, batch 100, Adam",
        lambda: MLP(40, 10),
        (40,),
        10,
        100,
        "adam",
    ),
    "tiny": StepSpec(
        "tiny MLP 16-32-32-32-4, batch 8, SGD (smoke tests)",
        lambda: DeepMLP(16, 4, depth=4, width=32, activation="relu"),
        (16,),
        4,
        8,
        "sgd",
    ),
}
"""The training-step benchmarks of ``aon-func bench --steps``."""
