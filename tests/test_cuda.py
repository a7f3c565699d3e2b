"""Device-agnostic code: the whole pipeline on CUDA when a GPU is present (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import surgery

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_prune_on_cuda_matches_cpu_budget() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    cpu_pruned, cpu_plan = surgery.prune(model, x, calib, sparsity=0.5)
    gpu = model.cuda()
    gpu_pruned, gpu_plan = surgery.prune(gpu, x.cuda(), [b.cuda() for b in calib], sparsity=0.5)
    assert next(gpu_pruned.parameters()).is_cuda
    assert gpu_pruned(x.cuda()).shape == (2, 10)
    assert [len(g.kept) for g in gpu_plan.groups] == [len(g.kept) for g in cpu_plan.groups]
    assert gpu_plan.budget["macs"] == cpu_plan.budget["macs"]
    # cuDNN convolutions (TF32) differ from CPU ones by ~1e-3, which flips near-ties in the
    # greedy selection; the kept sets still mostly agree.
    overlap = [len(set(a.kept) & set(b.kept)) / len(a.kept)
               for a, b in zip(gpu_plan.groups, cpu_plan.groups)]
    assert sum(overlap) / len(overlap) >= 0.85, overlap
