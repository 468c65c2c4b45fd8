"""The model zoo: every architecture the apps build, in one place.

``aon-func compare``/``train`` (``aon_func/_experiments``) trains
:class:`MLP`, :class:`CNN1d`, :class:`CNN2d`, :class:`SmallResNet`,
:class:`DeepMLP` and :class:`DeepCNN` (every classifier's last layer is
called ``head``); ``aon-func bench`` (``aon_func/_bench``) takes weight
shapes and training steps from :class:`DeepMLP`, :class:`MLP`,
:func:`resnet18_cifar`, :func:`resnet50`, :func:`vit_s16`,
:func:`gpt2_small` and :func:`llama_1b`. The ResNets share one
:class:`BasicBlock`. Nothing is downloaded: the models are built from their
architectures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "CNN1d",
    "CNN2d",
    "DeepCNN",
    "DeepMLP",
    "ResNet",
    "ShapeSet",
    "SmallResNet",
    "ViT",
    "gpt2_small",
    "group_norm",
    "llama_1b",
    "resnet18_cifar",
    "resnet50",
    "vit_s16",
]

ACTIVATIONS = ("tanh", "relu")


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): ``relu(x + n(conv(relu(n(conv(x))))))``.

    ``norm(channels)`` makes the normalisation layers (GroupNorm in the
    comparison's small ResNet, BatchNorm in the bench's ResNet-18); the
    shortcut is a 1x1 convolution when the shape changes, followed by a norm
    when ``shortcut_norm``.
    """

    expansion = 1

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        norm: Callable[[int], nn.Module],
        shortcut_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(conv, norm(c_out)) if shortcut_norm else conv

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


def group_norm(channels: int) -> nn.Module:
    """GroupNorm with 8 groups: no running statistics, so functional training stays pure."""
    return nn.GroupNorm(8, channels)


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


class SmallResNet(nn.Module):
    """A small ResNet: stem, three one-block stages (16, 32, 64), average pool, head."""

    def __init__(self, in_shape: tuple[int, ...], n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(8, width)
        self.stage1 = BasicBlock(width, width, 1, norm=group_norm)
        self.stage2 = BasicBlock(width, 2 * width, 2, norm=group_norm)
        self.stage3 = BasicBlock(2 * width, 4 * width, 2, norm=group_norm)
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
                stride = 2 if (j == 0 and i > 0) else 1
                if block is BasicBlock:
                    stages.append(
                        BasicBlock(c_in, width, stride, norm=nn.BatchNorm2d, shortcut_norm=True)
                    )
                else:
                    stages.append(Bottleneck(c_in, width, stride))
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
