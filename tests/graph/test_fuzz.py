"""Property tests on random architectures (tests/fuzz_models.py) and random keep plans.

For every architecture hypothesis draws (residual blocks, concatenations, depthwise and
grouped convs, BatchNorm / GroupNorm / LayerNorm, linear stacks, self-attention, ...):

* channel propagation keeps its invariant: every track's ids have the shape of the axes
  they sit on;
* keeping everything reproduces the dense outputs;
* any plan keeping a random non-empty subset of every prunable group gives a model that
  runs, has the dense output shape and exactly the planned widths (every sliced dimension as
  long as the plan's keep list, every layer's width attributes consistent with its weights),
  and computes what the dense model computes with the removed channels zeroed (in float64,
  so a channel sliced at a wrong position shows; skipped where a LayerNorm normalises a cut
  axis, since its statistics then legitimately change);
* the plan's JSON round trip is the identity, and the re-loaded plan gives the same model.

Examples are derandomized and bounded so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers.fuzz_models import Arch, architectures, build, describe
from surgery.cut.apply import apply_plan
from surgery.cut.plan import PruningPlan, build_plan
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups
from surgery.graph.propagate import flatten_tracks

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Architectures that once broke the engine (see the regression tests at the bottom).
CLASS_TOKEN_ON_RAW_TOKENS = Arch("tokens", 4, (), (("cls",), ("mlp", 6, False)), ((4, "none"),),
                                 2, 0)
CLASS_TOKEN_THEN_ATTENTION = Arch("conv", 1, (("conv", 4, 1, "bn"),),
                                  (("cls",), ("attn", 1, 2, False, "shape")), (), 2, 0)
EVERYTHING = Arch(
    "conv", 3,
    (("conv", 8, 3, "bn"), ("concat", 4, 6, True), ("res", 6, 18, "gn", True), ("se", 3),
     ("grouped", 12, 6, "bn"), ("dw", "gn"), ("cnx", 8)),
    (("pos",), ("cls",), ("attn", 3, 2, True, "shape"), ("glu", 6), ("attn", 2, 3, False, "-1"),
     ("linear", 8), ("mlp", 12, True)),
    ((6, "bn"), (4, "ln")), 3, 7,
)




@functools.lru_cache(maxsize=128)
def coupled(arch: Arch):
    """(model, example input, coupling) of ``arch``, traced once; tests never modify them."""
    model = build(arch)
    x = arch.example_input()
    return model, x, find_groups(trace(model, x))


def draw_kept(data, coupling) -> dict[int, np.ndarray]:
    """A random non-empty subset of the atoms of every prunable group."""
    return {
        g.id: np.array(sorted(data.draw(st.sets(st.integers(0, g.atoms - 1), min_size=1),
                                        label=f"kept of {g.name} ({g.atoms})")))
        for g in coupling.prunable
    }


def plan_of(coupling, kept) -> PruningPlan:
    return build_plan(coupling, kept, criterion="fuzz", target="output", budget={})


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def zeroed(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A copy of ``model`` with every position the plan removes set to zero, in every tensor
    the plan slices: removed channels then contribute nothing, as if they were cut."""
    ref = copy.deepcopy(model)
    state = ref.state_dict()
    with torch.no_grad():
        for name, dims in plan.keep.items():
            tensor = state[name]
            for dim, kept in dims.items():
                drop = np.setdiff1d(np.arange(tensor.shape[dim]), kept)
                tensor.index_fill_(dim, torch.as_tensor(drop, dtype=torch.long), 0.0)
    return ref


def assert_tracks_fit(coupling) -> None:
    """The propagation invariant: a track's ids have the shape of the axes it sits on."""
    prop = coupling.propagation
    for node in coupling.capture.graph_module.graph.nodes:
        shape = prop.shape(node)
        for t in flatten_tracks(prop.tracks.get(node.name, [])):
            if shape is not None:
                assert t.ids.shape == tuple(shape[a] for a in t.axes), (node.name, t.axes, shape)


