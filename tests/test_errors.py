"""Bad input gets a clear error of a ``surgery.errors`` type, and changes nothing.

Each case asserts the error type, the words that say what is wrong and what to do, that the
input model's state_dict is unchanged, and (for files) that no half-written file is left.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from helpers import zoo
from surgery.budget.allocate import percents
from surgery.cut.apply import apply_plan
from surgery.cut.plan import PruningPlan, build_plan
from surgery.errors import (
    BudgetError,
    CalibrationError,
    CaptureError,
    OptionsError,
    PlanError,
    PluginError,
    SurgeryError,
    VerificationError,
)
from surgery.hookspecs import hookimpl
from surgery.plugins import plugin_manager


@pytest.fixture
def fresh_cnn():
    """A fresh SmallCNN (tests check it is left unchanged), its input and a state snapshot."""
    model, x = zoo.make_model("small_cnn"), zoo.make_input("small_cnn")
    return model, x, zoo.state_snapshot(model)


def _calib(x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, *x.shape[1:], generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2, float("nan"), "half", None])
def test_sparsity_outside_zero_one_is_refused(fresh_cnn, sparsity) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(BudgetError, match=r"sparsity must be a fraction in \[0, 1\)") as info:
        surgery.make_plan(model, x, sparsity=sparsity, criterion="magnitude")
    assert "removes half" in str(info.value)  # says what a valid value looks like
    zoo.assert_state_equal(model, before)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"budget": "flops"}, BudgetError, "budget must be one of"),
        ({"allocation": "greedy"}, BudgetError, "allocation must be one of"),
        ({"target": "logits"}, CalibrationError, "target must be one of"),
        ({"round_to": 0}, BudgetError, "round_to and min_keep must be whole numbers >= 1"),
        ({"min_keep": 2.5}, BudgetError, "round_to and min_keep must be whole numbers >= 1"),
    ],
)
def test_unknown_options_are_refused_with_the_choices(fresh_cnn, options, error, words) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(error, match=words):
        surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude", **options)
    zoo.assert_state_equal(model, before)


@pytest.mark.parametrize(("options", "words"), [
    ({"criterion": "entropy"}, r"unknown criterion 'entropy'; available: \[.*'mi'"),
    ({"criterion": "mi", "estimator": "kde"}, r"unknown MI estimator 'kde'; available: \[.*'ksg'"),
    ({"sparsity_": 0.3}, r"unknown pruning option\(s\) \['sparsity_'\]"),
])
def test_unknown_names_are_options_errors(fresh_cnn, options, words) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(OptionsError, match=words) as info:
        surgery.make_plan(model, x, _calib(x), **{"sparsity": 0.3, **options})
    assert isinstance(info.value, SurgeryError)
    zoo.assert_state_equal(model, before)


def test_labels_that_do_not_match_the_batch_are_refused(fresh_cnn) -> None:
    model, x, before = fresh_cnn
    batches = [(b, torch.zeros(len(b) - 1, dtype=torch.long)) for b in _calib(x)]
    with pytest.raises(CalibrationError, match="batch 0 has 3 labels for 4 inputs"):
        surgery.prune(model, x, batches, sparsity=0.3, target="labels")
    zoo.assert_state_equal(model, before)


@pytest.mark.parametrize(("most", "asked", "said"), [
    (0.99912, 0.999, ("99.91%", "99.90%")), (0.5, 0.9, ("50.0%", "90.0%")),
    (0.1234, 0.1235, ("12.34%", "12.35%")),
])
def test_percentages_in_a_refusal_can_be_told_apart(most, asked, said) -> None:
    assert percents(most, asked) == said


class WideOutput(nn.Module):
    """A 4-unit hidden layer in front of a 200-wide output layer: most parameters sit in the
    output layer's bias and weight rows, which can never be cut."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 4)
        self.out = nn.Linear(4, 200)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_sparsity_above_what_can_be_removed_is_refused() -> None:
    model = WideOutput().eval()
    before = zoo.state_snapshot(model)
    x = torch.randn(2, 16)
    with pytest.raises(BudgetError, match=r"at most \d+\.\d% of params can be removed") as info:
        surgery.prune(model, x, sparsity=0.9, budget="params", criterion="magnitude")
    assert "asked for 90.0%" in str(info.value) and "Lower the sparsity" in str(info.value)
    zoo.assert_state_equal(model, before)
    # the bound in the message is real: just below it works
    most = float(str(info.value).split("at most ")[1].split("%")[0]) / 100
    pruned, _ = surgery.prune(model, x, sparsity=most - 0.01, budget="params",
                              criterion="magnitude")
    assert surgery.count_params(pruned) < surgery.count_params(model)


