"""Track algebra shared by the channel rules: merging tracks, elementwise ops, size reads.

A rule reads the channel tracks of a node's inputs from a :class:`surgery.graph.propagate.Propagation` and
sets the node's output tracks; these are the pieces most rules (and plugins' rules) are built from.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import numpy as np
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from surgery.graph.propagate import Propagation, Track, Tracks


def _node_args(node: fx.Node, names: tuple[str, ...]) -> list[Any]:
    """Positional-or-keyword arguments of a call, by parameter name, None when absent."""
    out = []
    for i, name in enumerate(names):
        if i < len(node.args):
            out.append(node.args[i])
        else:
            out.append(node.kwargs.get(name))
    return out


def merge_tracks(prop: Propagation, tracks: Tracks) -> Tracks:
    """Tracks on the same axis of one value are the same channels: union them."""
    by_axis: dict[tuple[int, ...], Track] = {}
    for t in tracks:
        if t.axes in by_axis:
            prop.union(by_axis[t.axes].ids, t.ids)
        else:
            by_axis[t.axes] = t
    return sorted(by_axis.values(), key=lambda t: t.axes)


def pointwise(prop: Propagation, node: fx.Node, operands: list[Any] | None = None) -> None:
    """Elementwise op with broadcasting (add, mul, activations): channels on aligned axes of
    all operands are one. An operand with a full-size axis that carries no ids (a constant,
    the raw input) pins the channels on that axis."""
    out_shape = prop.shape(node)
    if out_shape is None:
        prop.set(node, [])
        return
    operands = list(node.args) + list(node.kwargs.values()) if operands is None else operands
    nd = len(out_shape)
    placed: Tracks = []
    tensor_operands = []
    for arg in operands:
        shape = prop.shape(arg)
        if shape is None:
            continue
        off = nd - len(shape)
        tensor_operands.append((arg, shape, off))
        for t in prop.get(arg):
            if all(shape[a] == out_shape[a + off] for a in t.axes):
                placed.append(Track(tuple(a + off for a in t.axes), t.ids))
    merged = merge_tracks(prop, placed)
    for arg, shape, off in tensor_operands:
        own = {a + off for t in prop.get(arg) for a in t.axes}
        for t in merged:
            (ax,) = t.axes
            local = ax - off
            if local >= 0 and shape[local] == out_shape[ax] > 1 and ax not in own:
                prop.freeze(t.ids, "elementwise with an untracked full-size operand")
    prop.set(node, merged)


def _sequence_tracks(prop: Propagation, arg: Any) -> tuple | None:
    """The per-element tracks of a tuple-valued operand (a node or a literal tuple), else None."""
    if isinstance(arg, fx.Node):
        value = prop.tracks.get(arg.name)
        return value if isinstance(value, tuple) else None
    if isinstance(arg, (tuple, list)):
        return tuple(prop.get(a) for a in arg)
    return None


def add_rule(prop: Propagation, node: fx.Node) -> None:
    """``+``: elementwise for tensors; for tuples (``(x,) + outputs[1:]`` in module code) the
    element tracks are concatenated."""
    if len(node.args) == 2 and not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
        left, right = (_sequence_tracks(prop, a) for a in node.args)
        if left is not None and right is not None:
            prop.set(node, left + right)
            return
    pointwise(prop, node)


def passthrough(prop: Propagation, node: fx.Node, source: Any = None) -> None:
    """The output has the channels of the first argument, axis for axis."""
    src = node.args[0] if source is None else source
    if prop.shape(node) == prop.shape(src):
        prop.set(node, list(prop.get(src)))
    else:
        prop.opaque_op(node, f"shape-changing {node.target}")


def keep_leading_axes(prop: Propagation, node: fx.Node, count: int = 2) -> None:
    """Pooling / resizing: channels on the first ``count`` axes survive, others are resampled."""
    src = node.args[0]
    prop.set(node, [t for t in prop.get(src) if all(a < count for a in t.axes)])


def _size_read(prop: Propagation, node: fx.Node) -> list[tuple[fx.Node, int]] | None:
    """The tensor axes a size node reads (``x.size(k)``, ``x.shape[k]``, ``x.shape[a:b]``,
    ``x.size()``, ``x.shape``, ``x.numel()``), or None when ``node`` is no size read."""

    def axes(tensor: Any, index: Any) -> list[tuple[fx.Node, int]] | None:
        shape = prop.shape(tensor)
        if shape is None:
            return None
        nd = len(shape)
        if index is None:
            return [(tensor, a) for a in range(nd)]
        if isinstance(index, int):
            return [(tensor, index % nd)] if -nd <= index < nd else None
        if isinstance(index, slice) and not any(isinstance(b, fx.Node) for b in
                                                (index.start, index.stop, index.step)):
            return [(tensor, a) for a in range(nd)[index]]
        return None

    def whole_shape(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return None
        if n.op == "call_function" and n.target is builtins.getattr and n.args[1:] == ("shape",):
            return n.args[0]
        if n.op == "call_method" and n.target == "size" and len(n.args) == 1 \
                and "dim" not in n.kwargs:
            return n.args[0]
        return None

    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return axes(node.args[0], dim)
    if node.op == "call_method" and node.target == "numel":
        return axes(node.args[0], None)
    if node.op == "call_function" and node.target is operator.getitem:
        base = whole_shape(node.args[0])
        if base is not None:
            return axes(base, node.args[1])
    base = whole_shape(node)
    return axes(base, None) if base is not None else None


def _size_reads(prop: Propagation, arg: Any) -> list[tuple[fx.Node, int]]:
    """Every tensor axis whose size a computed (non-tensor) argument depends on, through
    integer arithmetic and tuple building (``C // self.num_heads``, ``(*x.shape[:-1], -1)``)."""
    out: list[tuple[fx.Node, int]] = []
    seen: set[str] = set()
    stack = [arg]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
            continue
        if isinstance(item, slice):
            stack.extend((item.start, item.stop, item.step))
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
            continue
        if not isinstance(item, fx.Node) or item.name in seen:
            continue
        seen.add(item.name)
        if isinstance(item.meta.get("tensor_meta"), TensorMetadata):
            continue  # a tensor's values, not its sizes
        read = _size_read(prop, item)
        if read is not None:
            out.extend(read)
        else:
            stack.extend(item.all_input_nodes)
    return out


def pin_size_reads(prop: Propagation, arg: Any, reason: str) -> None:
    """Channels on every axis ``arg``'s sizes were read from are pinned: a size computed at
    trace time from a channel axis would not follow a cut (``reshape(B, N, C)`` with ``C``
    read from the residual stream, applied to an attention output)."""
    for tensor, axis in _size_reads(prop, arg):
        t = prop.track_on(tensor, axis)
        if t is not None:
            prop.freeze(t.ids, reason)


def no_channels(prop: Propagation, node: fx.Node) -> None:
    """Ops returning sizes, dtypes or other non-tensors: nothing to track."""
    prop.set(node, [])


def _param_ids(prop: Propagation, arg: Any, dim: int) -> np.ndarray | None:
    t = prop.track_on(arg, dim) if isinstance(arg, fx.Node) else None
    return None if t is None else t.ids
