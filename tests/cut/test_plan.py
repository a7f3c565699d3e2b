"""Pruning plans as files: JSON round trips rebuild the same model; plans that do not fit the
model, or that are damaged, are refused with PlanError and leave the model untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

import surgery
from helpers import zoo
from helpers.models import MLP, SmallCNN
from surgery.cut.apply import apply_plan
from surgery.cut.plan import PruningPlan
from surgery.errors import CaptureError, PlanError, VerificationError


def run(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "tv_resnet18", "regnety_008"])
def test_json_round_trip_rebuilds_the_same_model(tmp_path, name):
    case = zoo.get_case(name)
    plan, pruned = zoo.get_pruned(name)
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text

    plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"], "temporary file left behind"

    ref = run(pruned, case.x)
    fresh = zoo.make_model(name)  # same seed: the same weights, a different object
    rebuilt = apply_plan(fresh, loaded, case.x)
    assert torch.equal(run(rebuilt, case.x), ref)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    rebuilt_state = rebuilt.state_dict()
    assert all(torch.equal(v, rebuilt_state[k]) for k, v in pruned.state_dict().items())
    if name in ("mlp", "small_cnn"):
        # the plan reproduces a function of the model it is applied to, not a stored result
        other_weights = zoo.make_model(name, seed=1)
        assert not torch.equal(run(apply_plan(other_weights, again, case.x), case.x), ref)


def test_round_trip_keeps_decisions_scores_and_metadata():
    case = zoo.get_case("small_cnn")
    c = case.coupling
    kept = zoo.keep_random_half(c, seed=11)
    scores = {g.id: np.linspace(0.0, 1.0, g.atoms) / 3.0 for g in c.prunable}
    from surgery.cut.plan import build_plan

    plan = build_plan(c, kept, criterion="mi", target="logits", budget={"macs": 0.5},
                      scores=scores)
    plan.extra["note"] = {"nested": [1, 2.5, "x"]}
    loaded = PruningPlan.from_json(plan.to_json())
    assert loaded == plan
    assert (loaded.criterion, loaded.target, loaded.budget) == ("mi", "logits", {"macs": 0.5})
    assert loaded.model_class.endswith("SmallCNN")
    for g in loaded.groups:
        assert g.kept == kept[g.id].tolist()
        assert g.scores == [float(s) for s in scores[g.id]]  # floats survive exactly
    assert all(isinstance(d, int) for dims in loaded.keep.values() for d in dims)


def test_keep_lists_are_stored_compactly():
    """Contiguous kept positions are written as ranges, not one number each."""
    case = zoo.get_case("mlp")
    c = case.coupling
    g = next(g for g in c.prunable if ("fc1.weight", 0) in g.slices)
    plan = zoo.plan_for(c, {g.id: np.arange(0, 200)})
    d = json.loads(plan.to_json())
    assert d["keep"]["fc1.weight"]["0"] == [[0, 200]]
    assert PruningPlan.from_json(plan.to_json()).keep["fc1.weight"][0] == list(range(200))


# ---------------------------------------------------------------------------------------
# a plan for another model
# ---------------------------------------------------------------------------------------


def _assert_refused(model, plan, x, *names):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    with pytest.raises(PlanError) as info:
        apply_plan(model, plan, x)
    msg = str(info.value)
    assert "different model" in msg
    for n in names:
        assert n in msg, f"{n!r} not named in: {msg}"
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.training == training
    return msg


def test_plan_for_a_wider_head_is_refused():
    case = zoo.get_case("small_cnn")
    plan, _ = zoo.get_pruned("small_cnn")
    _assert_refused(SmallCNN(num_classes=5).eval(), plan, case.x, "fc.weight")


def test_plan_for_other_hidden_width_is_refused():
    case = zoo.get_case("mlp")
    plan, _ = zoo.get_pruned("mlp")
    _assert_refused(MLP(hidden=128).eval(), plan, case.x, "fc1.weight")


def test_plan_for_another_architecture_is_refused():
    plan, _ = zoo.get_pruned("mlp")
    msg = _assert_refused(SmallCNN().eval(), plan, zoo.make_input("small_cnn"))
    assert "MLP" in msg  # says which model the plan was made for


def test_plan_for_a_deeper_resnet_names_the_extra_parameters():
    """resnet34 has every parameter of resnet18, with the same shapes, plus more blocks: the
    message must still name a mismatching parameter, not just say 'parameter set'."""
    case = zoo.get_case("tv_resnet18")
    plan, _ = zoo.get_pruned("tv_resnet18")
    resnet34 = torchvision.models.resnet34().eval()
    msg = _assert_refused(resnet34, plan, case.x)
    assert "layer1.2." in msg or "layer2.2." in msg, msg


def test_plan_made_for_another_class_with_the_same_parameters():
    class OtherMLP(MLP):
        """Same parameters as MLP, another class."""

    plan, _ = zoo.get_pruned("mlp")
    msg = _assert_refused(OtherMLP().eval(), plan, zoo.make_input("mlp"))
    assert "OtherMLP" in msg or "class" in msg, msg


def test_same_architecture_new_weights_is_accepted():
    """The fingerprint is about names and shapes, not values: retrained weights are fine."""
    plan, pruned = zoo.get_pruned("small_cnn")
    model = zoo.make_model("small_cnn", seed=5)
    out = apply_plan(model, plan, zoo.make_input("small_cnn"))
    assert {k: v.shape for k, v in out.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}


# ---------------------------------------------------------------------------------------
# damaged plans
# ---------------------------------------------------------------------------------------


@pytest.fixture
def plan_dict():
    plan, _ = zoo.get_pruned("small_cnn")
    return json.loads(plan.to_json())


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -2])
def test_truncated_json_raises_plan_error(plan_dict, cut):
    text = json.dumps(plan_dict, indent=1)
    end = int(len(text) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(text) + cut)
    with pytest.raises(PlanError, match="JSON"):
        PruningPlan.from_json(text[:end])


def test_truncated_file_raises_plan_error(tmp_path):
    plan, _ = zoo.get_pruned("small_cnn")
    path = tmp_path / "plan.json"
    plan.save(path)
    path.write_text(path.read_text()[: path.stat().st_size // 3])
    with pytest.raises(PlanError):
        PruningPlan.load(path)


@pytest.mark.parametrize("field", ["keep", "groups", "fingerprint", "shapes", "criterion"])
def test_missing_field_raises_plan_error(plan_dict, field):
    del plan_dict[field]
    with pytest.raises(PlanError, match="malformed"):
        PruningPlan.from_json(json.dumps(plan_dict))


def test_unknown_version_raises_plan_error(plan_dict):
    plan_dict["version"] = 999
    with pytest.raises(PlanError, match="version"):
        PruningPlan.from_json(json.dumps(plan_dict))


def test_unknown_group_field_raises_plan_error(plan_dict):
    plan_dict["groups"][0]["bogus"] = 1
    with pytest.raises(PlanError):
        PruningPlan.from_json(json.dumps(plan_dict))


_WRONG_TYPES = {
    "top-level null": lambda d: None,
    "top-level list": lambda d: [d],
    "keep is a list": lambda d: {**d, "keep": []},
    "kept is a string": lambda d: {**d, "groups": [{**d["groups"][0], "kept": "ab"}]},
    "range of three": lambda d: {**d, "keep": {"fc.weight": {"1": [[0, 1, 2]]}}},
    "dim not an int": lambda d: {**d, "keep": {"fc.weight": {"x": [[0, 4]]}}},
}


@pytest.mark.parametrize("damage", list(_WRONG_TYPES))
def test_wrong_types_raise_plan_error(plan_dict, damage):
    text = json.dumps(_WRONG_TYPES[damage](plan_dict))
    with pytest.raises(PlanError, match="malformed"):
        PruningPlan.from_json(text)


# ---------------------------------------------------------------------------------------
# plans that parse but do not fit: refused before the model is touched
# ---------------------------------------------------------------------------------------


def _edited(edit):
    plan, _ = zoo.get_pruned("small_cnn")
    p = PruningPlan.from_json(plan.to_json())
    edit(p)
    return p


def _assert_untouched(model):
    case = zoo.get_case("small_cnn")
    zoo.assert_state_equal(model, case.snapshot)


def test_out_of_range_index_is_refused():
    p = _edited(lambda p: p.keep["fc.weight"][1].append(999))
    model = zoo.make_model("small_cnn").train()
    with pytest.raises(PlanError, match="fc.weight"):
        apply_plan(model, p, zoo.make_input("small_cnn"), inplace=True)
    _assert_untouched(model)
    assert model.training


def test_keeping_nothing_is_refused():
    p = _edited(lambda p: p.keep["mix.weight"].__setitem__(1, []))
    model = zoo.make_model("small_cnn")
    with pytest.raises(PlanError, match="keeps nothing"):
        apply_plan(model, p, zoo.make_input("small_cnn"), inplace=True)
    _assert_untouched(model)


def test_unknown_parameter_is_refused():
    def edit(p):
        p.keep["nonexistent.weight"] = p.keep.pop("fc.weight")

    model = zoo.make_model("small_cnn")
    with pytest.raises(PlanError, match="nonexistent.weight"):
        apply_plan(model, _edited(edit), zoo.make_input("small_cnn"), inplace=True)
    _assert_untouched(model)


def test_inconsistent_plan_fails_verification_without_touching_the_model():
    """A hand-edited plan that slices a conv but not its BatchNorm parses and passes the
    fingerprint check; the pruned copy then fails verification, and the user's model (not
    inplace) is unchanged."""
    p = _edited(lambda p: [p.keep.pop(f"stem_bn.{n}") for n in
                                ("weight", "bias", "running_mean", "running_var")])
    model = zoo.make_model("small_cnn").train()
    with pytest.raises(VerificationError):
        apply_plan(model, p, zoo.make_input("small_cnn"))
    _assert_untouched(model)
    assert model.training


def test_failing_example_inputs_leave_the_model_in_its_mode():
    """The dense forward that records the output shapes fails on bad inputs: a CaptureError
    naming the cause, and the model comes back in training mode and unchanged."""
    plan, _ = zoo.get_pruned("small_cnn")
    model = zoo.make_model("small_cnn").train()
    with pytest.raises(CaptureError, match="3 channels"):
        apply_plan(model, plan, torch.randn(2, 5, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    _assert_untouched(model)


def test_submodule_modes_are_preserved():
    """Fine-tuning often freezes BatchNorms (``bn.eval()`` inside a training model); neither
    the user's model nor the pruned copy may lose that."""
    case = zoo.get_case("small_cnn")
    plan, _ = zoo.get_pruned("small_cnn")
    model = zoo.make_model("small_cnn").train()
    model.stem_bn.eval()
    pruned = apply_plan(model, plan, case.x)
    modes = {n: m.training for n, m in model.named_modules()}
    assert modes.pop("stem_bn") is False and all(modes.values())
    assert pruned.stem_bn.training is False and pruned.training