def test_min_keep_larger_than_every_group_is_refused(fresh_cnn) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(BudgetError, match="at most 0.0% of macs") as info:
        surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude", min_keep=1000)
    message = str(info.value)
    assert "min_keep=1000 keeps" in message and "whole" in message and "largest group" in message
    zoo.assert_state_equal(model, before)


def test_min_keep_larger_than_some_groups_keeps_those_whole(fresh_cnn) -> None:
    """Not an error: a group smaller than min_keep stays whole, the others keep >= min_keep."""
    model, x, _ = fresh_cnn
    plan = surgery.make_plan(model, x, sparsity=0.2, criterion="magnitude", min_keep=10)
    sizes = sorted(g.atoms for g in plan.groups)
    assert sizes[0] < 10 < sizes[-1]  # the case is really mixed
    for g in plan.groups:
        assert len(g.kept) == g.atoms if g.atoms <= 10 else len(g.kept) >= 10


def test_a_plan_that_would_empty_a_group_is_refused() -> None:
    case = zoo.get_case("small_cnn")
    c = case.coupling
    g = c.prunable[0]
    other = next(grp for grp in c.groups if not grp.prunable)
    with pytest.raises(PlanError, match="would empty group .* keep at least one atom"):
        build_plan(c, {g.id: []}, criterion="t", target="output", budget={})
    with pytest.raises(PlanError, match=rf"distinct indices in \[0, {g.atoms}\)"):
        build_plan(c, {g.id: [0, g.atoms]}, criterion="t", target="output", budget={})
    with pytest.raises(PlanError, match="distinct indices"):
        build_plan(c, {g.id: [1, 1]}, criterion="t", target="output", budget={})
    with pytest.raises(PlanError, match="cannot be cut"):
        build_plan(c, {other.id: [0]}, criterion="t", target="output", budget={})
    with pytest.raises(PlanError, match="does not exist"):
        build_plan(c, {10_000: [0]}, criterion="t", target="output", budget={})


# ---------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------

EXPECTED_CNN = "x = a float32 tensor of shape (N, 3, 16, 16)"


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (torch.randn(4, 1, 16, 16), "to have 3 channels"),  # 1-channel images
        (torch.randint(0, 255, (4, 3, 16, 16)), "input 'x' is an integer/bool tensor (int64)"),
        (["a cat", "a dog"], "input 'x' is a str ('a cat'), not a tensor"),
        (torch.randn(4, 16, 16), "input 'x' has 3 dims"),
        ({"pixels": torch.randn(4, 3, 16, 16)}, "unknown keyword input 'pixels'"),
        ((torch.randn(4, 3, 16, 16), torch.randn(4, 10)), "2 positional inputs"),
    ],
    ids=["one-channel", "int", "strings", "no-batch-dim", "wrong-key", "float-labels"],
)
def test_calibration_data_of_the_wrong_kind_names_the_expected_input(fresh_cnn, bad, words) -> None:
    model, x, before = fresh_cnn
    batches = _calib(x) + [bad]
    with pytest.raises(CalibrationError) as info:
        surgery.prune(model, x, batches, sparsity=0.5)
    message = str(info.value)
    assert "calibration batch 2" in message  # which batch
    assert words in message  # what is wrong with it
    assert EXPECTED_CNN in message  # what it should be
    zoo.assert_state_equal(model, before)


