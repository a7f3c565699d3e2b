"""Regression tests for the engine fixes the model sweep (benchmarks/model_sweep.py) found.

Each fix gets a small hand-built module using the op the way the failing models do. For each:
the model traces and groups, keeping every atom is the identity, and a plan keeping half of
every prunable group runs with the dense output shape (``apply_plan`` verifies it), so the
channels through the op are either cut consistently or pinned, never cut wrongly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import surgery
from helpers.models import ScaledConv
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan


def _plan(coupling, kept):
    return build_plan(coupling, kept, criterion="test", target="output", budget={})


def check(model: nn.Module, x, *, min_prunable: int = 1) -> surgery.groups:
    """Trace, group, keep-all is the identity, a half plan runs with the dense shapes."""
    torch.manual_seed(0)
    model.eval()
    coupling = surgery.couple(model, x)
    assert len(coupling.prunable) >= min_prunable, [(g.name, g.reason) for g in coupling.groups]
    with torch.no_grad():
        ref = model(x)
    full = apply_plan(model, _plan(coupling, {g.id: np.arange(g.atoms) for g in coupling.prunable}), x)
    with torch.no_grad():
        out = full(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    half = {g.id: np.arange(0, g.atoms, 2) for g in coupling.prunable}
    pruned = apply_plan(model, _plan(coupling, half), x)  # verifies the forward and shapes
    assert not coupling.prunable or sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    return coupling


def group_of(coupling, param: str, dim: int = 0):
    return next(g for g in coupling.groups if (param, dim) in g.slices)


# ---------------------------------------------------------------------------------------
# getitem: slices whose bounds are traced sizes (swin, davit, halonet, pit, sam: x[:, :H, :W])
# ---------------------------------------------------------------------------------------


class CropToInput(nn.Module):
    """Pad, conv, then crop back to the input's size with traced bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=2)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        H, W = x.shape[2], x.shape[3]
        y = torch.relu(self.conv1(x))
        y = y[:, :, :H, :W]
        return self.conv2(y).mean((2, 3))


def test_slice_with_traced_bounds():
    c = check(CropToInput(), torch.randn(1, 3, 10, 10))
    assert group_of(c, "conv1.weight").prunable


class SliceChannelsByTracedSize(nn.Module):
    """A channel slice whose bound is a traced size: the sliced channels must be pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(x)
        return self.c(a[:, : b.shape[1]] + b).mean((2, 3)) + self.d(a).mean((2, 3))[:, :2]


def test_channel_slice_with_traced_bound_is_pinned():
    c = surgery.couple(SliceChannelsByTracedSize().eval(), torch.randn(1, 3, 5, 5))
    assert not group_of(c, "a.weight").prunable
    assert not group_of(c, "b.weight").prunable


# ---------------------------------------------------------------------------------------
# view/reshape to sizes read from tensors (beit, cait, coat, crossvit, pvt_v2, twins, volo)
# ---------------------------------------------------------------------------------------


class ReshapeToReadWidth(nn.Module):
    """``v(x).transpose(1, 2).reshape(B, N, C)`` with ``C`` read from the residual stream:
    v's outputs and the stream must keep the same count."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        v = self.v(x).transpose(1, 2)
        x = x + self.proj(v.transpose(1, 2).reshape(B, N, C))
        return self.head(x).mean(1)


def test_reshape_to_read_width_couples_the_widths():
    c = check(ReshapeToReadWidth(), torch.randn(1, 5, 8))
    assert group_of(c, "v.weight") is group_of(c, "embed.weight")


