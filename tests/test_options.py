"""PruneOptions: one validated object for every setting of prune / make_plan."""

from __future__ import annotations

import pytest

import surgery
from helpers import zoo
from surgery.errors import BudgetError, OptionsError


def test_keywords_override_an_options_object() -> None:
    model, x = zoo.make_model("mlp"), zoo.make_input("mlp")
    base = surgery.PruneOptions(sparsity=0.3, criterion="magnitude", budget="params")
    plan = surgery.make_plan(model, x, options=base, sparsity=0.5)
    assert plan.budget["sparsity"] == 0.5 and plan.budget["kind"] == "params"
    assert plan.criterion == "magnitude"
    again = surgery.make_plan(model, x, options=base)
    assert again.budget["sparsity"] == 0.3


def test_an_unknown_option_names_the_valid_ones() -> None:
    model, x = zoo.make_model("mlp"), zoo.make_input("mlp")
    with pytest.raises(OptionsError, match=r"unknown pruning option\(s\) \['sparsity_'\].*round_to"):
        surgery.make_plan(model, x, sparsity_=0.5, criterion="magnitude")


def test_options_are_normalised_and_checked_when_made() -> None:
    opts = surgery.PruneOptions(budget_scope="bert.encoder", kinds=["head", "neuron"])
    assert opts.budget_scope == ("bert.encoder",) and opts.kinds == frozenset({"head", "neuron"})
    with pytest.raises(BudgetError, match="round_to and min_keep must be whole numbers"):
        surgery.PruneOptions(round_to=0)
    with pytest.raises(BudgetError, match="kind_weights must be"):
        surgery.PruneOptions(kind_weights="fastest")
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(OptionsError, match="target_noise must be a positive number"):
            surgery.PruneOptions(target_noise=bad)
    assert surgery.PruneOptions(target_noise=0.1).budget_record()["target_noise"] == 0.1


def test_uniform_widths_refuse_a_global_allocation() -> None:
    assert surgery.PruneOptions(uniform_widths=True).budget_record()["uniform_widths"] is True
    with pytest.raises(BudgetError, match="uniform_widths=True.*allocation='global'"):
        surgery.PruneOptions(uniform_widths=True, allocation="global")