def test_summary_and_repr_say_what_is_cut_in_a_few_lines() -> None:
    model, x = zoo.make_model("tv_resnet18"), zoo.make_input("tv_resnet18")
    plan = surgery.make_plan(model, x, sparsity=0.5, criterion="magnitude")
    text = repr(plan)
    assert len(text) < 200 and "criterion='magnitude'" in text and "MACs" in text
    assert "12 groups" in text and "atoms kept" in text
    summary = plan.summary()
    kinds = plan.kinds()
    assert set(kinds) == {"channel"} and kinds["channel"][0] == 12
    params = plan.layer_params()
    assert sum(d for d, _ in params.values()) == surgery.count_params(model)
    conv = params["layer1.0.conv1"]
    rows, cols = (len(plan.keep["layer1.0.conv1.weight"][d]) for d in (0, 1))
    assert conv == (64 * 64 * 3 * 3, rows * cols * 3 * 3) and rows < 64 and cols < 64
    assert "layer1.0.conv1" in summary and "channel" in summary and "fc" in summary
    macs = plan.extra["layer_macs"]
    assert sum(d for d, _ in macs.values()) == plan.budget["dense_macs"]
    assert sum(k for _, k in macs.values()) == pytest.approx(plan.budget["estimated_macs"],
                                                             rel=1e-3)
    again = type(plan).from_json(plan.to_json())
    assert again.summary() == summary