def test_one_tensor_as_calib_data_is_refused(fresh_cnn) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(CalibrationError, match="calib_data must be an iterable of batches") as info:
        surgery.make_plan(model, x, torch.randn(8, 3, 16, 16), sparsity=0.5)
    assert EXPECTED_CNN in str(info.value)
    zoo.assert_state_equal(model, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_inputs_are_refused(fresh_cnn, value) -> None:
    model, x, before = fresh_cnn
    batches = _calib(x)
    batches[1][2, 1, 3, 4] = value
    with pytest.raises(CalibrationError, match="calibration batch 1 .*input 'x' contains NaN or inf"):
        surgery.prune(model, x, batches, sparsity=0.5)
    zoo.assert_state_equal(model, before)


class SqrtNet(nn.Module):
    """``sqrt`` of a linear layer: finite inputs, NaN activations where the layer is < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sqrt(self.fc1(x)))


def test_non_finite_activations_are_refused() -> None:
    model = SqrtNet().eval()
    with torch.no_grad():
        model.fc1.bias.fill_(10.0)  # positive for the example: the trace is clean
    before = zoo.state_snapshot(model)
    x = torch.zeros(2, 6)
    calib = [torch.randn(16, 6) * 100]  # finite, but drives fc1 negative
    with pytest.raises(CalibrationError, match=r"non-finite activations \(NaN/inf\)") as info:
        surgery.prune(model, x, calib, sparsity=0.3, budget="params")
    assert "batch 0" in str(info.value)
    zoo.assert_state_equal(model, before)


# ---------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return self.a(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pre(x))


def test_untraceable_model_names_the_module_and_the_line() -> None:
    model = Outer().eval()
    before = zoo.state_snapshot(model)
    with pytest.raises(CaptureError) as info:
        surgery.prune(model, torch.randn(2, 4), sparsity=0.5, criterion="magnitude")
    message = str(info.value)
    assert "in submodule 'block.1' (Gate)" in message
    assert "`if x.sum() > 0:" in message and "test_errors.py" in message
    assert "control flow" in message and "surgery_leaf_modules" in message
    zoo.assert_state_equal(model, before)


class SizedZeros(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.zeros(x.shape[0], 4)  # torch.zeros cannot take a traced size


def test_an_op_that_cannot_take_traced_values_is_named() -> None:
    model = SizedZeros().eval()
    with pytest.raises(CaptureError) as info:
        surgery.groups(model, torch.randn(2, 4))
    message = str(info.value)
    assert "in SizedZeros.forward at test_errors.py" in message
    assert "`return self.fc(x) + torch.zeros(x.shape[0], 4)" in message
    assert "cannot take traced values" in message and "control flow" not in message


def test_example_inputs_that_do_not_run_name_the_node(fresh_cnn, capfd) -> None:
    model, x, before = fresh_cnn
    with pytest.raises(CaptureError) as info:
        surgery.groups(model, torch.randn(2, 1, 16, 16))
    assert capfd.readouterr().err == "", "a traceback was printed above the CaptureError"
    message = str(info.value)
    assert "While executing" not in message and "tlparse" not in message
    assert "at node 'stem'" in message and "to have 3 channels" in message
    assert "given: float32 tensor (2, 1, 16, 16)" in message
    with pytest.raises(CaptureError, match="fails on example_inputs"):
        apply_plan(model, surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude"),
                   torch.randn(2, 1, 16, 16))
    zoo.assert_state_equal(model, before)


# ---------------------------------------------------------------------------------------
# plans: another model, corrupt JSON, corrupt content, saving
# ---------------------------------------------------------------------------------------


@pytest.fixture
def cnn_plan(fresh_cnn):
    model, x, _ = fresh_cnn
    return surgery.make_plan(model, x, sparsity=0.4, criterion="magnitude")


def test_a_plan_for_another_model_is_refused(fresh_cnn, cnn_plan) -> None:
    from helpers.models import SmallCNN

    narrower = SmallCNN(width=8).eval()
    before = zoo.state_snapshot(narrower)
    with pytest.raises(PlanError, match="made for a different model") as info:
        apply_plan(narrower, cnn_plan, torch.randn(2, 3, 16, 16))
    assert "stem.weight" in str(info.value)  # names a difference
    assert "SmallCNN" in str(info.value)  # names the model it was made for
    zoo.assert_state_equal(narrower, before)
    mlp = zoo.make_model("mlp")
    with pytest.raises(PlanError, match="made for a different model"):
        apply_plan(mlp, cnn_plan)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_plan_file_is_refused(fresh_cnn, cnn_plan, tmp_path, fraction) -> None:
    path = tmp_path / "plan.json"
    cnn_plan.save(path)
    text = path.read_text()
    path.write_text(text[: int(len(text) * fraction)])
    with pytest.raises(PlanError, match="not valid JSON.*truncated"):
        PruningPlan.load(path)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: [d], "expected a JSON object, got list"),
        (lambda d: {k: v for k, v in d.items() if k != "keep"}, "missing or wrong field"),
        (lambda d: {**d, "version": 99}, "version 99 is not supported"),
        (lambda d: {**d, "groups": "all"}, "missing or wrong field"),
        (lambda d: {**d, "keep": {"stem.weight": {"zero": [[0, 2]]}}}, "missing or wrong field"),
        (lambda d: {**d, "keep": {"stem.weight": {"0": [["a", "b"]]}}}, "missing or wrong field"),
    ],
    ids=["list", "no-keep", "version", "groups", "dim-name", "range-strings"],
)
def test_a_malformed_plan_is_refused(cnn_plan, edit, words) -> None:
    text = json.dumps(edit(cnn_plan.to_dict()))
    with pytest.raises(PlanError, match=words):
        PruningPlan.from_json(text)


def test_a_missing_or_binary_plan_file_is_refused(tmp_path) -> None:
    with pytest.raises(PlanError, match="no plan file at"):
        PruningPlan.load(tmp_path / "nope.json")
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)))
    with pytest.raises(PlanError, match="is not a plan file"):
        PruningPlan.load(tmp_path / "junk.bin")
    with pytest.raises(PlanError, match="is not a plan file"):
        PruningPlan.load(tmp_path)


def _corrupt(plan: PruningPlan, how: str) -> PruningPlan:
    d = plan.to_dict()
    name = "stem.weight"
    assert name in d["keep"]
    if how == "out-of-range":
        d["keep"][name]["0"] = [[0, 17]]
    elif how == "unsorted":
        kept = plan.keep[name][0]
        d["keep"][name]["0"] = [[k, k + 1] for k in reversed(kept)]
    elif how == "dim":
        d["keep"][name]["7"] = [[0, 1]]
    elif how == "empty":
        d["keep"][name]["0"] = []
    elif how == "unknown-param":
        d["keep"]["nothing.weight"] = {"0": [[0, 1]]}
    return PruningPlan.from_dict(json.loads(json.dumps(d)))


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("out-of-range", "keeps index 16 of 'stem.weight' dim 0 .size 16."),
        ("unsorted", "strictly increasing"),
        ("dim", "slices dim 7 of 'stem.weight', which has 4 dims"),
        ("empty", "keeps nothing of 'stem.weight'"),
        ("unknown-param", "'nothing.weight', which the model does not have"),
    ],
)
def test_a_plan_with_corrupt_positions_is_refused_before_anything_is_cut(fresh_cnn, cnn_plan, how,
                                                                           words) -> None:
    model, x, before = fresh_cnn
    bad = _corrupt(cnn_plan, how)
    with pytest.raises(PlanError, match=words):
        apply_plan(model, bad, x, inplace=True)  # refused before touching, even in place
    zoo.assert_state_equal(model, before)


def test_a_plan_with_inconsistent_widths_fails_verification(fresh_cnn, cnn_plan) -> None:
    """A conv cut one channel narrower than its BatchNorm: refused by the forward check."""
    model, x, before = fresh_cnn
    plan = PruningPlan.from_json(cnn_plan.to_json())
    plan.keep["stem.weight"][0] = plan.keep["stem.weight"][0][:-1]
    with pytest.raises(VerificationError, match="pruned model fails on the example inputs"):
        apply_plan(model, plan, x)
    zoo.assert_state_equal(model, before)


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_plan_never_crashes_and_never_touches_the_model(data) -> None:
    """Shift, duplicate or retype the kept ranges of a saved plan, or flip, drop or insert
    characters anywhere in its text: loading and applying it either works or raises a
    SurgeryError (never another exception); the model is never modified."""
    case = zoo.get_case("small_cnn")
    d = _mutation_base(case).to_dict()
    text = None
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if data.draw(st.booleans(), label="edit the text"):
            text = json.dumps(d, indent=1) if text is None else text
            i = data.draw(st.integers(0, len(text) - 1), label="position")
            op = data.draw(st.sampled_from(["replace", "delete", "insert"]), label="edit")
            char = data.draw(st.sampled_from(list('0123456789[]{},":-. ae')), label="char")
            text = text[:i] + (char if op != "delete" else "") + text[i + (op != "insert"):]
        elif text is None:
            param = data.draw(st.sampled_from(sorted(d["keep"])), label="param")
            dim = data.draw(st.sampled_from(sorted(d["keep"][param])), label="dim")
            ranges = d["keep"][param][dim]
            if not ranges:
                continue
            j = data.draw(st.integers(0, len(ranges) - 1), label="range")
            op = data.draw(st.sampled_from(["shift", "duplicate", "retype", "drop"]), label="op")
            if op == "shift" and isinstance(ranges[j], list) and len(ranges[j]) == 2:
                ranges[j][data.draw(st.integers(0, 1))] += data.draw(
                    st.integers(-3, 3).filter(bool), label="delta")
            elif op in ("shift", "duplicate"):
                ranges.insert(j, list(ranges[j]))
            elif op == "retype":
                ranges[j] = data.draw(st.sampled_from([1.5, "0", None, [0], [0, 1, 2], {}]))
            else:
                del ranges[j]
    text = json.dumps(d, indent=1) if text is None else text
    before = zoo.state_snapshot(case.model)
    try:
        apply_plan(case.model, PruningPlan.from_json(text), case.x)
    except SurgeryError:
        pass
    zoo.assert_state_equal(case.model, before)


_BASE: dict[str, PruningPlan] = {}


def _mutation_base(case) -> PruningPlan:
    if case.name not in _BASE:
        kept = {g.id: np.arange(0, g.atoms, 2) for g in case.coupling.prunable}
        _BASE[case.name] = build_plan(case.coupling, kept, criterion="t", target="output",
                                      budget={"kind": "macs"})
    return _BASE[case.name]


def test_saving_into_a_missing_folder_writes_nothing(cnn_plan, tmp_path) -> None:
    target = tmp_path / "missing" / "plan.json"
    with pytest.raises(PlanError, match="does not exist; create it first"):
        cnn_plan.save(target)
    assert not (tmp_path / "missing").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PlanError, match="it is a folder"):
        cnn_plan.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_plan_that_cannot_be_serialised_leaves_the_old_file_intact(cnn_plan, tmp_path) -> None:
    path = tmp_path / "plan.json"
    cnn_plan.save(path)
    good = path.read_bytes()
    cnn_plan.extra["weights"] = torch.zeros(3)  # not JSON
    try:
        with pytest.raises(PlanError, match="cannot be written as JSON"):
            cnn_plan.save(path)
    finally:
        del cnn_plan.extra["weights"]
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # no temporary file left


def test_a_failure_while_writing_leaves_no_temporary_file(cnn_plan, tmp_path, monkeypatch) -> None:
    path = tmp_path / "plan.json"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cnn_plan.save(path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# plugins
# ---------------------------------------------------------------------------------------


def _exploding_plugin(hook: str, cls_name: str = "ExplodingPlugin"):
    def boom(self, **kwargs):
        raise RuntimeError(f"boom inside {hook}")

    boom.__name__ = hook
    return type(cls_name, (), {hook: hookimpl(boom)})()


def _run_capture(model, x, plan):
    surgery.groups(model, x)


def _run_apply(model, x, plan):
    apply_plan(model, plan, x)


def _run_mi(model, x, plan):
    surgery.make_plan(model, x, _calib(x), sparsity=0.3)


def _run_magnitude(model, x, plan):
    surgery.make_plan(model, x, sparsity=0.3, criterion="magnitude")


@pytest.mark.parametrize(
    ("hook", "run"),
    [
        ("surgery_leaf_modules", _run_capture),
        ("surgery_autowrap_functions", _run_capture),
        ("surgery_module_rules", _run_capture),
        ("surgery_function_rules", _run_capture),
        ("surgery_frozen_modules", _run_capture),
        ("surgery_group_kind", _run_capture),
        ("surgery_fix_module", _run_apply),
        ("surgery_fix_model", _run_apply),
        ("surgery_criteria", _run_magnitude),
        ("surgery_estimators", _run_mi),
    ],
)
@pytest.mark.parametrize("registered_as", ["named", "anonymous"])
def test_a_plugin_raising_in_a_hook_is_named(fresh_cnn, cnn_plan, hook, run, registered_as) -> None:
    model, x, before = fresh_cnn
    plugin = _exploding_plugin(hook)
    pm = plugin_manager()
    name = "exploding-plugin" if registered_as == "named" else None
    pm.register(plugin, name=name)
    try:
        with pytest.raises(PluginError) as info:
            run(model, x, cnn_plan)
    finally:
        pm.unregister(plugin)
    message = str(info.value)
    what = f"{type(plugin).__module__}.{type(plugin).__qualname__} object"
    expected = f"'exploding-plugin' ({what})" if name else f"'{what}'"
    assert "ExplodingPlugin object" in message
    assert f"plugin {expected} raised RuntimeError in hook {hook}: boom inside {hook}" in message
    assert "unregister" in message  # what to do
    assert isinstance(info.value.__cause__, RuntimeError)
    zoo.assert_state_equal(model, before)
    run(model, x, cnn_plan)  # unregistered: works again


def test_a_surgery_error_raised_by_a_plugin_passes_through(fresh_cnn, cnn_plan) -> None:
    model, x, before = fresh_cnn

    class Strict:
        @hookimpl
        def surgery_fix_model(self, model):
            raise PlanError("this plugin refuses pruned models without a config")

    plugin = Strict()
    plugin_manager().register(plugin)
    try:
        with pytest.raises(PlanError, match="refuses pruned models"):
            apply_plan(model, cnn_plan, x)
    finally:
        plugin_manager().unregister(plugin)
    zoo.assert_state_equal(model, before)


def test_a_crashing_channel_rule_names_the_rule_and_the_node(fresh_cnn) -> None:
    model, x, before = fresh_cnn

    def broken_conv_rule(prop, node, module):
        raise IndexError("rule bug")

    class Rules:
        @hookimpl
        def surgery_module_rules(self):
            return {nn.Conv2d: broken_conv_rule}

    plugin = Rules()
    plugin_manager().register(plugin, name="broken-rules")
    try:
        with pytest.raises(PluginError) as info:
            surgery.groups(model, x)
    finally:
        plugin_manager().unregister(plugin)
    message = str(info.value)
    assert "broken_conv_rule" in message and "test_errors" in message
    assert "IndexError on node 'stem' (call_module stem): rule bug" in message
    zoo.assert_state_equal(model, before)


def test_every_error_type_is_a_surgery_error() -> None:
    for cls in (BudgetError, CalibrationError, CaptureError, PlanError, PluginError,
                VerificationError):
        assert issubclass(cls, SurgeryError)
        assert getattr(surgery, cls.__name__) is cls
