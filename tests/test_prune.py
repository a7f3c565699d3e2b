"""prune(): budgets are met as measured by torch's FlopCounterMode, MI finds what matters."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision

import surgery
from helpers import zoo
from surgery.errors import BudgetError, CalibrationError, OptionsError


@pytest.fixture
def mlp():
    return zoo.make_model("mlp"), zoo.make_input("mlp")


@pytest.fixture
def cnn_and_input():
    return zoo.make_model("small_cnn"), zoo.make_input("small_cnn")


BUDGET_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "resnet50d": lambda: timm.create_model("resnet50d"),
    "mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "densenet121": lambda: timm.create_model("densenet121"),
    "convnext_atto": lambda: timm.create_model("convnext_atto"),
    "regnety_008": lambda: timm.create_model("regnety_008"),
}


@pytest.mark.parametrize("name", sorted(BUDGET_MODELS))
def test_half_macs_removed_within_two_percent(name: str) -> None:
    torch.manual_seed(0)
    model = BUDGET_MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    dense_macs = surgery.count_macs(model, x)
    dense_out = model(x).shape
    pruned, plan = surgery.prune(model, x, sparsity=0.5, budget="macs", criterion="magnitude")
    removed = 1 - surgery.count_macs(pruned, x) / dense_macs
    assert abs(removed - 0.5) <= 0.02 * 0.5, removed
    assert pruned(x).shape == dense_out
    assert surgery.count_params(pruned) < surgery.count_params(model)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_large_100"])
def test_half_params_removed_within_two_percent(name: str) -> None:
    model = BUDGET_MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    pruned, _ = surgery.prune(model, x, sparsity=0.5, budget="params", criterion="random")
    removed = 1 - surgery.count_params(pruned) / surgery.count_params(model)
    assert abs(removed - 0.5) <= 0.02 * 0.5, removed


def test_hand_written_models_meet_the_budget(mlp, cnn_and_input) -> None:
    for model, x in (mlp, cnn_and_input):
        dense = surgery.count_macs(model, x)
        pruned, _ = surgery.prune(model, x, sparsity=0.5, criterion="magnitude")
        assert pruned(x).shape == model(x).shape
        assert abs(1 - surgery.count_macs(pruned, x) / dense - 0.5) <= 0.01


class Planted(torch.nn.Module):
    """8 hidden channels; channel 5 copies the input feature that decides the label, the
    others are random mixes of noise features. Every outgoing weight has the same norm, so
    only the activations can tell channel 5 apart."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.nn.Linear(9, 8)
        self.out = torch.nn.Linear(8, 2)
        with torch.no_grad():
            w = torch.randn(8, 9, generator=g)
            w[:, 0] = 0.0
            w[5] = 0.0
            w[5, 0] = 3.0
            w = w / w.norm(dim=1, keepdim=True)
            self.hidden.weight.copy_(w)
            self.hidden.bias.zero_()
            self.out.weight.fill_(0.5)
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


def _planted_batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(64, 9, generator=g)
        y = (x[:, 0] > 0).long()
        out.append((x, y))
    return out


def test_mi_ranks_the_planted_channel_first() -> None:
    model = Planted().eval()
    batches = _planted_batches()
    plan = surgery.make_plan(model, batches[0][0], batches, sparsity=0.3, budget="params",
                             criterion="mi", target="labels")
    (decision,) = [g for g in plan.groups if g.atoms == 8]
    scores = np.array(decision.scores)
    assert int(np.argmax(scores)) == 5
    assert scores[5] > 5 * np.delete(scores, 5).max()
    assert 5 in decision.kept


def test_magnitude_cannot_see_the_planted_channel() -> None:
    """The control: the planted model is built so that weights alone carry no signal."""
    model = Planted().eval()
    x = torch.randn(4, 9)
    plan = surgery.make_plan(model, x, sparsity=0.3, budget="params", criterion="magnitude")
    (decision,) = [g for g in plan.groups if g.atoms == 8]
    assert np.ptp(np.array(decision.scores)) < 1e-6


def test_mi_plan_is_deterministic() -> None:
    model = Planted().eval()
    batches = _planted_batches()
    a = surgery.make_plan(model, batches[0][0], batches, sparsity=0.3, budget="params")
    b = surgery.make_plan(model, batches[0][0], batches, sparsity=0.3, budget="params")
    assert a.to_json() == b.to_json()


