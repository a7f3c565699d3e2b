"""Tiny models and data for the command-line tests, named as ``helpers.cli_models:NAME`` specs.

The tests put tests/ on PYTHONPATH, so ``surgery prune helpers.cli_models:tiny_resnet --data
helpers.cli_models:batches`` resolves here exactly as a user's ``my_pkg.models:factory`` would.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPE = (3, 16, 16)
CLASSES = 4


class TinyResNet(nn.Module):
    """stem -> one residual block (the add couples stem, conv2 and both BatchNorms) ->
    a strided conv -> pooling -> linear classifier. Input 3x16x16, 4 classes."""

    def __init__(self, width: int = 16, wide: int = 24, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, wide, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(wide)
        self.fc = nn.Linear(wide, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn3(self.down(x)))
        return self.fc(x.mean((2, 3)))


def tiny_resnet(num_classes: int = CLASSES) -> nn.Module:
    return TinyResNet(num_classes=num_classes)


def tiny_resnet_with_example() -> tuple[nn.Module, torch.Tensor]:
    """A factory that brings its own example inputs (no --input-size needed)."""
    return TinyResNet(), torch.randn(1, *SHAPE)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class decides which colour channel is bright: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, *SHAPE, generator=g) * 0.5
    x[torch.arange(n), y % 3] += 1.0 + (y // 3).float()[:, None, None]
    return x, y


def batches(n: int = 64, batch: int = 16, seed: int = 0):
    """Labelled batches ``(x, y)``: the ``module:function`` data spec."""
    x, y = _data(n, seed)
    for i in range(0, n, batch):
        yield x[i:i + batch], y[i:i + batch]


def unlabelled():
    for x, _ in batches():
        yield x


def broken():
    """Yields one good batch, then one the model cannot take: calibration fails."""
    x, y = _data(8, 0)
    yield x, y
    yield torch.randn(8, 5, 16, 16), y


def not_a_model() -> str:
    return "not a model"
