"""Channel groups: which parameter slices the engine couples, on CNNs and hand-written models.

Checks are on ``ChannelGroup.slices`` (``{(param, dim): [positions of atom a]}``), the data a
plan is built from: a wrong coupling here is a wrongly sliced model later.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.nn as nn

from helpers import zoo
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def groups_with(coupling, key):
    """Every group that has a slice of ``key`` = (param, dim)."""
    return [g for g in coupling.groups if key in g.slices]


def group_with(coupling, key):
    found = groups_with(coupling, key)
    assert len(found) == 1, f"{key} is in {len(found)} groups: {[g.name for g in found]}"
    return found[0]


def positions(group, key):
    return [a.tolist() for a in group.slices[key]]


def assert_same_atoms(group, keys):
    """All ``keys`` are slices of ``group`` and atom ``a`` sits at the same positions in each."""
    missing = [k for k in keys if k not in group.slices]
    assert not missing, f"group {group.name!r} lacks {missing}; has {sorted(group.slices)}"
    ref = positions(group, keys[0])
    for k in keys[1:]:
        assert positions(group, k) == ref, f"{k} atoms differ from {keys[0]} in {group.name!r}"


def bn_keys(prefix):
    return [(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")]


def classifier_name(case) -> str:
    model = case.model
    if hasattr(model, "get_classifier"):  # timm
        target = model.get_classifier()
        return next(n for n, m in model.named_modules() if m is target)
    return {"mlp": "fc3", "small_cnn": "fc", "tv_resnet18": "fc"}[case.name]


# ---------------------------------------------------------------------------------------
# invariants on every model of the zoo
# ---------------------------------------------------------------------------------------


def test_groups_partition_parameter_positions(case):
    """No parameter position is in two atoms (two groups, or two atoms of one group); every
    position is inside its tensor; within one (param, dim) of a group all atoms have one size;
    group ids are list indices."""
    state = case.model.state_dict()
    owner: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
    for i, g in enumerate(case.coupling.groups):
        assert g.id == i and case.coupling.group(g.id) is g
        assert g.atoms == len(g.labels) >= 1
        for key, atoms in g.slices.items():
            param, dim = key
            assert param in state, f"group {g.name!r} slices unknown tensor {param!r}"
            size = state[param].shape[dim]
            assert len(atoms) == g.atoms, (g.name, key)
            assert len({len(a) for a in atoms}) == 1, f"{g.name}: unequal atoms on {key}"
            taken = owner.setdefault(key, {})
            for a, pos in enumerate(atoms):
                assert len(pos) > 0
                for p in pos.tolist():
                    assert 0 <= p < size, (key, p, size)
                    assert p not in taken, f"{key}[{p}] in group {taken[p]} and {(g.id, a)}"
                    taken[p] = (g.id, a)


def test_every_layer_channel_is_grouped(case):
    """Every conv/linear output channel and every input channel is in some group, except the
    input channels of the layer that reads the model's raw input."""
    gm = case.coupling.capture.graph_module
    reads_input = {
        n.target for n in gm.graph.nodes
        if n.op == "call_module" and any(a.op == "placeholder" for a in n.all_input_nodes)
    }
    covered: dict[tuple[str, int], set[int]] = {}
    for g in case.coupling.groups:
        for key, atoms in g.slices.items():
            covered.setdefault(key, set()).update(p for a in atoms for p in a.tolist())
    checked = 0
    for name, m in case.model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        out_key, in_key = (f"{name}.weight", 0), (f"{name}.weight", 1)
        assert covered.get(out_key) == set(range(m.weight.shape[0])), f"{name} outputs"
        if name in reads_input:
            assert in_key not in covered, f"{name} reads the model input, which is not prunable"
        elif getattr(m, "groups", 1) == 1:
            assert covered.get(in_key) == set(range(m.weight.shape[1])), f"{name} inputs"
        checked += 1
    assert checked >= 3
    assert reads_input, "no layer reads the model input"


def test_classifier_output_is_not_prunable(case):
    fc = classifier_name(case)
    group = group_with(case.coupling, (f"{fc}.weight", 0))
    assert not group.prunable
    assert group.reason == "model output"
    assert (f"{fc}.bias", 0) in group.slices
    # and its *input* side is an ordinary prunable group
    assert all(g.prunable for g in groups_with(case.coupling, (f"{fc}.weight", 1)))
    # the output group is the only non-prunable one in these plain CNNs / MLPs
    assert [g.id for g in case.coupling.groups if not g.prunable] == [group.id]
    assert group.id in case.coupling.output_groups


