"""Probes: where calibration looks, and how an observed tensor becomes rows of features.

Probes are identity modules inserted after the observed fx nodes of a copy of the traced
graph; a forward hook on each pools the tensor to a few positions per example (``grid``) and
keeps only the channel positions the relations need. Two probes are compared example by
example and, when both have the same pooled spatial or token layout, position by position.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from surgery.graph.groups import Probe

MAX_FEATURES = 4096
"""Above this many channel positions in one probe, positions are averaged per atom."""


@dataclass
class Features:
    """Which channel positions of a probe are read, the atom of each, and whether the columns
    are those positions or (when there are too many) their per-atom averages."""

    positions: np.ndarray
    position_atoms: np.ndarray
    average_atoms: bool

    @property
    def atom_of_column(self) -> np.ndarray:
        return np.unique(self.position_atoms) if self.average_atoms else self.position_atoms


def features_of(probe: Probe) -> Features:
    positions = np.nonzero(probe.atom_of_position >= 0)[0]
    atoms = probe.atom_of_position[positions]
    return Features(positions, atoms, len(positions) > MAX_FEATURES)


class ProbeModule(torch.nn.Module):
    """Identity; its forward hook does the pooling and stores the result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def pool(x: torch.Tensor, axis: int, grid: int) -> torch.Tensor:
    """Move the channel axis last and pool the rest to at most ``grid`` x ``grid`` positions.

    Returns (batch, *positions, channels) in float32."""
    x = x.detach().float().movedim(axis, -1)
    rest = x.shape[1:-1]
    if len(rest) == 2 and (rest[0] > grid or rest[1] > grid):
        x = F.adaptive_avg_pool2d(x.movedim(-1, 1), (min(grid, rest[0]), min(grid, rest[1])))
        x = x.movedim(1, -1)
    elif len(rest) > 2:
        x = x.mean(dim=tuple(range(1, x.ndim - 1)))
    return x


def columns(pooled: torch.Tensor, feats: Features) -> torch.Tensor:
    if len(feats.positions) == pooled.shape[-1] and (feats.positions == np.arange(len(
            feats.positions))).all():
        cols = pooled  # every position is read (the usual case): no copy
    else:
        cols = pooled.index_select(-1, torch.as_tensor(feats.positions, device=pooled.device))
    if not feats.average_atoms:
        return cols
    column = np.searchsorted(feats.atom_of_column, feats.position_atoms)
    index = torch.as_tensor(column, device=pooled.device)
    out = torch.zeros(*cols.shape[:-1], len(feats.atom_of_column), device=cols.device)
    out.index_add_(-1, index, cols)
    return out / torch.bincount(index).clamp_min(1)


