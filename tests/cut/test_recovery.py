"""BatchNorm re-estimation touches only the norms whose inputs a cut changed, and a plan that
cuts nothing gives back the model's own outputs (issue 13: ``sparsity=0.0`` used to re-estimate
every BatchNorm of a trained ResNet-18 and move its logits by 1.57)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

import surgery
import surgery.api
from helpers.models import randomize_batchnorm
from surgery.cut.plan import build_plan
from surgery.cut.recovery import recalibrate_batchnorm, stale_batchnorms


def _resnet() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    return model, calib[0][:2], calib


def test_a_plan_that_cuts_nothing_returns_the_same_outputs_without_calibrating(monkeypatch):
    model, x, calib = _resnet()
    calls = []
    real = surgery.api.calibrate
    monkeypatch.setattr(surgery.api, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    pruned, plan = surgery.prune(model, x, calib, sparsity=0.0)
    assert not calls, "nothing to cut, yet the calibration data was streamed"
    assert plan.extra.get("recalibrated_batchnorms", 0) == 0
    assert all(len(g.kept) == g.atoms for g in plan.groups)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_only_batchnorms_downstream_of_a_cut_reader_are_reestimated():
    """Cutting layer4.1.conv1's channels changes what layer4.1.conv2 computes, so only the norm
    after it has stale statistics: bn1 is sliced with the channels but sees the same values."""
    model, x, calib = _resnet()
    coupling = surgery.couple(model, x)
    group = next(g for g in coupling.prunable if g.name == "layer4.1.conv1")
    plan = build_plan(coupling, {group.id: np.arange(group.atoms // 2)}, criterion="test",
                      target="output", budget={})
    assert stale_batchnorms(coupling, plan) == {"layer4.1.bn2"}
    pruned = surgery.apply_plan(model, plan, x)
    before = {n: m.running_mean.clone() for n, m in pruned.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)}
    assert recalibrate_batchnorm(pruned, calib, only={"layer4.1.bn2"}) == 1
    moved = {n for n, m in pruned.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
             and not torch.equal(m.running_mean, before[n])}
    assert moved == {"layer4.1.bn2"}
