"""One budget over several kinds of groups: per-kind rates, the plugins' defaults, the search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import surgery
from helpers.transformer_zoo import inputs, make
from surgery.api import couple
from surgery.budget.allocate import uniform_counts
from surgery.budget.cost import CostModel
from surgery.counting import node_macs
from surgery.errors import BudgetError, CalibrationError
from surgery_plugins.transformers_common import TRANSFORMER_KIND_WEIGHTS


@pytest.fixture(scope="module")
def bert():
    model = make("bert")
    x = inputs("bert", model)
    coupling = couple(model, x)
    cost = CostModel(coupling, node_macs(coupling.capture.graph_module,
                                         coupling.capture.example_args))
    return model, x, coupling, cost


def _cut_share(coupling, counts) -> dict[str, float]:
    """Fraction of atoms removed per kind."""
    out: dict[str, list[int]] = {}
    for g in coupling.prunable:
        a = out.setdefault(g.kind, [0, 0])
        a[0] += g.atoms
        a[1] += g.atoms - counts[g.id]
    return {k: cut / total for k, (total, cut) in out.items()}


def test_kind_weights_set_each_kinds_cut_rate(bert):
    _, _, coupling, cost = bert
    neurons_only = uniform_counts(cost, 0.3, "params",
                                  kind_weights={"neuron": 1, "head": 0, "hidden": 0})
    share = _cut_share(coupling, neurons_only)
    assert share["neuron"] > 0.3 and share["head"] == 0 and share["hidden"] == 0
    weighted = _cut_share(coupling, uniform_counts(
        cost, 0.3, "params", kind_weights={"neuron": 1, "head": 0.5, "hidden": 0.25}))
    assert weighted["neuron"] > weighted["head"] > weighted["hidden"] > 0
    # whole atoms: heads come 4 to a layer here, so the ratio is only roughly 2
    assert 1.2 < weighted["neuron"] / weighted["head"] < 3.0
    alike = _cut_share(coupling, uniform_counts(cost, 0.3, "params"))
    assert max(alike.values()) - min(alike.values()) < 0.15


@pytest.mark.parametrize("weights, message", [
    ({"neuron": -1}, "finite and >= 0"),
    ({"neuron": float("nan")}, "finite and >= 0"),
    ({"neuron": 0, "head": 0, "hidden": 0}, "weight 0"),
])
def test_bad_kind_weights_are_refused(bert, weights, message):
    _, _, _, cost = bert
    with pytest.raises(BudgetError, match=message):
        uniform_counts(cost, 0.3, "params", kind_weights=weights)


def test_kind_weights_sparing_kinds_cap_the_budget(bert):
    _, _, _, cost = bert
    with pytest.raises(BudgetError, match=r"kind_weights spare \['head', 'hidden'\]"):
        uniform_counts(cost, 0.95, "params", kind_weights={"neuron": 1, "head": 0, "hidden": 0})


@pytest.mark.parametrize("weights, error, message", [
    ("fast", BudgetError, "'search', 'uniform'"),
    ("search", CalibrationError, "kind_weights='search'.*calib_data"),  # no calib_data
])
def test_bad_kind_weights_strings_are_refused(bert, weights, error, message):
    model, x, _, _ = bert
    with pytest.raises(error, match=message):
        surgery.prune(model, x, sparsity=0.3, criterion="magnitude", kind_weights=weights)


def test_transformers_default_to_the_plugin_weights_and_uniform_overrides(bert):
    model, x, _, _ = bert
    _, plan = surgery.prune(model, x, sparsity=0.3, budget="params", criterion="magnitude")
    assert plan.budget["kind_weights"] == TRANSFORMER_KIND_WEIGHTS
    _, plan = surgery.prune(model, x, sparsity=0.3, budget="params", criterion="magnitude",
                            kind_weights="uniform")
    assert plan.budget["kind_weights"] == {}
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    _, plan = surgery.prune(cnn, torch.randn(1, 3, 8, 8), sparsity=0.3, criterion="magnitude")
    assert plan.budget["kind_weights"] == {}


def test_search_keeps_the_candidate_whose_output_moves_least(bert):
    model, x, _, _ = bert
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [inputs("bert", model, seed=s) for s in range(6)]
    pruned, plan = surgery.prune(model, x, calib, sparsity=0.4, budget="params",
                                 kind_weights="search")
    tried = plan.budget["kind_search"]
    assert len(tried) >= 4
    assert tried[0][0] == TRANSFORMER_KIND_WEIGHTS  # it starts from the plugin's weights
    best_weights, best_gap = min(tried, key=lambda wg: wg[1])
    assert plan.budget["kind_weights"] == best_weights
    assert np.isfinite(best_gap) and best_gap <= tried[0][1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned(**x).logits.shape == model(**x).logits.shape


def test_prune_with_own_kind_weights_records_them(bert):
    model, x, coupling, _ = bert
    mine = {"neuron": 1.0, "head": 0.0, "hidden": 0.0}
    _, plan = surgery.prune(model, x, sparsity=0.2, budget="params", criterion="magnitude",
                            kind_weights=mine)
    assert plan.budget["kind_weights"] == mine
    cut = {g.kind for g in plan.groups if len(g.kept) < g.atoms}
    assert cut == {"neuron"}


def test_uniform_widths_move_every_layer_together(bert):
    """The +/- one step refinement nudges single groups (here one layer's heads) unless
    uniform_widths asks for one width per kind: then it moves every layer's group at once."""
    _, _, coupling, cost = bert
    weights = dict(TRANSFORMER_KIND_WEIGHTS)

    def widths(counts):
        out: dict[tuple[str, int], set[int]] = {}
        for g in coupling.prunable:
            out.setdefault((g.kind, g.atoms), set()).add(counts[g.id])
        return out

    free = widths(uniform_counts(cost, 0.5, "params", kind_weights=weights))
    assert free[("head", 4)] == {2, 3}, "the example no longer refines a single group"
    counts = uniform_counts(cost, 0.5, "params", kind_weights=weights, uniform_widths=True)
    assert all(len(v) == 1 for v in widths(counts).values()), widths(counts)
    mask = cost.mask({g.id: np.arange(counts[g.id]) for g in coupling.prunable})
    assert abs(cost.removed(mask, "params") - 0.5) < 0.005
