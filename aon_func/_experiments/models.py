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

import torch
from torch import Tensor, nn

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

ACTIVATIONS = ("tanh", "relu")

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


class MLP(nn.Module):
    """``in - hidden - hidden - classes`` with ReLU."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN1d(nn.Module):
    """MNIST-1D's baseline CNN (Greydanus 2020): 3 conv layers, 25 channels, stride 2."""

    def __init__(self, length: int, n_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.head = nn.Linear(channels * n, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], 1, x.shape[-1])
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.head(h.flatten(1))


class CNN2d(nn.Module):
    """Two conv(3x3) + ReLU + max-pool(2) stages (32, 64 channels), a 100-unit layer, the head."""

    def __init__(self, in_shape: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (h // 4) * (w // 4), 100)
        self.head = nn.Linear(100, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


class BasicBlock(nn.Module):
    """``relu(x + GN(conv(relu(GN(conv(x))))))``, with a 1x1 conv shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.shortcut: nn.Module = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: stem, three one-block stages (16, 32, 64), average pool, head."""

    def __init__(self, in_shape: tuple[int, ...], n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(8, width)
        self.stage1 = BasicBlock(width, width, 1)
        self.stage2 = BasicBlock(width, 2 * width, 2)
        self.stage3 = BasicBlock(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(x.mean(dim=(2, 3)))


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return nn.Tanh() if name == "tanh" else nn.ReLU()


class DeepMLP(nn.Module):
    """``depth - 1`` hidden layers of ``width`` units and the classifier; no skips, no norms."""

    def __init__(
        self, in_features: int, n_classes: int, *, depth: int, width: int, activation: str
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"--depth {depth}: a deep model needs at least 2 layers")
        layers: list[nn.Module] = []
        n = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(n, width), _activation(activation)]
            n = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(n, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


class DeepCNN(nn.Module):
    """``depth - 1`` 3x3 convolutions (stride 2 at the first and the middle), pool, classifier."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        n_classes: int,
        *,
        depth: int,
        width: int,
        activation: str,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"--depth {depth}: a deep model needs at least 2 layers")
        self.one_d = len(in_shape) == 1
        conv = nn.Conv1d if self.one_d else nn.Conv2d
        c = 1 if self.one_d else in_shape[0]
        n_conv = depth - 1
        layers: list[nn.Module] = []
        for i in range(n_conv):
            stride = 2 if i in (0, n_conv // 2) else 1
            layers += [conv(c, width, 3, stride=stride, padding=1), _activation(activation)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.one_d:
            x = x.reshape(x.shape[0], 1, x.shape[-1])
        h = self.body(x)
        return self.head(h.flatten(2).mean(dim=2))


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
        return ResNet(input_shape, n_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    what = f"--dataset {dataset} has" if dataset is not None else "the data set has"
    needs = "images (channels, height, width)" if name == "resnet" else "vectors or images"
    raise ValueError(
        f"--model {name} does not fit: {what} examples of shape {input_shape}, "
        f"{name} needs {needs} (use mlp or cnn)"
    )
