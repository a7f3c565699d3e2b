"""The architecture the example plugin targets: a small gated MLP built on ``ScaledLinear``.

``ScaledLinear`` computes ``y = x (s * W)^T + b``: a linear layer whose output rows carry a
learned per-output ``scale`` (like weight normalisation's ``g``). Its forward uses
``torch.addmm``, for which surgery has no channel rule, so without the plugin the tracer walks
into it, meets an op it does not understand and freezes every channel that flows through
(``"input of unsupported call_function ..."``): nothing around a ScaledLinear can be pruned.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ScaledLinear(nn.Module):
    """``Linear`` plus a per-output ``scale``; input ``(batch, in_features)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, (self.weight * self.scale[:, None]).t())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class GatedBlockNet(nn.Module):
    """``x -> stem -> relu -> relu(up) * sigmoid(gate) -> down -> relu -> head -> classifier``.

    Channel groups with the plugin: ``stem``'s outputs (read by ``up`` and ``gate``); the gated
    hidden units (``up``/``gate`` outputs and ``down`` inputs, joined by the product);
    ``down``'s outputs; ``head``'s outputs, which the plugin freezes by name; the classifier's
    hidden layer; the logits (the model output, never cut). Without the plugin only the
    classifier's hidden layer is prunable: ``stem`` is plain ``nn.Linear``, but its channels
    flow into ScaledLinear's unsupported ``addmm`` and are frozen."""

    def __init__(self, d_in: int = 16, stem: int = 32, hidden: int = 48, width: int = 24,
                 n_out: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, stem)
        self.up = ScaledLinear(stem, hidden)
        self.gate = ScaledLinear(stem, hidden)
        self.down = ScaledLinear(hidden, width)
        self.head = ScaledLinear(width, width)
        self.classifier = nn.Sequential(nn.Linear(width, 40), nn.ReLU(), nn.Linear(40, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        h = torch.relu(self.up(x)) * torch.sigmoid(self.gate(x))
        h = torch.relu(self.down(h))
        return self.classifier(self.head(h))


def example() -> tuple[GatedBlockNet, torch.Tensor]:
    """A seeded model and example batch, for
    ``surgery inspect surgery_example_plugin.model:example``."""
    torch.manual_seed(0)
    return GatedBlockNet().eval(), torch.randn(8, 16)
