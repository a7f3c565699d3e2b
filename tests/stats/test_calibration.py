"""Calibration statistics: the shortcuts taken for speed give the sums plain sampling gives.

Two shortcuts: each batch's outer product is taken in float32 after centring (upper blocks
only on wide layers), and the sums of
a target that is exactly a linear layer's output are derived from its input's sums instead
of being sampled. Both must agree with float64 sums of the sampled activations.
"""

from __future__ import annotations

import pytest
import torch

from helpers.transformer_zoo import inputs, make
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups
from surgery.stats import calibration
from surgery.stats.calibration import calibrate
from surgery.stats.moments import MomentSums


def _exact(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.double()
    mean = z.mean(0)
    return mean, (z - mean).T @ (z - mean) / len(z)


def test_batched_float32_sums_match_float64_with_large_means():
    torch.manual_seed(0)
    # channels with means 1000x their spread: float32 sums of raw squares would lose it
    batches = [(torch.randn(300, 6) + torch.arange(6) * 1e3).double() for _ in range(4)]
    sums = MomentSums(4, 2)
    for b in batches:
        sums.add(b)
    mean, cov = _exact(torch.cat(batches))
    assert sums.n == 1200
    assert torch.allclose(sums.mean(), mean, rtol=0, atol=1e-9)
    assert torch.allclose(sums.covariance(), cov, rtol=1e-4, atol=1e-6)


def test_wide_sums_with_drifting_batch_means_match_float64():
    """Wide enough for the upper-block products, more batches than are folded at once, and
    batch means that drift."""
    torch.manual_seed(0)
    mix = torch.randn(450, 450) / 20
    batches = [(torch.randn(20, 450) @ mix + 50.0 + 0.02 * b).double() for b in range(70)]
    sums = MomentSums(440, 10)
    for b in batches:
        sums.add(b)
    mean, cov = _exact(torch.cat(batches))
    assert torch.allclose(sums.covariance(), cov, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sums.mean(), mean, rtol=0, atol=1e-9)


def test_linear_target_sums_equal_sampled_sums():
    torch.manual_seed(0)
    x = torch.randn(500, 5) @ torch.randn(5, 5) + 3.0
    layer = torch.nn.Linear(5, 3)
    t = layer(x).detach()
    sampled, x_only = MomentSums(5, 3), MomentSums(5, 0)
    sampled.add(torch.cat([x, t], 1))
    x_only.add(x)
    derived = x_only.with_linear_target(layer.weight, layer.bias)
    assert (derived.dx, derived.dt, derived.n) == (5, 3, 500)
    assert torch.allclose(derived.mean(), sampled.mean(), atol=1e-5)
    assert torch.allclose(derived.covariance(), sampled.covariance(), rtol=1e-4, atol=1e-4)


class Pointwise(torch.nn.Module):
    """1x1 convs at 16x16 (pooled to 4x4 by calibration) between a 3x3 conv and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = torch.nn.Conv2d(8, 12, 1)
        self.pw2 = torch.nn.Conv2d(12, 6, 1, bias=False)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.pw1(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.pw2(x)).mean((2, 3)))


def _case(name: str, seed: int):
    if name == "cnn":
        torch.manual_seed(0)
        model = Pointwise().eval()
        return model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    model = make(name).eval()
    return model, inputs(name, model, seed=seed)


@pytest.mark.parametrize("name", ["bert", "cnn"])
def test_linear_and_pointwise_targets_are_derived_and_match_sampling(monkeypatch, name):
    model, x = _case(name, 1)
    coupling = find_groups(trace(model, x))
    batches = [_case(name, s)[1] for s in range(3)]
    derived_calls = []
    real = MomentSums.with_linear_target
    monkeypatch.setattr(MomentSums, "with_linear_target",
                        lambda self, w, b: derived_calls.append(1) or real(self, w, b))
    fast = calibrate(coupling, batches)
    assert derived_calls, "no relation's target was derived from a linear reader"
    monkeypatch.setattr(calibration, "linear_target", lambda *a: None)
    slow = calibrate(coupling, batches)
    assert fast.sums.keys() == slow.sums.keys()
    for i in fast.sums:
        probe = coupling.relations[i].target_probe
        if probe is not None and probe.module is not None:  # a projection inside a leaf:
            assert fast.sums[i].weight is not None, i  # no node shows its output to sample
            continue
        a, b = fast.sums[i], slow.sums[i]
        assert (a.dx, a.dt, a.n) == (b.dx, b.dt, b.n)
        scale = b.covariance().abs().max()
        assert torch.allclose(a.covariance(), b.covariance(), atol=1e-4 * scale), i
