"""The benchmark's models, built from their architectures (nothing is downloaded).

Only the weight shapes matter for the ``apply`` benchmarks; the two models of
the training-step benchmark (ResNet-18 for 32 x 32 inputs and the MNIST-1D
MLP) also run forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "STEP_MODELS", "ModelSpec", "StepSpec", "resnet18_cifar"]


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """ReLU MLP with ``len(widths) - 1`` Linear layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3 x 3 convolutions), He et al. 2016."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1 x 1, 3 x 3, 1 x 1), stride on the 3 x 3 (torchvision's v1.5)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet; ``cifar=True`` is the 32 x 32 variant (3 x 3 stem, no max-pool)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, int, int, int],
        n_classes: int,
        *,
        cifar: bool,
    ) -> None:
        super().__init__()
        if cifar:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        stages: list[nn.Module] = []
        c_in = 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            for j in range(n):
                stages.append(block(c_in, width, 2 if (j == 0 and i > 0) else 1))
                c_in = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(n_classes: int = 10) -> ResNet:
    """ResNet-18 for 32 x 32 inputs (11.2 M parameters)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), n_classes, cifar=True)


def resnet50() -> ResNet:
    """ResNet-50 for ImageNet (25.6 M parameters)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), 1000, cifar=False)


class ViT(nn.Module):
    """Vision Transformer encoder: patch embedding, pre-norm blocks, linear head."""

    def __init__(self, *, patch: int, dim: int, depth: int, heads: int, n_classes: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                4 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).mT
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def vit_s16() -> ViT:
    """ViT-S/16 (Dosovitskiy et al. 2021; DeiT-S): 384 wide, 12 blocks, 6 heads (22 M parameters)."""
    return ViT(patch=16, dim=384, depth=12, heads=6, n_classes=1000)


class ModelSpec(NamedTuple):
    """A weight-shape set: its description and a builder of the module."""

    description: str
    build: Callable[[], nn.Module]


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("8-layer 512-wide MLP (784-512x7-10)", lambda: mlp((784, *([512] * 7), 10))),
    "blocks12": ModelSpec(
        "12 blocks of 512x512 plus odd shapes (MLP 784-512x13-10)",
        lambda: mlp((784, *([512] * 13), 10)),
    ),
    "resnet18": ModelSpec("ResNet-18 for 32x32 inputs, 10 classes", resnet18_cifar),
    "resnet50": ModelSpec("ResNet-50, ImageNet, 1000 classes", resnet50),
    "vit_s16": ModelSpec("ViT-S/16 encoder, 1000 classes", vit_s16),
    "tiny": ModelSpec("tiny MLP 16-32-32-32-4 (smoke tests)", lambda: mlp((16, 32, 32, 32, 4))),
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
        lambda: mlp((40, 100, 100, 10)),
        (40,),
        10,
        100,
        "adam",
    ),
    "tiny": StepSpec(
        "tiny MLP 16-32-32-32-4, batch 8, SGD (smoke tests)",
        lambda: mlp((16, 32, 32, 32, 4)),
        (16,),
        4,
        8,
        "sgd",
    ),
}
"""The training-step benchmarks of ``aon-func bench --steps``."""
