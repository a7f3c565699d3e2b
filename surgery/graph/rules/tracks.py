"""Track algebra shared by the channel rules, and the rules of elementwise, pooling and size ops.

A rule reads the channel tracks of a node's inputs from a
:class:`~surgery.graph.propagate.Propagation` and sets the node's output tracks; the helpers
here (merging tracks, elementwise broadcasting, reading arguments, pinning sizes read at trace
time) are what most rules, the built-in ones and plugins', are built from.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from surgery.graph.propagate import Propagation, Track, Tracks
from surgery.graph.rules.registry import BUILTIN

POINTWISE_FUNCTIONS: list[Any] = [
    operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum,
    "Tensor.add", "Tensor.sub", "Tensor.mul", "Tensor.div", "Tensor.add_", "Tensor.mul_",
    "Tensor.sub_", "Tensor.div_", "Tensor.masked_fill", "Tensor.where",
]
UNARY_FUNCTIONS: list[Any] = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, F.hardtanh, F.softmax, F.log_softmax,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
    torch.softmax, torch.clamp, torch.erf, torch.pow, operator.neg, operator.pow,
    "Tensor.relu", "Tensor.sigmoid", "Tensor.tanh", "Tensor.exp", "Tensor.sqrt",
    "Tensor.rsqrt", "Tensor.pow", "Tensor.clamp", "Tensor.clamp_min", "Tensor.clamp_max",
    "Tensor.softmax", "Tensor.abs", "Tensor.neg", "Tensor.relu_", "Tensor.sigmoid_",
    "Tensor.erf",
]
POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax, nn.Tanhshrink,
)
SAME_CHANNEL_METHODS: list[Any] = [
    "Tensor.to", "Tensor.type_as", "Tensor.float", "Tensor.half", "Tensor.bfloat16",
    "Tensor.contiguous", "Tensor.clone", "Tensor.detach", "Tensor.type", "Tensor.double",
]
POOL_FUNCTIONS: list[Any] = [
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
    F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d, F.interpolate,
]
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)
NO_CHANNEL_FUNCTIONS: list[Any] = [
    builtins.getattr, "Tensor.size", "Tensor.dim", "Tensor.numel", "Tensor.ndimension",
    torch._assert, operator.eq, operator.ne, operator.lt, operator.gt, operator.floordiv,
    math.sqrt,
]


def node_args(node: fx.Node, names: tuple[str, ...]) -> list[Any]:
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


@BUILTIN.function(*POINTWISE_FUNCTIONS)
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


@BUILTIN.function(operator.add)
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


@BUILTIN.function(*POOL_FUNCTIONS)
def keep_leading_axes(prop: Propagation, node: fx.Node, count: int = 2) -> None:
    """Pooling / resizing: channels on the first ``count`` axes survive, others are resampled."""
    src = node.args[0]
    prop.set(node, [t for t in prop.get(src) if all(a < count for a in t.axes)])


def size_read(prop: Propagation, node: fx.Node) -> list[tuple[fx.Node, int]] | None:
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


def size_reads(prop: Propagation, arg: Any) -> list[tuple[fx.Node, int]]:
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
        read = size_read(prop, item)
        if read is not None:
            out.extend(read)
        else:
            stack.extend(item.all_input_nodes)
    return out


def pin_size_reads(prop: Propagation, arg: Any, reason: str) -> None:
    """Channels on every axis ``arg``'s sizes were read from are pinned: a size computed at
    trace time from a channel axis would not follow a cut (``reshape(B, N, C)`` with ``C``
    read from the residual stream, applied to an attention output)."""
    for tensor, axis in size_reads(prop, arg):
        t = prop.track_on(tensor, axis)
        if t is not None:
            prop.freeze(t.ids, reason)


@dataclass(frozen=True)
class SizeRead:
    """One entry of a shape computed as a whole: the size of ``tensor``'s axis ``axis``."""

    tensor: fx.Node
    axis: int


def shape_entries(prop: Propagation, arg: Any) -> list[Any] | None:
    """A shape computed as a whole, entry by entry: ints, scalar size nodes, and
    :class:`SizeRead` for sizes taken from a whole shape (``x.view(y.shape)``,
    ``(-1,) + shape[1:] + (h.size(-1),)``, GPT-2 and OPT); None when it cannot be followed."""
    if isinstance(arg, (tuple, list)):
        out: list[Any] = []
        for item in arg:
            if isinstance(item, fx.Node) and not _is_sequence(item):
                out.append(item)
            else:
                sub = shape_entries(prop, item) if isinstance(item, (fx.Node, tuple, list)) \
                    else [item]
                if sub is None:
                    return None
                out.extend(sub)
        return out
    if not isinstance(arg, fx.Node) or not _is_sequence(arg):
        return None
    if arg.op == "call_function" and arg.target is operator.add and len(arg.args) == 2:
        left, right = (shape_entries(prop, a) for a in arg.args)
        return None if left is None or right is None else left + right
    read = size_read(prop, arg)
    return None if read is None else [SizeRead(t, a) for t, a in read]


def _is_sequence(node: fx.Node) -> bool:
    kind = node.meta.get("type")
    return isinstance(kind, type) and issubclass(kind, (tuple, list))


@BUILTIN.function(*NO_CHANNEL_FUNCTIONS)
def no_channels(prop: Propagation, node: fx.Node) -> None:
    """Ops returning sizes, dtypes or other non-tensors: nothing to track."""
    prop.set(node, [])


def param_ids(prop: Propagation, arg: Any, dim: int) -> np.ndarray | None:
    t = prop.track_on(arg, dim) if isinstance(arg, fx.Node) else None
    return None if t is None else t.ids


@BUILTIN.function(*UNARY_FUNCTIONS)
def unary(prop: Propagation, node: fx.Node) -> None:
    """A function of one tensor applied elementwise: the channels pass."""
    pointwise(prop, node, [node.args[0]])


@BUILTIN.function(*SAME_CHANNEL_METHODS)
def same_channels(prop: Propagation, node: fx.Node) -> None:
    """Casts and copies: the output has the input's channels."""
    passthrough(prop, node)


@BUILTIN.module(*POINTWISE_MODULES)
def pointwise_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    pointwise(prop, node, [node.args[0]])


@BUILTIN.module(*POOL_MODULES)
def pool_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    keep_leading_axes(prop, node)
