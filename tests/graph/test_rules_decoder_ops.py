"""Engine rules the decoder LLMs need, on small hand-built modules: a fused gate/up projection
split by ``chunk`` (Phi-3), views to a shape read as a whole from another tensor (OPT) or
built by adding tuples (GPT-2), and keyword arguments a plugin fixes for tracing
(``surgery_trace_kwargs``: ``use_cache=False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import surgery
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan
from surgery.hookspecs import hookimpl
from surgery.plugins import plugin_manager


def _plan(coupling, kept):
    return build_plan(coupling, kept, criterion="test", target="output", budget={})


def group_of(coupling, param: str, dim: int = 0):
    return next(g for g in coupling.groups if (param, dim) in g.slices)


def check_half(model: nn.Module, x) -> surgery.groups:
    """Couple; keep-all is the identity; keeping every other atom of every group runs."""
    model.eval()
    c = surgery.couple(model, x)
    with torch.no_grad():
        ref = model(x)
    full = apply_plan(model, _plan(c, {g.id: np.arange(g.atoms) for g in c.prunable}), x)
    with torch.no_grad():
        assert torch.allclose(full(x), ref, atol=1e-6)
    apply_plan(model, _plan(c, {g.id: np.arange(0, g.atoms, 2) for g in c.prunable}), x)
    return c


class FusedGLU(nn.Module):
    """``gate, up = gate_up(x).chunk(2, -1)``: row ``i`` of the gate and row ``i`` of the up
    half are one FFN channel (Phi-3's MLP)."""

    def __init__(self, d: int = 8, f: int = 12) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * f)
        self.down = nn.Linear(f, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.head(x + self.down(torch.relu(gate) * up))


class UnequalSplit(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.both = nn.Linear(d, 24)
        self.a, self.b = nn.Linear(10, d), nn.Linear(14, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        a, b = self.both(x).split([10, 14], dim=-1)
        return self.head(x + self.a(a) + self.b(b))


def test_chunk_into_equal_pieces_couples_them_position_by_position():
    torch.manual_seed(0)
    c = check_half(FusedGLU(), torch.randn(2, 5, 8))
    group = group_of(c, "gate_up.weight")
    assert group.prunable and group.atoms == 12, group.reason
    rows = group.slices[("gate_up.weight", 0)]
    assert [list(r) for r in rows[:2]] == [[0, 12], [1, 13]]  # gate row i with up row i
    assert ("down.weight", 1) in group.slices


def test_split_into_unequal_pieces_still_pins_the_axis():
    torch.manual_seed(0)
    c = surgery.couple(UnequalSplit().eval(), torch.randn(2, 5, 8))
    assert not group_of(c, "both.weight").prunable


class _EmbedBlockHead(nn.Module):
    """embed -> one residual linear -> head; subclasses differ only in how they reshape."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)


class ViewToShapeOf(_EmbedBlockHead):
    """OPT: ``shape = h.shape; h = h.reshape(-1, h.size(-1)); ...; out.view(shape)``."""

    def forward(self, x):
        h = self.embed(x)
        shape = h.shape
        flat = h.reshape(-1, h.size(-1))
        return self.head((flat + self.fc(flat)).view(shape))


class ViewToAddedTuples(_EmbedBlockHead):
    """GPT-2: ``out_shape = (-1,) + x.size()[1:-1] + (h.size(-1),)``, read before the blocks."""

    def forward(self, x):
        h = self.embed(x)
        out_shape = (-1,) + x.size()[1:-1] + (h.size(-1),)
        h = h + self.fc(h)
        return self.head(h.view(out_shape))


@pytest.mark.parametrize("model", [ViewToShapeOf, ViewToAddedTuples])
def test_view_to_a_shape_computed_as_a_whole_follows_each_axis(model):
    torch.manual_seed(0)
    c = check_half(model(), torch.randn(2, 5, 4))
    stream = group_of(c, "embed.weight")
    assert stream.prunable, stream.reason  # before: pinned, "its size fixes a reshape"
    assert ("fc.weight", 0) in stream.slices and ("head.weight", 1) in stream.slices


class ViewToLiteralShape(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h.view((-1,) + x.size()[1:-1] + (8,)))


def test_a_literal_width_inside_a_computed_shape_still_pins():
    c = surgery.couple(ViewToLiteralShape().eval(), torch.randn(2, 5, 4))
    assert not group_of(c, "embed.weight").prunable


class WithCache(nn.Module):
    """A forward that builds state for later calls unless told not to (a KV cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.calls: list[int] = []

    def forward(self, x, use_cache: bool = True):
        h = torch.relu(self.fc(x))
        if use_cache:
            self.calls.append(1)  # state a traced graph would keep as a constant
            return self.head(h), self.calls
        return self.head(h)


class _NoCache:
    @hookimpl
    def surgery_trace_kwargs(self, model):
        return {"use_cache": False, "not_a_parameter": 1} if isinstance(model, WithCache) else None


def test_trace_kwargs_fix_keywords_the_forward_takes():
    pm = plugin_manager()
    plugin = _NoCache()
    pm.register(plugin, name="no-cache")
    try:
        model = WithCache().eval()
        c = surgery.couple(model, {"x": torch.randn(3, 4)})
        placeholders = [n.target for n in c.capture.graph_module.graph.nodes if n.op == "placeholder"]
        assert placeholders == ["x"]
        out = c.capture.graph_module(torch.randn(3, 4))
        assert isinstance(out, torch.Tensor)  # traced with use_cache=False
        assert group_of(c, "fc.weight").prunable
        # an example input of the same name wins
        kept = surgery.couple(model, {"x": torch.randn(3, 4), "use_cache": True})
        assert not isinstance(kept.capture.graph_module(torch.randn(3, 4), True), torch.Tensor)
    finally:
        pm.unregister(plugin)
