"""The models of the comparison. Every classifier's last layer is called ``head``.

- ``mlp``: ``in-100-100-classes`` with ReLU (MNIST-1D's baseline MLP, Greydanus
  2020: 40-100-100-10); images are flattened.
- ``cnn``: for MNIST-1D, the baseline 1-D CNN of Greydanus 2020 (three
  stride-2 convolutions with 25 channels, then a linear classifier); for
  images, two 3x3 convolution + max-pool stages, a 100-unit hidden layer and
  the classifier.
- ``resnet``: a small ResNet for images (CIFAR-10): a 3x3 stem and three
  stages of one basic block each (16, 32, 64 channels), GroupNorm instead of
  BatchNorm (no running statistics, so the functional training stays pure),
  global average pooling and the classifier.

- ``deep-mlp``: a deep plain MLP, ``--depth`` weight layers (the classifier
  included) of ``--width`` units (default 100) with ``--activation`` (tanh or
  relu), no skip connections and no normalisation layers.
- ``deep-cnn``: a deep plain CNN, ``--depth - 1`` 3x3 convolutions of
  ``--width`` channels (default 16; 1-D for MNIST-1D, 2-D for images; stride 2
  at the first and the middle one), ``--activation``, no skips and no
  normalisation, then global average pooling and the classifier.

No model has BatchNorm: batch statistics would be mutable state outside the
functional parameters.
"""

from __future__ import annotations

from torch import nn

from .._zoo import ACTIVATIONS, MLP, CNN1d, CNN2d, DeepCNN, DeepMLP, SmallResNet

__all__ = [
    "ACTIVATIONS",
    "DATASET_SHAPES",
    "DEEP_MODELS",
    "HEAD_WEIGHT",
    "MODELS",
    "build_model",
    "default_model",
    "default_width",
]

MODELS = ("mlp", "cnn", "resnet", "deep-mlp", "deep-cnn")

DEEP_MODELS = ("deep-mlp", "deep-cnn")
"""The models that take ``--depth``, ``--width`` and ``--activation``."""

HEAD_WEIGHT = "head.weight"
"""The classifier's weight in every model: what ``--no-normalise-head`` leaves out."""

DATASET_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist1d": (40,),
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
"""The shape of one example of each data set (``data.load_dataset`` returns these), so
that a model is checked against its data set before any data is generated or read."""


def default_width(model: str) -> int:
    """``--width``'s default: 100 units for ``deep-mlp``, 16 channels for ``deep-cnn``."""
    return 16 if model == "deep-cnn" else 100


def default_model(dataset: str) -> str:
    """The model ``--model`` defaults to for ``dataset``."""
    return {"mnist1d": "mlp", "digits": "mlp", "mnist": "cnn", "cifar10": "resnet"}[dataset]


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    dataset: str | None = None,
    depth: int = 20,
    width: int | None = None,
    activation: str = "relu",
) -> nn.Module:
    """Build model ``name`` for examples of ``input_shape``; raises ``ValueError`` if it does not fit.

    ``dataset`` (the data set's name) only makes the error message name it;
    ``depth``, ``width`` and ``activation`` are the deep models' options.
    """
    if name == "deep-mlp":
        n = 1
        for d in input_shape:
            n *= d
        return DeepMLP(
            n, n_classes, depth=depth, width=width or default_width(name), activation=activation
        )
    if name == "deep-cnn" and len(input_shape) in (1, 3):
        return DeepCNN(
            input_shape,
            n_classes,
            depth=depth,
            width=width or default_width(name),
            activation=activation,
        )
    if name == "mlp":
        n = 1
        for d in input_shape:
            n *= d
        return MLP(n, n_classes)
    if name == "cnn":
        if len(input_shape) == 1:
            return CNN1d(input_shape[0], n_classes)
        if len(input_shape) == 3:
            return CNN2d(input_shape, n_classes)
    if name == "resnet" and len(input_shape) == 3:
        return SmallResNet(input_shape, n_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    what = f"--dataset {dataset} has" if dataset is not None else "the data set has"
    needs = "images (channels, height, width)" if name == "resnet" else "vectors or images"
    raise ValueError(
        f"--model {name} does not fit: {what} examples of shape {input_shape}, "
        f"{name} needs {needs} (use mlp or cnn)"
    )
