"""Depth schedules: per-layer removal rates that rise with depth, within the same budget."""

from __future__ import annotations

import pytest
import torch

import surgery
from helpers import decoder_zoo
from surgery.budget.allocate import depth_weights
from surgery.errors import BudgetError


def _deep_mlp(layers: int = 6, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = [torch.nn.Linear(8, width), torch.nn.ReLU()]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, 3)).eval()


def test_log_weights_rise_with_depth_and_average_one() -> None:
    coupling = surgery.couple(_deep_mlp(), torch.randn(2, 8))
    groups = sorted(coupling.prunable, key=lambda g: g.order)
    weights = [depth_weights(coupling, groups, "log")[g.id] for g in groups]
    assert weights[0] == 0 and weights == sorted(weights)
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert set(depth_weights(coupling, groups, "flat").values()) == {1.0}


def test_head_groups_are_ordered_by_where_they_are_read() -> None:
    """A decoder's head groups are written inside their attention modules: depth comes from
    the layer that reads them, so layer 0's heads come first whatever their ids."""
    _, _, coupling = decoder_zoo.coupled("llama")
    heads = [g for g in coupling.prunable if g.kind == "head"]
    weights = depth_weights(coupling, list(reversed(heads)), "log")
    first = next(g for g in heads if g.name.startswith("model.layers.0."))
    assert weights[first.id] == 0 and max(weights.values()) > 0


def test_log_schedule_keeps_the_budget_and_cuts_deeper_layers_more() -> None:
    model, x = _deep_mlp(), torch.randn(64, 8)
    plans = {}
    for schedule in ("flat", "log"):
        plans[schedule] = surgery.make_plan(model, x, sparsity=0.4, budget="params",
                                               criterion="magnitude", depth_schedule=schedule)
    flat, log = ([len(d.kept) for d in plans[s].groups] for s in ("flat", "log"))
    assert flat[0] < log[0] == 32 and log[-1] < flat[-1]  # groups listed bottom-up
    for plan in plans.values():
        assert plan.budget["estimated_params"] == pytest.approx(
            0.6 * plan.budget["dense_params"], rel=0.01)
    assert plans["log"].budget["depth_schedule"] == "log"


def test_a_decoder_keeps_its_first_layer_whole() -> None:
    model = decoder_zoo.make("llama")
    opts = surgery.PruneOptions(sparsity=0.2, budget="params", kinds={"neuron"},
                                criterion="magnitude", depth_schedule="log")
    plan = surgery.make_plan(model, decoder_zoo.inputs(), options=opts)
    kept = [len(d.kept) for d in plan.groups if d.kind == "neuron"]
    assert kept[0] == 128 and kept[1] < 128
    with pytest.raises(BudgetError, match="depth_schedule='log' keeps the first group"):
        surgery.make_plan(model, decoder_zoo.inputs(), options=surgery.PruneOptions.of(
            opts, sparsity=0.3))


@pytest.mark.parametrize("settings", [{"depth_schedule": "linear"},
                                      {"depth_schedule": "log", "allocation": "global"},
                                      {"depth_schedule": "log", "uniform_widths": True}])
def test_bad_schedules_are_refused(settings: dict) -> None:
    with pytest.raises(BudgetError, match="depth_schedule"):
        surgery.PruneOptions(**settings)