class ReshapeUntrackedToReadWidth(nn.Module):
    """The attention output carries no channel ids (an op without a rule in between), and is
    reshaped to ``C`` read from the residual stream: the stream must be pinned."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        v = torch.flip(self.v(x), dims=[1])  # no rule: opaque
        x = x + self.proj(v.reshape(B, N, C))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x).mean(1)


def test_reshape_of_untracked_to_read_width_pins_the_source():
    c = check(ReshapeUntrackedToReadWidth(), torch.randn(1, 5, 8))
    assert not group_of(c, "embed.weight").prunable
    assert group_of(c, "fc1.weight").prunable


class ReshapeToComputedWidth(nn.Module):
    """``qkv.reshape(B, N, 3, self.heads, C // self.heads)``: a width computed from a read."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        x = x + self.proj(a)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x).mean(1)


def test_reshape_to_computed_width_pins_what_it_reads():
    c = check(ReshapeToComputedWidth(), torch.randn(1, 5, 8))
    assert not group_of(c, "embed.weight").prunable
    assert group_of(c, "fc1.weight").prunable


# ---------------------------------------------------------------------------------------
# reshape_as / view_as (levit's LinearNorm, nfnet's standardised weights)
# ---------------------------------------------------------------------------------------


class LinearNorm(nn.Module):
    """levit: a linear layer and a BatchNorm1d over the flattened tokens, reshaped back."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.bn = nn.BatchNorm1d(d_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = LinearNorm(8, 16)
        self.b = LinearNorm(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x))))).mean(1)


def test_reshape_as_carries_channels():
    model = LeViTLike()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    c = check(model, torch.randn(2, 5, 8), min_prunable=2)
    assert group_of(c, "a.linear.weight") is group_of(c, "a.bn.weight")


# ---------------------------------------------------------------------------------------
# torch.stack (skresnet's selective kernel)
# ---------------------------------------------------------------------------------------


class SelectiveKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.path1 = nn.Conv2d(8, 16, 3, padding=1)
        self.path2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        paths = torch.stack([self.path1(x), self.path2(x)], dim=1)  # B, 2, C, H, W
        w = paths.mean((3, 4), keepdim=True).softmax(dim=1)
        return self.out((paths * w).sum(1)).mean((2, 3))


def test_stack_unions_the_stacked_channels():
    c = check(SelectiveKernel(), torch.randn(1, 3, 8, 8), min_prunable=2)
    assert group_of(c, "path1.weight") is group_of(c, "path2.weight")
    assert group_of(c, "path1.weight").prunable


# ---------------------------------------------------------------------------------------
# F.pad (tiny_vit, twins: pad to a multiple of the window)
# ---------------------------------------------------------------------------------------


class PadToWindow(nn.Module):
    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        H, W = x.shape[2:]
        pad_h, pad_w = (-H) % self.window, (-W) % self.window
        if pad_h > 0 or pad_w > 0:  # a branch on traced sizes, too
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.conv2(x).mean((2, 3))


def test_pad_keeps_channels_and_branch_on_sizes_traces():
    c = check(PadToWindow(), torch.randn(1, 3, 10, 10))
    assert group_of(c, "conv1.weight").prunable


class PadChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.conv2(F.pad(self.conv1(x), (0, 0, 0, 0, 1, 1))).mean((2, 3))


def test_pad_along_channels_pins_them():
    c = surgery.couple(PadChannels().eval(), torch.randn(1, 3, 4, 4))
    assert not group_of(c, "conv1.weight").prunable


# ---------------------------------------------------------------------------------------
# capture: branches on traced values, inputs left at their defaults, leaves without rules
# ---------------------------------------------------------------------------------------


class BranchOnShapes(nn.Module):
    """mobilevit: ``if new_h != H`` on sizes computed from the input; gemma-style ndim test."""

    def __init__(self, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        H, W = x.shape[-2:]
        new_h = math.ceil(H / self.patch) * self.patch
        if new_h != H or x.ndim != 4:
            x = F.interpolate(x, size=(new_h, new_h), mode="bilinear")
        return self.conv2(x).mean((2, 3))


def test_branch_on_traced_sizes_follows_the_example():
    c = check(BranchOnShapes(), torch.randn(1, 3, 10, 10))
    targets = [n.target for n in c.capture.graph_module.graph.nodes]
    assert F.interpolate in targets
    c = surgery.couple(BranchOnShapes().eval(), torch.randn(1, 3, 8, 8))
    assert F.interpolate not in [n.target for n in c.capture.graph_module.graph.nodes]


class BranchOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        if x.sum() > 0:  # on values: other inputs may go the other way, so never specialised
            x = x * 2
        return x


def test_branch_on_tensor_values_is_still_refused():
    with pytest.raises(surgery.CaptureError, match="control flow"):
        surgery.couple(BranchOnValues().eval(), torch.randn(2, 4))


class OptionalMask(nn.Module):
    """hiera: ``forward(x, mask=None)`` with ``if mask is not None``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None):
        x = torch.relu(self.conv1(x))
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, *x.shape[2:])
        return self.conv2(x).mean((2, 3))


def test_inputs_left_out_keep_their_defaults():
    check(OptionalMask(), torch.randn(1, 3, 6, 6))