def align(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of samples for both sides: per position when layouts agree, else per example.

    ``mask`` (batch, tokens), from an ``attention_mask`` input, drops padding tokens from
    token-level rows and from per-example means: padding would otherwise dominate the
    statistics of short texts."""
    if x.shape[:-1] == t.shape[:-1]:
        rows = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
        if mask is not None and x.shape[:-1] == mask.shape:
            keep = mask.reshape(-1).nonzero().squeeze(1)
            rows = lambda v: v.reshape(-1, v.shape[-1]).index_select(0, keep)  # noqa: E731
        x_rows = rows(x)
        return x_rows, x_rows if t is x else rows(t)
    return per_example(x, mask), per_example(t, mask)


def per_example(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if v.ndim <= 2:
        return v
    if mask is not None and v.shape[:-1] == mask.shape:
        w = mask.to(v.dtype).unsqueeze(-1)
        return (v * w).sum(1) / w.sum(1).clamp_min(1)
    return v.mean(dim=tuple(range(1, v.ndim - 1)))


def linear_target(gm: fx.GraphModule, nodes: dict[str, fx.Node], rel: Any, xf: Features,
                   tf: Features) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight rows, bias) when the relation's target is exactly a linear function of its
    probed input: an ``nn.Linear`` or 1x1 convolution (stride 1, no padding: its output keeps
    the input's positions, so pooling both alike commutes with it) that the probe sees whole
    (every input feature) and whose own output is the target probe; or a linear reader inside
    a leaf (``rel.reader``), whose output no node shows; else None."""
    if rel.target_probe is None or rel.target_probe.node != rel.layer:
        return None
    if rel.reader is not None:
        return _inner_linear_target(gm, rel, xf, tf)
    node = nodes.get(rel.layer)
    if node is None or node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    pointwise = (type(module) in (torch.nn.Conv1d, torch.nn.Conv2d)
                 and all(k == 1 for k in module.kernel_size) and module.groups == 1
                 and all(v == 1 for v in (*module.stride, *module.dilation))
                 and all(p == 0 for p in module._reversed_padding_repeated_twice))
    if type(module) is not torch.nn.Linear and not pointwise:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.name != rel.probe.node:
        return None
    in_meta, out_meta = source.meta.get("tensor_meta"), node.meta.get("tensor_meta")
    if not hasattr(in_meta, "shape") or not hasattr(out_meta, "shape"):
        return None
    axis = 1 if pointwise else len(in_meta.shape) - 1  # where the layer reads its features
    if (rel.probe.axis != axis
            or rel.target_probe.axis != (1 if pointwise else len(out_meta.shape) - 1)):
        return None
    return _target_rows(module.weight.detach(), module.bias, xf, tf)


def _inner_linear_target(gm: fx.GraphModule, rel: Any, xf: Features, tf: Features
                         ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight rows, bias) of the projection inside a leaf that reads the relation's group
    (``nn.Linear`` or transformers' transposed ``Conv1D``), seen whole by its input probe; the
    target probe's positions are the projection's output rows (the leaf's output for an
    output projection, the head rows for a q/k/v projection)."""
    from surgery.cut.compensation import reader_weight, transposed_linear  # (imports stats)

    module = gm.get_submodule(rel.reader)
    if type(module) is not torch.nn.Linear and not transposed_linear(module):
        return None
    weight = reader_weight(module).detach()
    if len(rel.target_probe.atom_of_position) != weight.shape[0]:
        return None
    return _target_rows(weight, module.bias, xf, tf)


def _target_rows(weight: torch.Tensor, bias: torch.Tensor | None, xf: Features, tf: Features
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The rows of ``weight`` (``[out, in, ...]``) and ``bias`` at the target's positions, when
    the input probe sees every input feature and neither side averages atoms; else None."""
    width = weight.shape[1]
    whole = (not xf.average_atoms and len(xf.positions) == width
             and (xf.positions == np.arange(width)).all())
    if not whole or tf.average_atoms:
        return None
    rows = torch.as_tensor(tf.positions, device=weight.device)
    return (weight.index_select(0, rows),
            None if bias is None else bias.detach().index_select(0, rows))


def observed_target(coupling: Any, rel: Any) -> Any:
    """The probe calibration reads as a relation's target when it is not computed from the
    reader's weights: the reader's output where a node shows it, else (a reader inside a
    leaf that is not linear) where the target group is observed."""
    probe = rel.target_probe
    return probe if probe is not None and probe.module is None else coupling.probes[rel.target]


Key = tuple[str, int, "str | None"]
"""(fx node, axis, submodule whose input is observed or None): see ``Probe.key``."""


@contextlib.contextmanager
def instrument(gm: fx.GraphModule, needed: dict[Key, None], grid: int
               ) -> Iterator[tuple[fx.GraphModule, dict[Key, torch.Tensor]]]:
    """A copy of ``gm``'s graph (sharing its modules and weights) with a probe after each
    needed node, and forward pre-hooks on the needed submodules inside leaves; the hooks
    write pooled activations into ``store``. The pre-hooks sit on the model's own modules, so
    they are removed when the block ends."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # GraphModule looks each get_attr/call_module target up in a dict root: the traced
    # model's objects (modules, weights, graph constants) and the new probes.
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            root[node.target] = operator.attrgetter(node.target)(gm)
    store: dict[Key, torch.Tensor] = {}
    probes: list[str] = []
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        for axis in [a for (n, a, m) in needed if n == node.name and m is None]:
            probe_name = f"_surgery_probe_{len(probes)}"
            probes.append(probe_name)
            probe = ProbeModule()

            def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor, _n=node.name,
                     _a=axis) -> None:
                store[_n, _a, None] = pool(out, _a, grid)

            probe.register_forward_hook(hook)
            root[probe_name] = probe
            graph.call_module(probe_name, (new,))
    handles = []
    for node, axis, module in needed:
        if module is None:
            continue

        def pre_hook(mod: torch.nn.Module, inp: tuple, _k=(node, axis, module)) -> None:
            store[_k] = pool(inp[0], _k[1], grid)

        handles.append(gm.get_submodule(module).register_forward_pre_hook(pre_hook))
    try:
        yield fx.GraphModule(root, graph), store
    finally:
        for handle in handles:
            handle.remove()
