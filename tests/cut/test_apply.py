"""Applying plans: keep-everything is the identity, a pruned model has exactly the planned
widths and the right values, and the user's model is never modified (unless ``inplace``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import zoo
from surgery.cut.apply import apply_plan

# Models whose only normalisation is BatchNorm: there, cutting a channel is exactly the same
# as zeroing the weights that read it (LayerNorm statistics, by contrast, change with width).
BATCHNORM_ONLY = ["small_cnn", "tv_resnet18", "resnet50d", "mobilenetv3_large_100",
                  "efficientnet_b0", "densenet121", "regnety_008"]


def run(model, x):
    with torch.no_grad():
        return model(x)


def tol(reference: torch.Tensor) -> float:
    return 1e-5 * max(1.0, reference.abs().max().item())


# ---------------------------------------------------------------------------------------
# keep everything
# ---------------------------------------------------------------------------------------


def test_keep_all_plan_is_identity(case):
    """Keeping every atom slices nothing away; with every position of every grouped parameter
    dimension listed, the whole slicing path runs (index_select, layer fixers) and must not
    change the function."""
    plan = zoo.plan_for(case.coupling, zoo.keep_all(case.coupling))
    state = case.model.state_dict()
    assert plan.kept_fraction() == 1.0
    assert [g.kept for g in plan.groups] == [list(range(g.atoms)) for g in plan.groups]
    for param, dims in plan.keep.items():
        for d, pos in dims.items():
            assert pos == list(range(state[param].shape[d])), (param, d)
    for g in case.coupling.prunable:  # list every grouped dimension explicitly
        for param, d in g.slices:
            plan.keep.setdefault(param, {})[d] = list(range(state[param].shape[d]))
    assert len(plan.keep) >= 4
    pruned = apply_plan(case.model, plan, case.x)
    assert pruned is not case.model
    ref = run(case.model, case.x)
    out = run(pruned, case.x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < tol(ref)
    new = pruned.state_dict()
    assert list(new) == list(state)
    for k, v in new.items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------
# keep a random half
# ---------------------------------------------------------------------------------------


def expected_keep(coupling, kept: dict[int, np.ndarray], state) -> dict[tuple[str, int], list[int]]:
    """Independently of build_plan: per (param, dim), the positions not in a dropped atom."""
    removed: dict[tuple[str, int], set[int]] = {}
    for g in coupling.prunable:
        drop = set(range(g.atoms)) - set(np.asarray(kept[g.id]).tolist())
        for key, atoms in g.slices.items():
            bucket = removed.setdefault(key, set())
            for a in drop:
                bucket.update(atoms[a].tolist())
    return {
        (p, d): [i for i in range(state[p].shape[d]) if i not in pos]
        for (p, d), pos in removed.items()
    }


def test_random_half_plan_has_planned_widths_and_values(case):
    kept = zoo.keep_random_half(case.coupling, seed=zoo.HALF_SEED)
    plan, pruned = zoo.get_pruned(case.name)  # apply_plan(model, plan for `kept`, x)
    state = case.model.state_dict()

    # the plan: every group's decision recorded, keep lists exactly the kept atoms' positions
    assert {g.id: g.kept for g in plan.groups} == {k: v.tolist() for k, v in kept.items()}
    want = expected_keep(case.coupling, kept, state)
    got = {(p, d): pos for p, dims in plan.keep.items() for d, pos in dims.items()}
    assert got == want
    assert 0.4 < plan.kept_fraction() < 0.6

    ref, out = run(case.model, case.x), run(pruned, case.x)
    assert out.shape == ref.shape and torch.isfinite(out).all()

    new = pruned.state_dict()
    assert list(new) == list(state)
    for name, old in state.items():
        dims = plan.keep.get(name, {})
        expect = old
        for d, pos in sorted(dims.items()):
            expect = expect.index_select(d, torch.tensor(pos, dtype=torch.long))
        assert new[name].shape == expect.shape, (name, tuple(new[name].shape), tuple(expect.shape))
        assert torch.equal(new[name], expect), f"{name}: wrong positions kept"
        for d, pos in dims.items():
            assert new[name].shape[d] == len(pos) < old.shape[d]
    n_old = sum(p.numel() for p in case.model.parameters())
    n_new = sum(p.numel() for p in pruned.parameters())
    assert n_new < 0.7 * n_old
    # parameters stay parameters (trainable), buffers stay buffers
    names = {n for n, _ in case.model.named_parameters()}
    assert {n for n, _ in pruned.named_parameters()} == names
    assert all(p.requires_grad for p in pruned.parameters())


def test_pruned_layers_have_consistent_attributes(case):
    _, pruned = zoo.get_pruned(case.name)
    originals = dict(case.model.named_modules())
    for name, m in pruned.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.out_channels == m.weight.shape[0], name
            assert m.in_channels == m.weight.shape[1] * m.groups, name
            assert m.out_channels % m.groups == 0, name
            old = originals[name]
            if old.groups > 1:
                # a grouped conv loses whole groups: the width of a group never changes
                assert m.out_channels // m.groups == old.out_channels // old.groups, name
                assert m.in_channels // m.groups == old.in_channels // old.groups, name
            else:
                assert m.groups == 1, name
            if m.bias is not None:
                assert m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features == m.running_mean.shape[0] == m.weight.shape[0], name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name


@pytest.mark.parametrize("name", BATCHNORM_ONLY)
def test_pruning_equals_zeroing_the_readers(name):
    """With BatchNorm only, a pruned model computes exactly what the dense model computes
    once the weights *reading* the removed channels (conv/linear input columns) are zeroed.
    This checks the whole coupling: a channel cut in one place but read elsewhere, or a
    misaligned slice, changes the output."""
    case = zoo.get_case(name)
    plan, pruned = zoo.get_pruned(name)
    masked = copy.deepcopy(case.model)
    modules = dict(masked.named_modules())
    zeroed = 0
    with torch.no_grad():
        for param, dims in plan.keep.items():
            owner, _, attr = param.rpartition(".")
            m = modules[owner]
            if attr != "weight" or 1 not in dims or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            assert getattr(m, "groups", 1) == 1, f"{owner}: grouped conv input sliced on dim 1"
            drop = torch.ones(m.weight.shape[1], dtype=torch.bool)
            drop[dims[1]] = False
            m.weight[:, drop] = 0
            zeroed += 1
    assert zeroed >= 3
    ref, out, want = run(case.model, case.x), run(pruned, case.x), run(masked, case.x)
    scale = max(1.0, want.abs().max().item())
    assert (out - want).abs().max().item() < 1e-4 * scale
    # and the pruning did change the function (the check above is not vacuous)
    assert (ref - want).abs().max().item() > 1e-3 * scale


def test_pruned_mlp_matches_a_smaller_mlp():
    """End to end against an independently built model: the pruned MLP is an MLP of the kept
    widths holding the kept rows/columns."""
    from helpers.models import MLP

    case = zoo.get_case("mlp")
    c = case.coupling
    h1 = next(g for g in c.prunable if ("fc1.weight", 0) in g.slices)
    h2 = next(g for g in c.prunable if ("fc2.weight", 0) in g.slices)
    k1, k2 = np.array([0, 5, 17, 200, 255]), np.arange(0, 256, 3)
    pruned = apply_plan(case.model, zoo.plan_for(c, {h1.id: k1, h2.id: k2}), case.x)
    assert pruned.fc1.out_features == 5 and pruned.fc2.out_features == len(k2)
    assert pruned.norm.normalized_shape == (5,)
    small = MLP(hidden=256)
    sd = case.model.state_dict()
    t1, t2 = torch.tensor(k1), torch.tensor(k2)
    small.fc1 = nn.Linear(32, 5)
    small.norm = nn.LayerNorm(5)
    small.fc2 = nn.Linear(5, len(k2))
    small.fc3 = nn.Linear(len(k2), 10)
    small.load_state_dict({
        "fc1.weight": sd["fc1.weight"][t1], "fc1.bias": sd["fc1.bias"][t1],
        "norm.weight": sd["norm.weight"][t1], "norm.bias": sd["norm.bias"][t1],
        "fc2.weight": sd["fc2.weight"][t2][:, t1], "fc2.bias": sd["fc2.bias"][t2],
        "fc3.weight": sd["fc3.weight"][:, t2], "fc3.bias": sd["fc3.bias"],
    })
    small.eval()
    assert torch.allclose(run(pruned, case.x), run(small, case.x), atol=1e-6)


# ---------------------------------------------------------------------------------------
# the user's model
# ---------------------------------------------------------------------------------------


def test_apply_does_not_modify_the_input_model(case):
    """``case.snapshot`` was taken when the model was built; every test since (keep-all and
    random-half plans at least) applied plans to it without ``inplace``."""
    ids = {n: id(p) for n, p in case.model.named_parameters()}
    plan, pruned = zoo.get_pruned(case.name)
    assert plan.keep, "the plan must slice something for this test to mean anything"
    zoo.assert_state_equal(case.model, case.snapshot)
    assert {n: id(p) for n, p in case.model.named_parameters()} == ids
    assert not case.model.training  # built in eval mode, still in eval mode
    # no storage shared with the pruned copy, even for untouched tensors
    ptrs = {p.data_ptr() for p in case.model.state_dict().values()}
    assert not ptrs & {p.data_ptr() for p in pruned.state_dict().values()}
    # module attributes untouched too
    for name, m in case.model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.out_channels == m.weight.shape[0], name


@pytest.mark.parametrize("name", ["small_cnn", "mlp", "tv_resnet18"])
def test_inplace_modifies_and_returns_the_model(name):
    case = zoo.get_case(name)
    plan, copy_result = zoo.get_pruned(name)
    model = zoo.make_model(name)
    zoo.assert_state_equal(model, zoo.state_snapshot(case.model))  # same fresh weights
    result = apply_plan(model, plan, case.x, inplace=True)
    assert result is model
    for param, dims in plan.keep.items():
        for d, pos in dims.items():
            assert model.state_dict()[param].shape[d] == len(pos)
    assert torch.equal(run(model, case.x), run(copy_result, case.x))


def test_training_mode_is_preserved():
    case = zoo.get_case("small_cnn")
    plan = zoo.plan_for(case.coupling, zoo.keep_random_half(case.coupling, seed=8))
    model = zoo.make_model("small_cnn").train()
    before = zoo.state_snapshot(model)
    pruned = apply_plan(model, plan, case.x)
    assert model.training and pruned.training
    assert all(m.training for m in model.modules()) and all(m.training for m in pruned.modules())
    # the verification forward ran in eval mode: BatchNorm running statistics did not move
    zoo.assert_state_equal(model, before)