class Opaque(nn.Module):
    """A block a plugin declares a leaf without giving it a channel rule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(8, 16, 1)
        self.fc2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = Opaque()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x))).mean((2, 3))


class _LeafPlugin:
    @surgery.hookimpl
    def surgery_leaf_modules(self, model):
        return [Opaque]


def test_leaf_without_rule_is_traced_into():
    from surgery.plugins import plugin_manager

    pm = plugin_manager()
    plugin = _LeafPlugin()
    pm.register(plugin, name="test-sweep-leaf")
    try:
        c = check(WithOpaque(), torch.randn(1, 3, 4, 4), min_prunable=2)
        assert group_of(c, "block.fc1.weight").prunable
        assert not c.propagation.opaque
    finally:
        pm.unregister(plugin)


# ---------------------------------------------------------------------------------------
# counting: FlopCounterMode's module tracker (pit, cait with batch 1)
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, cls):
        return self.fc(x) + cls


class ExpandedToken(nn.Module):
    """A parameter expanded to its own shape (batch 1) under no_grad, passed to a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.head(self.block(x, cls)).mean(1)


def test_count_macs_with_expanded_parameter_input():
    model, x = ExpandedToken().eval(), torch.randn(1, 5, 4)
    assert surgery.count_macs(model, x) == 5 * (4 * 8 + 8 * 8 + 8 * 3)
    pruned, plan = surgery.prune(model, x, sparsity=0.2, criterion="magnitude")
    assert plan.budget["macs"] < plan.budget["dense_macs"]


# ---------------------------------------------------------------------------------------
# functional convs: a literal group count, a non-persistent weight (tresnet's BlurPool2d)
# ---------------------------------------------------------------------------------------


class BlurPool(nn.Module):
    """timm's BlurPool2d: pad, then a depthwise F.conv2d with a fixed, non-persistent filter
    and ``groups=self.channels``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9, persistent=False)

    def forward(self, x):
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=self.channels)


class WithBlurPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.aa = BlurPool(8)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.aa(torch.relu(self.conv1(x)))
        return self.conv3(torch.relu(self.conv2(x))).mean((2, 3))


def test_functional_conv_with_literal_groups_and_unsaved_weight():
    c = check(WithBlurPool(), torch.randn(1, 3, 8, 8))
    assert not group_of(c, "conv1.weight").prunable  # the blur's channel count is fixed
    assert group_of(c, "conv2.weight").prunable
    assert all(p != "aa.filt" for g in c.prunable for p, _ in g.slices)


# ---------------------------------------------------------------------------------------
# the two fixes above, one at a time: a non-persistent buffer on a channel axis, and a
# literal group count in a functional conv whose weight is an ordinary parameter
# ---------------------------------------------------------------------------------------


def test_non_persistent_buffer_pins_its_channels():
    c = check(ScaledConv(persistent=False), torch.randn(1, 3, 8, 8), min_prunable=0)
    group = group_of(c, "conv1.weight")
    assert not group.prunable and "non-persistent buffer scale" in group.reason


def test_persistent_buffer_is_cut_with_its_channels(tmp_path):
    model = ScaledConv(persistent=True).eval()
    x = torch.randn(2, 3, 8, 8)
    c = check(model, x)
    group = group_of(c, "conv1.weight")
    assert group.prunable and ("scale", 0) in group.slices
    pruned, plan = surgery.prune(model, x, sparsity=0.5, budget="params", criterion="magnitude")
    kept = len(next(g for g in plan.groups if g.id == group.id).kept)
    assert pruned.scale.shape == (kept, 1, 1) and kept < 8
    arch = surgery.io.Architecture.factory("helpers.models:ScaledConv", persistent=True)
    surgery.io.save(pruned, tmp_path / "m", plan, arch)  # the buffer is in the state dict
    with torch.no_grad():
        assert torch.equal(surgery.io.load(tmp_path / "m")(x), pruned(x))


class LiteralGroups(nn.Module):
    """F.conv2d with ``groups=2`` written as a literal and a weight that is a parameter: after
    a cut the literal would no longer divide the channels, so both sides stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3) / 6)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.conv2d(torch.relu(self.conv1(x)), self.weight, padding=1, groups=2)
        return self.conv2(torch.relu(y)).mean((2, 3))


def test_literal_group_count_pins_both_sides_of_the_conv():
    c = check(LiteralGroups(), torch.randn(1, 3, 8, 8), min_prunable=0)
    for param in ("conv1.weight", "weight"):
        group = group_of(c, param)
        assert not group.prunable and "literal group count" in group.reason, (param, group.reason)

