"""Least-squares compensation: a removed channel that is a linear mix of kept ones is
reconstructed exactly; on real activations it lowers the output error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import surgery
from helpers import decoder_zoo, transformer_zoo
from surgery.cut.apply import apply_plan
from surgery.cut.compensation import compensate
from surgery.cut.plan import build_plan
from surgery.stats.calibration import calibrate


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 3)
        with torch.no_grad():  # hidden channel 4 = 2 * channel 1 - channel 2 + 0.5
            self.a.weight[4] = 2 * self.a.weight[1] - self.a.weight[2]
            self.a.bias[4] = 2 * self.a.bias[1] - self.a.bias[2] + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _cut_channel_4(model: torch.nn.Module
                   ) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """``model`` (one 5-channel hidden group) with hidden channel 4 cut: plainly, and with
    compensation from four batches of standard-normal inputs; and the layers refitted."""
    batches = [torch.randn(64, 6) for _ in range(4)]
    coupling = surgery.couple(model, batches[0])
    (group,) = coupling.prunable
    kept = {group.id: np.array([0, 1, 2, 3])}
    plan = build_plan(coupling, kept, criterion="test", target="output", budget={})
    fixed = copy.deepcopy(model)
    refitted = compensate(fixed, coupling, calibrate(coupling, batches), kept, ridge=1e-9)
    return apply_plan(model, plan), apply_plan(fixed, plan, inplace=True), refitted


def test_a_linear_mix_is_reconstructed_exactly() -> None:
    torch.manual_seed(0)
    model = TwoLinear().eval()
    plain, fixed, refitted = _cut_channel_4(model)
    assert refitted == ["b"]
    x = torch.randn(32, 6)
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max() > 1e-2  # the cut alone changes the output
        assert (fixed(x) - model(x)).abs().max() < 1e-4


def test_compensation_lowers_the_error_of_a_real_cut() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    batches = [torch.randn(128, 16) for _ in range(4)]
    x = torch.randn(256, 16)
    errors = {}
    for comp in (False, True):
        pruned, plan = surgery.prune(model, batches[0], batches, sparsity=0.5, budget="params",
                                     criterion="random", compensate=comp)
        with torch.no_grad():
            errors[comp] = (pruned(x) - model(x)).pow(2).mean().item()
        assert ("compensated" in plan.extra) == comp
    assert errors[True] < 0.7 * errors[False], errors


class BiasFreeReader(torch.nn.Module):
    """A reader without a bias (a decoder's down_proj): hidden channel 4 is the constant 1,
    channel 3 the constant 2, so channel 4 = channel 3 / 2 through the origin while its
    covariance with every channel is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.a.weight[3:] = 0
            self.a.bias[3], self.a.bias[4] = 2.0, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_bias_free_reader_keeps_the_removed_mean() -> None:
    torch.manual_seed(0)
    model = BiasFreeReader().eval()
    _, fixed, _ = _cut_channel_4(model)
    x = torch.randn(32, 6)
    with torch.no_grad():  # a centred fit finds nothing to regress on and drops W_4 * 1
        assert (fixed(x) - model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["timm_vit", "llama", "gpt2"])
def test_cut_hidden_dims_are_refitted_in_the_attention_projections(family: str) -> None:
    """The q/k/v projections inside an attention leaf read the residual stream: cutting hidden
    dims refits them like any reader (before, no node showed them and they lost the cut
    dims' contribution; a timm ViT with 30% of its hidden dims cut: 0.717 -> 0.7925)."""
    if family == "timm_vit":
        model = transformer_zoo.make(family)
        x = transformer_zoo.inputs(family, model)
        calib = [transformer_zoo.inputs(family, model, seed=s) for s in range(2, 12)]
        projections = [f"blocks.{i}.attn.qkv" for i in range(2)]
    else:
        model, x, calib = decoder_zoo.make(family), decoder_zoo.inputs(), decoder_zoo.calibration()
        projections = ([f"transformer.h.{i}.attn.c_attn" for i in range(2)] if family == "gpt2"
                       else [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2)
                             for p in "qkv"])
    options = surgery.PruneOptions(sparsity=0.25, budget="params", kinds={"hidden"})
    _, plan = surgery.prune(model, x, calib, options=options)
    assert set(projections) <= set(plan.extra["compensated"]), plan.extra["compensated"]