# ---------------------------------------------------------------------------------------
# residual sums: torchvision resnet18
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return zoo.get_case("tv_resnet18").coupling


def test_resnet18_stem_and_layer1_residual_stream_is_one_group(resnet18):
    g = group_with(resnet18, ("conv1.weight", 0))
    writers = [("conv1.weight", 0), ("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0)]
    norms = bn_keys("bn1") + bn_keys("layer1.0.bn2") + bn_keys("layer1.1.bn2")
    readers = [("layer1.0.conv1.weight", 1), ("layer1.1.conv1.weight", 1),
               ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)]
    keys = writers + norms + readers
    assert_same_atoms(g, keys)
    assert set(g.slices) == set(keys), set(g.slices) ^ set(keys)
    assert g.prunable and g.atoms == 64
    # one channel per atom, the identity: channel i of the stem is channel i of every block
    assert positions(g, ("layer1.1.conv2.weight", 0)) == [[i] for i in range(64)]


@pytest.mark.parametrize("stage,width", [(2, 128), (3, 256), (4, 512)])
def test_resnet18_downsample_shares_group_with_conv2(resnet18, stage, width):
    s = f"layer{stage}"
    g = group_with(resnet18, (f"{s}.0.downsample.0.weight", 0))
    keys = [(f"{s}.0.downsample.0.weight", 0), (f"{s}.0.conv2.weight", 0),
            (f"{s}.1.conv2.weight", 0), (f"{s}.1.conv1.weight", 1)]
    keys += bn_keys(f"{s}.0.downsample.1") + bn_keys(f"{s}.0.bn2") + bn_keys(f"{s}.1.bn2")
    if stage < 4:
        keys += [(f"layer{stage + 1}.0.conv1.weight", 1),
                 (f"layer{stage + 1}.0.downsample.0.weight", 1)]
    else:
        keys += [("fc.weight", 1)]
    assert_same_atoms(g, keys)
    assert set(g.slices) == set(keys), set(g.slices) ^ set(keys)
    assert g.atoms == width and g.prunable
    # the previous stage's stream is a different group
    prev = group_with(resnet18, (f"{s}.0.conv1.weight", 1))
    assert prev.id != g.id


@pytest.mark.parametrize("block", ["layer1.0", "layer1.1", "layer2.0", "layer3.1", "layer4.1"])
def test_resnet18_inner_block_channels_are_private(resnet18, block):
    """conv1's outputs meet only bn1 and conv2's inputs: nothing of the residual stream."""
    g = group_with(resnet18, (f"{block}.conv1.weight", 0))
    keys = [(f"{block}.conv1.weight", 0), (f"{block}.conv2.weight", 1)] + bn_keys(f"{block}.bn1")
    assert set(g.slices) == set(keys)
    assert_same_atoms(g, keys)
    assert g.prunable


# ---------------------------------------------------------------------------------------
# the hand-written models
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_coupling():
    return zoo.get_case("small_cnn").coupling


def test_small_cnn_residual(cnn_coupling):
    g = group_with(cnn_coupling, ("stem.weight", 0))
    keys = [("stem.weight", 0), ("res_conv2.weight", 0), ("res_conv1.weight", 1),
            ("branch_a.weight", 1), ("branch_b.weight", 1)]
    keys += bn_keys("stem_bn") + bn_keys("res_bn2")
    assert set(g.slices) == set(keys)
    assert_same_atoms(g, keys)
    assert g.atoms == 16 and g.prunable


def test_small_cnn_concat_keeps_offsets(cnn_coupling):
    a = group_with(cnn_coupling, ("branch_a.weight", 0))
    b = group_with(cnn_coupling, ("branch_b.weight", 0))
    assert a.id != b.id and a.prunable and b.prunable
    assert (a.atoms, b.atoms) == (12, 20)
    # the consumer conv's input columns: branch A first, branch B after it
    assert positions(a, ("mix.weight", 1)) == [[i] for i in range(12)]
    assert positions(b, ("mix.weight", 1)) == [[12 + i] for i in range(20)]
    assert_same_atoms(a, [("branch_a.weight", 0), ("branch_a.bias", 0)])
    assert_same_atoms(b, [("branch_b.weight", 0), ("branch_b.bias", 0)])
    assert len(groups_with(cnn_coupling, ("mix.weight", 1))) == 2


def test_small_cnn_depthwise_couples_in_and_out(cnn_coupling):
    g = group_with(cnn_coupling, ("dw.weight", 0))
    keys = [("mix.weight", 0), ("dw.weight", 0), ("se_fc1.weight", 1), ("se_fc2.weight", 0),
            ("se_fc2.bias", 0), ("fc.weight", 1)] + bn_keys("mix_bn") + bn_keys("dw_bn")
    assert set(g.slices) == set(keys)
    assert_same_atoms(g, keys)
    assert g.atoms == 32 and g.prunable
    # a depthwise weight has one input channel per output: its dim 1 is never cut
    assert not groups_with(cnn_coupling, ("dw.weight", 1))


def test_small_cnn_squeeze_excitation_hidden_group(cnn_coupling):
    g = group_with(cnn_coupling, ("se_fc1.weight", 0))
    keys = [("se_fc1.weight", 0), ("se_fc1.bias", 0), ("se_fc2.weight", 1)]
    assert set(g.slices) == set(keys)
    assert_same_atoms(g, keys)
    assert g.atoms == 8 and g.prunable


def test_mlp_groups():
    c = zoo.get_case("mlp").coupling
    h1 = group_with(c, ("fc1.weight", 0))
    keys1 = [("fc1.weight", 0), ("fc1.bias", 0), ("norm.weight", 0), ("norm.bias", 0),
             ("fc2.weight", 1)]
    assert set(h1.slices) == set(keys1)
    assert_same_atoms(h1, keys1)
    h2 = group_with(c, ("fc2.weight", 0))
    keys2 = [("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)]
    assert set(h2.slices) == set(keys2)
    assert_same_atoms(h2, keys2)
    assert h1.prunable and h2.prunable and h1.atoms == h2.atoms == 256 and h1.id != h2.id
    assert not groups_with(c, ("fc1.weight", 1)), "the model input must not be prunable"
    assert [g.id for g in c.prunable] == sorted([h1.id, h2.id])


# ---------------------------------------------------------------------------------------
# timm: depthwise (mobilenetv3, efficientnet, convnext), grouped conv (regnety), concat (densenet)
# ---------------------------------------------------------------------------------------


def test_mobilenetv3_depthwise_follows_pointwise():
    c = zoo.get_case("mobilenetv3_large_100").coupling
    g = group_with(c, ("blocks.1.0.conv_dw.weight", 0))
    keys = [("blocks.1.0.conv_pw.weight", 0), ("blocks.1.0.conv_dw.weight", 0),
            ("blocks.1.0.conv_pwl.weight", 1)]
    keys += bn_keys("blocks.1.0.bn1") + bn_keys("blocks.1.0.bn2")
    assert_same_atoms(g, keys)
    assert g.atoms == 64 and g.prunable
    assert positions(g, ("blocks.1.0.conv_dw.weight", 0)) == [[i] for i in range(64)]


def _producer(gm, modules, node):
    """The nearest conv/linear upstream of ``node``'s first input (through norms, activations,
    adds: for an add, its first operand)."""
    cur = node.all_input_nodes[0]
    while cur.op != "placeholder":
        if cur.op == "call_module" and isinstance(modules.get(cur.target), (nn.Conv2d, nn.Linear)):
            return cur.target
        cur = cur.all_input_nodes[0]
    return None


@pytest.mark.parametrize("name", ["small_cnn", "mobilenetv3_large_100", "efficientnet_b0",
                                  "convnext_atto"])
def test_every_depthwise_conv_shares_its_producers_group(name):
    """For each depthwise conv, the group of its outputs also holds the output channels of
    the layer feeding it, atom for atom (channel i in is channel i out)."""
    case = zoo.get_case(name)
    c = case.coupling
    gm = c.capture.graph_module
    modules = dict(case.model.named_modules())
    depthwise = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)
                 and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    assert depthwise
    for dw in depthwise:
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == dw)
        producer = _producer(gm, modules, node)
        assert producer is not None, dw
        g = group_with(c, (f"{dw}.weight", 0))
        assert g.prunable, (dw, g.reason)
        assert all(len(a) == 1 for a in g.slices[(f"{dw}.weight", 0)])
        assert_same_atoms(g, [(f"{dw}.weight", 0), (f"{producer}.weight", 0)])
        assert not groups_with(c, (f"{dw}.weight", 1))


def test_regnety_grouped_conv_removes_whole_groups():
    case = zoo.get_case("regnety_008")
    c = case.coupling
    grouped = [(n, m) for n, m in case.model.named_modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
    assert len(grouped) >= 10
    for name, m in grouped:
        block = name.rsplit(".conv2.conv", 1)[0]
        g = group_with(c, (f"{name}.weight", 0))
        width = m.out_channels // m.groups
        assert width > 1 and g.prunable
        assert g.atoms == m.groups, f"{name}: {g.atoms} atoms for {m.groups} conv groups"
        expected = [list(range(j * width, (j + 1) * width)) for j in range(m.groups)]
        assert positions(g, (f"{name}.weight", 0)) == expected
        # the conv feeding the grouped conv and the conv reading it lose the same channels
        assert_same_atoms(g, [(f"{name}.weight", 0), (f"{block}.conv1.conv.weight", 0),
                              (f"{block}.conv3.conv.weight", 1)] + bn_keys(f"{block}.conv2.bn"))
        assert not groups_with(c, (f"{name}.weight", 1))


def test_densenet_concat_offsets():
    c = zoo.get_case("densenet121").coupling
    blk = "features.denseblock1"
    init = 64  # conv0 width
    growth = 32
    stem = group_with(c, ("features.conv0.weight", 0))
    assert positions(stem, (f"{blk}.denselayer3.conv1.weight", 1)) == [[i] for i in range(init)]
    for k in (1, 2, 3):
        g = group_with(c, (f"{blk}.denselayer{k}.conv2.weight", 0))
        assert g.atoms == growth and g.prunable and g.id != stem.id
        offset = init + (k - 1) * growth
        expected = [[offset + i] for i in range(growth)]
        for later in range(k + 1, 6):
            assert positions(g, (f"{blk}.denselayer{later}.conv1.weight", 1)) == expected
            assert positions(g, (f"{blk}.denselayer{later}.norm1.weight", 0)) == expected
    layer3_inputs = groups_with(c, (f"{blk}.denselayer3.conv1.weight", 1))
    assert len(layer3_inputs) == 3  # conv0, layer1, layer2: three separate groups


# ---------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "regnety_008"])
def test_grouping_is_deterministic_in_process(name):
    first = zoo.get_case(name).coupling
    model, x = zoo.make_model(name), zoo.make_input(name)
    second = find_groups(trace(model, x))
    assert zoo.digest(first) == zoo.digest(second)
    assert [g.name for g in first.groups] == [g.name for g in second.groups]


_DIGEST_SCRIPT = """
from helpers import zoo
for name in {names!r}:
    print(name, zoo.digest(zoo.get_case(name).coupling))
"""


def test_grouping_is_deterministic_across_processes():
    """Group ids and atom order must not depend on hash seeds (saved plans refer to them)."""
    names = ["small_cnn", "tv_resnet18"]
    tests = os.path.dirname(os.path.dirname(__file__))
    script = _DIGEST_SCRIPT.format(names=names)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PYTHONPATH": tests}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(tests))
    assert out.returncode == 0, out.stderr[-2000:]
    got = dict(line.split() for line in out.stdout.strip().splitlines())
    assert got == {n: zoo.digest(zoo.get_case(n).coupling) for n in names}


def test_digest_detects_a_difference():
    """The determinism tests compare digests; make sure a changed group changes the digest."""
    c = zoo.get_case("small_cnn").coupling
    before = zoo.digest(c)
    g = c.groups[0]
    saved = g.slices
    key = next(iter(saved))
    g.slices = {**saved, key: list(reversed(saved[key]))}
    try:
        assert zoo.digest(c) != before
    finally:
        g.slices = saved
    assert zoo.digest(c) == before


def test_tracing_keeps_submodule_modes():
    model = zoo.make_model("small_cnn").train()
    model.stem_bn.eval()
    trace(model, zoo.make_input("small_cnn"))
    modes = {n: m.training for n, m in model.named_modules()}
    assert modes.pop("stem_bn") is False and all(modes.values())
