"""Staged calibration: holding a few groups' statistics at a time changes memory and the number
of passes over the data, never the plan or the compensated weights; a model output too wide
for moment sums (a language model's vocabulary) is sketched to a fixed width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import surgery
from helpers.transformer_zoo import inputs, logits, make
from surgery.errors import OptionsError
from surgery.graph.groups import OUTPUT
from surgery.stats.calibration import TOP_TOKENS, calibrate, calibration_bytes


def _batches(name: str, model: torch.nn.Module, n: int = 6) -> list:
    return [inputs(name, model, seed=s) for s in range(2, 2 + n)]


@pytest.mark.parametrize("criterion", ["mi", "act_weight"])
def test_staged_plan_and_weights_equal_one_pass(criterion: str) -> None:
    model = make("bert").eval()
    example, data = inputs("bert", model), _batches("bert", model)
    options = dict(sparsity=0.5, criterion=criterion, allocation="uniform")
    whole, plan = surgery.prune(model, example, data, options=surgery.PruneOptions(**options))
    staged, staged_plan = surgery.prune(
        model, example, data, options=surgery.PruneOptions(**options, calibration_memory=1))
    stages = staged_plan.extra["calibration_stages"]
    assert "calibration_stages" not in plan.extra
    assert stages["passes"] >= len(plan.groups) - 1  # one group per stage at 1 byte
    coupling = surgery.couple(model, example)
    assert stages["peak_bytes"] < sum(calibration_bytes(coupling).values())
    assert {g["name"]: g["kept"] for g in staged_plan.to_dict()["groups"]} == \
        {g["name"]: g["kept"] for g in plan.to_dict()["groups"]}
    assert sorted(staged_plan.extra["compensated"]) == sorted(plan.extra["compensated"])
    for (name, a), (_, b) in zip(whole.state_dict().items(), staged.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.allclose(logits(whole, example), logits(staged, example), atol=1e-5)


def test_staging_refuses_options_that_compare_every_group_at_once() -> None:
    model = make("bert").eval()
    example = inputs("bert", model)
    with pytest.raises(OptionsError, match="calibration_memory"):
        surgery.prune(model, example, _batches("bert", model, 2),
                      options=surgery.PruneOptions(allocation="global", calibration_memory=1))


class WideHead(torch.nn.Module):
    """Token ids -> 5000-way scores per position: a language model's output shape in small."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.hidden = torch.nn.Linear(16, 24)
        self.out = torch.nn.Linear(24, 5000)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(ids))))


def test_a_wide_output_is_sketched_to_its_most_probable_columns() -> None:
    torch.manual_seed(0)
    model = WideHead().eval()
    with torch.no_grad():  # a handful of outputs carry the probability mass
        model.out.bias[:20] += 6.0
    data = [torch.randint(0, 100, (4, 12)) for _ in range(3)]
    coupling = surgery.couple(model, data[0])
    cal = calibrate(coupling, data)
    (i,) = [i for i in cal.sums if coupling.relations[i].target == OUTPUT]
    assert cal.sums[i].dt == TOP_TOKENS + 1
    width = cal.sums[i].dx + cal.sums[i].dt
    assert calibration_bytes(coupling)[i] == 8 * width * (width + 1)
    mean = cal.sums[i].mean()[cal.sums[i].dx:].cpu().numpy()
    probs = np.exp(mean[:-1])
    assert probs.max() > 10 * np.median(probs)  # the boosted outputs are among those kept
    assert np.isfinite(mean).all()
