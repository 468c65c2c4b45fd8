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

__all__ = ["MODELS", "STEP_MODELS", "ModelSpec", "ShapeSet", "StepSpec", "resnet18_cifar"]


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


class ShapeSet(nn.Module):
    """Only weights: ``Linear`` layers of the given ``(in, out)`` shapes, for the ``apply`` benchmarks."""

    def __init__(self, shapes: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, i, o in shapes})


def gpt2_small() -> ShapeSet:
    """GPT-2 small's 48 attention and MLP matrices (12 blocks; 768 wide).

    HF stores them as ``Conv1D`` weights ``(in, out)``: 768x2304 (fused
    q/k/v), 768x768 (attention output), 768x3072 and 3072x768 (MLP). Here
    they are ``Linear(in, out)``, whose weight ``(out, in)`` has the same
    oriented ``k x N`` matrix. Embeddings and the tied head are left out.
    """
    shapes = []
    for i in range(12):
        shapes += [
            (f"h{i}_attn", 768, 2304),
            (f"h{i}_proj", 768, 768),
            (f"h{i}_fc", 768, 3072),
            (f"h{i}_mlp_proj", 3072, 768),
        ]
    return ShapeSet(shapes)


def llama_1b() -> ShapeSet:
    """A LLaMA-1B-like decoder's 112 matrices: 16 layers of q/o 2048x2048, k/v 512x2048
    (grouped-query attention), gate/up 8192x2048 and down 2048x8192 (weights ``(out, in)``).
    About 1 B parameters (4 GiB in float32): build it on a GPU or on ``meta``."""
    shapes = []
    for i in range(16):
        shapes += [
            (f"l{i}_q", 2048, 2048),
            (f"l{i}_k", 2048, 512),
            (f"l{i}_v", 2048, 512),
            (f"l{i}_o", 2048, 2048),
            (f"l{i}_gate", 2048, 8192),
            (f"l{i}_up", 2048, 8192),
            (f"l{i}_down", 8192, 2048),
        ]
    return ShapeSet(shapes)


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
    "gpt2": ModelSpec("GPT-2 small, 48 attention/MLP matrices (no embeddings)", gpt2_small),
    "llama1b": ModelSpec("LLaMA-1B-like, 112 matrices up to 8192x2048 (4 GiB)", llama_1b),
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