def test_global_allocation_meets_budget_and_differs_from_uniform(cnn_and_input) -> None:
    model, x = cnn_and_input
    batches = [torch.randn(8, *x.shape[1:]) for _ in range(3)]
    uniform = surgery.make_plan(model, x, batches, 0.5)
    glob = surgery.make_plan(model, x, batches, 0.5, allocation="global")
    assert abs(1 - glob.budget["estimated_macs"] / glob.budget["dense_macs"] - 0.5) < 0.02
    assert [g.kept for g in uniform.groups] != [g.kept for g in glob.groups]
    # joint MI ranks every atom by its own gain under a global threshold, so the widths
    # follow the scores (a selection stopped at the uniform count put the same cut everywhere)
    ratios = lambda plan: sorted(round(len(g.kept) / g.atoms, 2) for g in plan.groups)  # noqa: E731
    assert ratios(glob) != ratios(uniform)
    assert max(ratios(glob)) - min(ratios(glob)) > 0.25


def test_round_to_multiple(cnn_and_input) -> None:
    model, x = cnn_and_input
    plan = surgery.make_plan(model, x, sparsity=0.4, criterion="magnitude", round_to=8)
    for g in plan.groups:
        assert len(g.kept) % 8 == 0 or len(g.kept) == g.atoms


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_out_of_range_is_refused(cnn_and_input, sparsity) -> None:
    model, x = cnn_and_input
    with pytest.raises(BudgetError, match="sparsity must be a fraction in"):
        surgery.prune(model, x, sparsity=sparsity, criterion="magnitude")


def test_mi_without_calibration_data_is_refused(cnn_and_input) -> None:
    model, x = cnn_and_input
    with pytest.raises(CalibrationError, match="needs calibration data"):
        surgery.prune(model, x, sparsity=0.5)


def test_labels_target_without_labels_is_refused(cnn_and_input) -> None:
    model, x = cnn_and_input
    with pytest.raises(CalibrationError, match="needs labels"):
        surgery.prune(model, x, [x], sparsity=0.5, target="labels")


def test_prune_leaves_the_input_model_alone(cnn_and_input) -> None:
    model, x = cnn_and_input
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.prune(model, x, [x], sparsity=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_round_to_counts_channels_not_atoms() -> None:
    """round_to on BERT: FFN neurons and hidden dims kept in multiples of 16; a head (16
    channels here) is a multiple of 16 channels already, and half a multiple of 32."""
    from helpers.transformer_zoo import inputs, make
    from surgery.budget.allocate import atom_step

    model = make("bert")
    x = inputs("bert", model)
    steps = {(g.kind, r): atom_step(g, r) for g in surgery.groups(model, x) if g.prunable
             for r in (16, 32)}
    assert steps[("head", 16)] == 1 and steps[("head", 32)] == 2
    assert steps[("neuron", 16)] == 16 and steps[("hidden", 32)] == 32
    plan = surgery.make_plan(model, x, sparsity=0.5, criterion="magnitude", budget="params",
                             round_to=16)
    assert {"head", "neuron", "hidden"} <= {g.kind for g in plan.groups}
    for g in plan.groups:
        if g.kind in ("neuron", "hidden"):
            assert len(g.kept) % 16 == 0 or len(g.kept) == g.atoms, (g.name, len(g.kept))


def test_plan_budget_macs_are_per_sample(cnn_and_input) -> None:
    """The plan's MAC figures are per sample, as ``count_macs`` on one sample and the CLI's
    reports give them, whatever the example batch size."""
    model, x = cnn_and_input
    one = surgery.count_macs(model, x[:1])
    for batch in (x[:1], torch.cat([x, x])):
        pruned, plan = surgery.prune(model, batch, sparsity=0.5, criterion="magnitude")
        assert plan.budget["dense_macs"] == one
        assert plan.budget["macs"] == surgery.count_macs(pruned, x[:1])
        assert abs(plan.budget["estimated_macs"] - plan.budget["macs"]) <= 0.02 * one


def test_excluded_modules_keep_their_weights() -> None:
    model, x = zoo.make_model("tv_resnet18"), zoo.make_input("tv_resnet18")
    calib = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(s))
             for s in range(2)]
    pruned, plan = surgery.prune(model, x, calib, sparsity=0.3, exclude=["layer4.*", "fc"])
    dense = dict(model.named_parameters())
    for name, p in pruned.named_parameters():
        if name.startswith(("layer4.", "fc.")):
            assert torch.equal(p, dense[name]), name  # neither cut nor refitted
    assert surgery.count_params(pruned) < surgery.count_params(model)
    groups = surgery.groups(model, x)
    excluded = [g for g in plan.groups if any(m.startswith("layer4.") for m in
                                              groups[g.id].modules)]
    assert not excluded, "a group touching layer4 was still offered to the criterion"


def test_exclude_and_kinds_that_match_nothing_are_refused(cnn_and_input) -> None:
    model, x = cnn_and_input
    with pytest.raises(OptionsError, match=r"exclude pattern 'stemm' matches no module"):
        surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude", exclude="stemm")
    with pytest.raises(OptionsError, match=r"kinds=\['head'\] names no kind .* \['channel'\]"):
        surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude", kinds={"head"})
