"""Baseline criteria in the same interface as MI: what each one ranks first."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import surgery


class Planted(nn.Module):
    """fc1 writes 4 hidden channels: channel 0 has a huge weight row (huge activation) that
    fc2 reads with tiny weights, channel 1 a modest row that fc2 reads strongly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[9.0, 9, 9], [1, 1, 1], [0.2, 0.2, 0.2],
                                                [0.1, 0.1, 0.1]]))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor([[0.01, 2.0, 0.5, 0.1], [0.01, -2.0, 0.5, 0.1]]))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _first(criterion: str, calib) -> int:
    model = Planted().eval()
    _, plan = surgery.prune(model, calib[0], calib, sparsity=0.5, budget="params",
                            criterion=criterion, compensate=False)
    (group,) = plan.groups
    return max(range(group.atoms), key=lambda a: group.scores[a])


def test_activation_x_weight_sees_what_the_reader_uses():
    torch.manual_seed(0)
    calib = [torch.rand(64, 3) for _ in range(3)]  # positive inputs: every channel active
    assert _first("magnitude", calib) == 0  # the big row dominates the weight norms
    assert _first("act_weight", calib) == 1  # RMS 9x larger, read 200x more weakly


def test_activation_x_weight_needs_calibration_data():
    with pytest.raises(surgery.errors.CalibrationError, match="needs calibration data"):
        surgery.prune(Planted(), torch.rand(2, 3), sparsity=0.5, criterion="act_weight")


def test_taylor_scores_an_unread_channel_zero_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = Planted().eval()
    with torch.no_grad():
        model.fc1.weight[3] = 20.0  # the largest row of all ...
        model.fc2.weight[:, 3] = 0.0  # ... read by nothing: removing it changes no loss
    calib = [(torch.rand(64, 3), torch.randint(0, 2, (64,))) for _ in range(3)]
    _, plan = surgery.prune(model, calib[0][0], calib, sparsity=0.5, budget="params",
                            criterion="taylor", compensate=False)
    scores = plan.groups[0].scores
    assert scores[3] == 0.0 and min(scores[:3]) > 0
    assert all(p.grad is None for p in model.parameters())
    _, plan = surgery.prune(model, calib[0][0], calib, sparsity=0.5, budget="params",
                            criterion="magnitude", compensate=False)
    assert max(range(4), key=lambda a: plan.groups[0].scores[a]) == 3


def test_taylor_without_labels_uses_the_model_predictions():
    model = Planted().eval()
    calib = [torch.rand(32, 3) for _ in range(2)]
    _, plan = surgery.prune(model, calib[0], calib, sparsity=0.5, criterion="taylor")
    assert sum(plan.groups[0].scores) > 0
