"""Small hand-written models shared by the engine tests.

Plain ``torch.nn``; each one exercises a specific channel-coupling pattern with widths chosen
so that every group has a distinct, recognisable size (a test can tell them apart by width).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """A 32 -> 256 -> 256 -> 10 perceptron: ReLU, a LayerNorm on the first hidden layer and
    dropout. Two prunable hidden groups (fc1's outputs with the LayerNorm and fc2's inputs;
    fc2's outputs with fc3's inputs); fc3's outputs are the model output."""

    def __init__(self, d_in: int = 32, hidden: int = 256, n_out: int = 10, p: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU()
        self.norm = nn.LayerNorm(hidden)
        self.drop1 = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(p)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.norm(self.act1(self.fc1(x))))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """A CNN with one of each coupling pattern a CNN pruner must get right.

    * ``stem`` (3 -> 16) + ``stem_bn`` feed a residual block ``res_conv1 -> res_bn1 -> relu ->
      res_conv2 -> res_bn2`` whose output is *added* to its input (identity shortcut): stem,
      res_conv2 and both BatchNorms share one 16-wide group.
    * two branches read the block's output: ``branch_a`` (1x1, 12 channels) and ``branch_b``
      (3x3, 20 channels), concatenated on channels (``torch.cat``, 32 channels) and read by the
      1x1 ``mix`` conv: branch B's channels sit at ``mix`` input positions 12..31.
    * ``dw`` is a depthwise 3x3 conv (groups == channels == 32): its channel ``i`` in is its
      channel ``i`` out, so it shares ``mix``'s output group.
    * a squeeze-excitation gate ``x * sigmoid(se_fc2(relu(se_fc1(mean(x)))))`` (32 -> 8 -> 32).
    * global average pooling and a linear classifier ``fc`` (32 -> ``num_classes``).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, a: int = 12, b: int = 20,
                 se: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.res_conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(width)
        self.res_conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(width)
        self.branch_a = nn.Conv2d(width, a, 1)
        self.branch_b = nn.Conv2d(width, b, 3, padding=1)
        self.mix = nn.Conv2d(a + b, a + b, 1, bias=False)
        self.mix_bn = nn.BatchNorm2d(a + b)
        self.dw = nn.Conv2d(a + b, a + b, 3, padding=1, groups=a + b, bias=False)
        self.dw_bn = nn.BatchNorm2d(a + b)
        self.se_fc1 = nn.Linear(a + b, se)
        self.se_fc2 = nn.Linear(se, a + b)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(a + b, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.res_bn1(self.res_conv1(x)))
        y = self.res_bn2(self.res_conv2(y))
        x = F.relu(x + y)
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        x = F.relu(self.mix_bn(self.mix(x)))
        x = F.relu(self.dw_bn(self.dw(x)))
        s = x.mean((2, 3))
        g = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(s))))
        x = x * g[:, :, None, None]
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (in place).

    Freshly initialised BatchNorms are the identity in eval mode (mean 0, var 1, weight 1,
    bias 0), which would hide a BatchNorm sliced at the wrong positions; random statistics make
    every channel of every BatchNorm distinguishable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


class ScaledConv(nn.Module):
    """A per-channel scale kept as a buffer, persistent or not (timm keeps such constants
    out of the state dict with ``persistent=False``)."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(8, 1, 1),
                             persistent=persistent)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x) * self.scale)).mean((2, 3))
