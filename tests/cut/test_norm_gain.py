"""Norm gains: a norm across a cut group gets the scale that brings its outputs back to the
dense norm's, for LayerNorm and for transformers' RMSNorm classes, Gemma's (1 + w) form too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import surgery
from surgery.cut.norm_gain import _weight_form, apply_gains
from surgery.scoring.criteria import ScoreContext
from surgery.scoring.mi import _keep_loud


class NormedStream(torch.nn.Module):
    """A stream of 16 channels through a LayerNorm, read by a linear layer. Channels 0-3 are
    ten times louder than the rest, so cutting quiet channels moves the norm's divisor."""

    def __init__(self) -> None:
        super().__init__()
        self.write = torch.nn.Linear(6, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.read = torch.nn.Linear(16, 3)
        with torch.no_grad():
            self.write.weight[:4] *= 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(self.norm(self.write(x)))


def _norm_error(dense: NormedStream, pruned: NormedStream, kept: list[int],
                batches: list[torch.Tensor]) -> float:
    """Mean squared gap between the dense norm's kept outputs and the cut norm's, on the
    dense stream (what the gain is fitted to)."""
    with torch.no_grad():
        gaps = [(dense.norm(dense.write(x))[:, kept] - pruned.norm(dense.write(x)[:, kept]))
                .pow(2).mean() for x in batches]
    return float(torch.stack(gaps).mean())


def test_a_cut_layernorm_gets_the_gain_that_restores_its_scale() -> None:
    torch.manual_seed(0)
    dense = NormedStream().eval()
    batches = [torch.randn(64, 6) for _ in range(4)]
    pruned, plan = surgery.prune(dense, batches[0], batches, sparsity=0.25, budget="params",
                                 criterion="magnitude")
    kept = plan.keep["norm.weight"][0]
    assert len(kept) < 16
    gain = plan.extra["norm_gains"]["norm"]
    assert gain != pytest.approx(1.0, abs=1e-3)  # the cut moved the divisor
    with_gain = _norm_error(dense, pruned, kept, batches)
    with torch.no_grad():
        pruned.norm.weight.div_(gain)
    assert with_gain < 0.9 * _norm_error(dense, pruned, kept, batches)
    assert not dense.norm._forward_pre_hooks  # the measuring hooks are gone


def test_no_gain_without_compensation_or_data() -> None:
    torch.manual_seed(0)
    dense = NormedStream().eval()
    batches = [torch.randn(64, 6) for _ in range(2)]
    _, plan = surgery.prune(dense, batches[0], batches, sparsity=0.25, budget="params",
                            criterion="magnitude", compensate=False)
    assert "norm_gains" not in plan.extra
    _, plan = surgery.prune(dense, batches[0], None, sparsity=0.25, budget="params",
                            criterion="magnitude")
    assert "norm_gains" not in plan.extra


@pytest.mark.parametrize("norm, form", [
    (torch.nn.LayerNorm(8), "scale"),
    (LlamaRMSNorm(8), "scale"),
    (Gemma3RMSNorm(8), "offset"),
])
def test_a_gain_scales_the_output_whatever_the_weight_form(norm: torch.nn.Module,
                                                           form: str) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-1, 1)
    assert _weight_form(norm) == form
    x = torch.randn(5, 8)
    bias = norm.bias.detach() if getattr(norm, "bias", None) is not None else 0.0
    with torch.no_grad():
        before = norm(x) - bias
        apply_gains(torch.nn.Sequential(norm), {"0": 1.7})
        after = norm(x) - bias
    torch.testing.assert_close(after, 1.7 * before, rtol=1e-5, atol=1e-5)


def test_mi_keeps_the_channels_that_hold_the_norms_divisor() -> None:
    """Channels 0-3 are ten times louder than the rest. Cutting one rescales every token of
    the norm by its own amount, which a Gaussian model of the readers' inputs cannot see: so
    whatever their scores, mi keeps the louder half and fills the rest by score."""
    torch.manual_seed(0)
    dense = NormedStream().eval()
    batches = [torch.randn(64, 6) for _ in range(4)]
    coupling = surgery.couple(dense, batches[0])
    (group,) = [g for g in coupling.prunable if ("norm.weight", 0) in g.slices]
    scores = np.arange(group.atoms, dtype=float)  # channel 0 scores lowest, 15 highest
    kept = np.sort(np.argsort(-scores)[:10])
    ctx = ScoreContext(coupling, data=batches)
    chosen, same = _keep_loud(group, ctx, 10, kept, scores)
    assert {0, 1, 2, 3} <= set(chosen.tolist()) and len(chosen) == 10
    assert set(chosen.tolist()) >= {15, 14}  # the rest still by score
    assert same is scores
    assert not dense.norm._forward_pre_hooks
