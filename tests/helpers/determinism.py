"""The plans the determinism tests compare: a seeded SmallCNN planned by every criterion and
allocation. A module of its own so a fresh interpreter can import it (``all_plans``)."""

from __future__ import annotations

import torch

import surgery
from helpers.models import SmallCNN, randomize_batchnorm

CRITERIA = ("mi", "magnitude", "random")
ALLOCATIONS = ("uniform", "global")
COMBOS = [(c, a) for c in CRITERIA for a in ALLOCATIONS]


def make_case() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """A SmallCNN with seeded weights and BatchNorm statistics, its example input and three
    calibration batches, all from fixed generators."""
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallCNN(), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    calib = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    return model, x, calib


def plan_json(case, criterion: str, allocation: str, seed: int = 0) -> str:
    model, x, calib = case
    plan = surgery.make_plan(model, x, calib if criterion == "mi" else None, 0.4,
                             criterion=criterion, allocation=allocation, seed=seed)
    return plan.to_json()


def all_plans() -> dict[str, str]:
    case = make_case()
    return {f"{c}/{a}": plan_json(case, c, a) for c, a in COMBOS}