def assert_widths_consistent(model: nn.Module) -> None:
    """Every layer's width attributes describe its (sliced) weights."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.out_channels % m.groups == 0, name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features == m.running_mean.shape[0] == m.weight.shape[0], name
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels == m.weight.shape[0], name
            assert m.num_channels % m.num_groups == 0, name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=120)
@example(arch=CLASS_TOKEN_ON_RAW_TOKENS)
@example(arch=CLASS_TOKEN_THEN_ATTENTION)
@example(arch=EVERYTHING)
@given(arch=architectures())
def test_tracks_fit_their_axes_and_keeping_everything_reproduces_outputs(arch: Arch) -> None:
    model, x, coupling = coupled(arch)
    assert_tracks_fit(coupling)
    kept = {g.id: np.arange(g.atoms) for g in coupling.prunable}
    plan = plan_of(coupling, kept)
    for name, dims in plan.keep.items():
        for dim, kept_positions in dims.items():
            assert kept_positions == list(range(plan.shapes[name][dim])), (name, dim)
    pruned = apply_plan(model, plan, x)
    assert pruned is not model
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(),
                                                  model.state_dict().values()))
    assert (run(pruned, x) - run(model, x)).abs().max().item() < 1e-5, describe(arch)


@settings(FUZZ, max_examples=150)
@given(arch=architectures(), data=st.data())
def test_a_random_plan_runs_with_exactly_the_planned_widths(arch: Arch, data) -> None:
    model, x, coupling = coupled(arch)
    check_plan_result(arch, model, x, plan_of(coupling, draw_kept(data, coupling)))


@pytest.mark.parametrize("arch", [CLASS_TOKEN_ON_RAW_TOKENS, CLASS_TOKEN_THEN_ATTENTION, EVERYTHING],
                         ids=["cls-raw", "cls-attention", "everything"])
@pytest.mark.parametrize("seed", range(3))
def test_known_architectures_with_random_plans(arch: Arch, seed: int) -> None:
    model, x, coupling = coupled(arch)
    rng = np.random.default_rng(seed)
    kept = {g.id: np.sort(rng.choice(g.atoms, rng.integers(1, g.atoms + 1), replace=False))
            for g in coupling.prunable}
    check_plan_result(arch, model, x, plan_of(coupling, kept))


def check_plan_result(arch: Arch, model: nn.Module, x: torch.Tensor, plan: PruningPlan) -> None:
    """The pruned model runs, has the dense output shape, exactly the planned widths, and
    equals the dense model with the removed channels zeroed (see the module docstring)."""
    pruned = apply_plan(model, plan, x)
    dense_out = run(model, x)
    assert run(pruned, x).shape == dense_out.shape

    state = pruned.state_dict()
    assert sorted(state) == sorted(plan.shapes)
    for name, shape in plan.shapes.items():
        want = list(shape)
        for dim, kept in plan.keep.get(name, {}).items():
            want[dim] = len(kept)
        assert list(state[name].shape) == want, (name, describe(arch))
    assert_widths_consistent(pruned)

    layer_norm_cut = any(isinstance(m, nn.LayerNorm) and f"{n}.weight" in plan.keep
                         for n, m in model.named_modules())
    if not layer_norm_cut:  # equal to the dense model with the removed channels zeroed
        dense64, x64 = copy.deepcopy(model).double(), x.double()
        expected = run(zeroed(dense64, plan), x64)
        got = run(apply_plan(dense64, plan, x64), x64)
        err = (got - expected).abs().max().item()
        assert err <= 1e-9 * (1.0 + expected.abs().max().item()), (err, describe(arch))


@settings(FUZZ, max_examples=60)
@given(arch=architectures(), data=st.data())
def test_the_plan_json_round_trip_is_the_identity(arch: Arch, data) -> None:
    model, x, coupling = coupled(arch)
    kept = draw_kept(data, coupling)
    scores = {g.id: np.random.default_rng(g.id).random(g.atoms) for g in coupling.prunable}
    plan = build_plan(coupling, kept, criterion="fuzz", target="output", scores=scores,
                      budget={"kind": "macs", "sparsity": 0.25})
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.json"
        plan.save(path)
        loaded = PruningPlan.load(path)
    assert loaded == plan
    assert torch.equal(run(apply_plan(model, loaded, x), x), run(apply_plan(model, plan, x), x))


# ---------------------------------------------------------------------------------------
# regressions found by the fuzzer, as minimal models
# ---------------------------------------------------------------------------------------


class ClassTokenFlatten(nn.Module):
    """Embedded tokens with a learned token expanded over the batch and concatenated in
    front, then flattened into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.out(torch.relu(self.fc(x)).flatten(1))


def test_an_axis_expanded_from_size_one_carries_no_channel_ids() -> None:
    """``expand`` used to keep the id of a size-1 axis on the broadcast batch axis; a later
    reshape over that axis then crashed the propagation (ValueError in reshape_tracks)."""
    model = ClassTokenFlatten().eval()
    x = torch.randn(2, 2, 5)
    coupling = find_groups(trace(model, x))
    assert_tracks_fit(coupling)
    stream = next(g for g in coupling.groups if ("cls", 2) in g.slices)
    assert stream.prunable and stream.atoms == 4
    assert ("embed.weight", 0) in stream.slices and ("fc.weight", 1) in stream.slices
    plan = plan_of(coupling, {stream.id: np.array([0, 2, 3])})
    check_plan_result(Arch("tokens", 5, (), (), (), 2, 0), model, x, plan)


class TokenOnRawInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.fc(x).mean(1)


@pytest.mark.parametrize("untracked", ["raw input", "constant"])
def test_concatenating_with_an_untracked_tensor_pins_the_other_axes(untracked: str) -> None:
    """cat along tokens of a learned token (channels tracked) with the raw input or a constant
    (channels fixed): the channel axis must be frozen, else cutting it breaks the cat."""
    if untracked == "raw input":
        model = TokenOnRawInput().eval()
    else:
        class WithConstant(TokenOnRawInput):
            def forward(self, x):
                pad = x.new_zeros(x.shape[0], 1, 4)
                h = torch.cat([self.cls.expand(x.shape[0], -1, -1), pad], dim=1)
                return self.fc(h).mean(1) + x.mean()

        model = WithConstant().eval()
    x = torch.randn(2, 3, 4)
    coupling = find_groups(trace(model, x))
    stream = next(g for g in coupling.groups if ("cls", 2) in g.slices)
    assert not stream.prunable, "the token width follows the input; it cannot be cut"
    assert "untracked" in stream.reason or "input" in stream.reason
