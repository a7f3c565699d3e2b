"""Sequential compensation: each reader is refitted on what the cut model below it feeds it.

The walk's defining property: the readers of the lowest cut group get the dense refit (nothing
below them changed), and every reader above is refitted exactly as dense compensation would
refit it on a model in which the groups below are already cut."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import surgery
from helpers import decoder_zoo
from surgery.cut.apply import apply_plan
from surgery.cut.compensation import compensate
from surgery.cut.plan import build_plan
from surgery.cut.sequential import cut_by_columns, sequential_refits
from surgery.errors import OptionsError
from surgery.stats.calibration import calibrate


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 5)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(12, 12, generator=g)  # correlated inputs: removed units are predictable
    return [torch.randn(64, 12, generator=g) @ mix for _ in range(4)]


def _kept(coupling: surgery.Coupling) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {g.id: np.sort(rng.choice(g.atoms, g.atoms // 2, replace=False))
            for g in coupling.prunable}


def test_each_reader_is_refitted_on_the_cut_model_below_it() -> None:
    model, batches = _mlp(), _batches()
    coupling = surgery.couple(model, batches[0])
    kept = _kept(coupling)
    low, high = sorted(coupling.prunable, key=lambda g: g.order)
    walked = copy.deepcopy(model)
    names = sequential_refits(walked, coupling, batches, kept, [low, high])
    assert names == ["2", "4"]
    plan = build_plan(coupling, kept, criterion="test", target="output", budget={})
    walked = apply_plan(walked, plan, inplace=True)

    # by hand: refit the low group's reader on dense statistics and cut it (zeroed columns),
    # then refit the high group's reader on the statistics of that half-cut model
    by_hand = copy.deepcopy(model)
    compensate(by_hand, coupling, calibrate(coupling, batches), {low.id: kept[low.id]})
    with torch.no_grad():
        by_hand[2].weight[:, np.setdiff1d(np.arange(low.atoms), kept[low.id])] = 0
    half = surgery.couple(by_hand, batches[0])
    compensate(by_hand, half, calibrate(half, batches), {high.id: kept[high.id]})
    by_hand = apply_plan(by_hand, plan, inplace=True)
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(walked(x), by_hand(x))


def test_the_walk_leaves_the_traced_model_alone() -> None:
    model, batches = _mlp(), _batches()
    before = copy.deepcopy(model.state_dict())
    opts = surgery.PruneOptions(sparsity=0.5, sequential=True)
    seen: list[tuple[str, int]] = []
    pruned, plan = surgery.prune(model, batches[0], batches, options=opts,
                                 progress=lambda stage, i: seen.append((stage, i)))
    assert plan.extra["sequential_compensation"] == {"groups": 2}
    assert [i for stage, i in seen if stage == "compensate"] == [0, 1]
    assert set(plan.extra["compensated"]) == {"2", "4"}
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_decoder_walks_its_heads_and_ffn_channels() -> None:
    model = decoder_zoo.make("llama")
    opts = surgery.PruneOptions(sparsity=0.5, budget="params", kinds={"head", "neuron"},
                                sequential=True)
    pruned, plan = surgery.prune(model, decoder_zoo.inputs(), decoder_zoo.calibration(),
                                 options=opts)
    cut = [d for d in plan.groups if len(d.kept) < d.atoms]
    assert plan.extra["sequential_compensation"]["groups"] == len(cut) >= 4
    assert {n.rsplit(".", 1)[-1] for n in plan.extra["compensated"]} == {"o_proj", "down_proj"}
    ids = decoder_zoo.tokens(1, 6)
    assert pruned.generate(**ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_only_groups_a_column_cut_removes_are_walked() -> None:
    model = decoder_zoo.make("llama")
    coupling = surgery.couple(model, decoder_zoo.inputs())
    walkable = {g.kind: cut_by_columns(coupling, g) for g in coupling.prunable}
    assert walkable == {"head": True, "neuron": True, "hidden": False}


def test_sequential_needs_compensation() -> None:
    with pytest.raises(OptionsError, match="compensate=True"):
        surgery.PruneOptions(sequential=True, compensate=False)


def test_a_batchnorm_below_a_cut_is_reestimated_on_the_way() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    coupling = surgery.couple(model, batches[0])
    kept = _kept(coupling)
    walked = copy.deepcopy(model)
    sequential_refits(walked, coupling, batches, kept, coupling.prunable)
    seen = []
    handle = walked[4].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.no_grad():
        for b in batches:
            walked(b)
    handle.remove()
    reaching = torch.cat(seen).transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(walked[4].running_mean, reaching.mean(1))
    torch.testing.assert_close(walked[4].running_var, reaching.var(1))
    assert torch.equal(walked[1].running_mean, model[1].running_mean)  # nothing cut below it
