"""Built-in channel rules for torch operators and torch.nn layers.

Each rule describes how channel ids flow through one op (see :mod:`surgery.propagate`).
They are registered as a built-in plugin through ``surgery_module_rules`` and
``surgery_function_rules``, the same hooks a third-party plugin uses to teach the engine a
new layer. Rules are small and shape-driven: they read concrete shapes from ``node.meta``.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgery.hookspecs import hookimpl
from torch.fx.passes.shape_prop import TensorMetadata

from surgery.graph.propagate import Consume, Propagation, Track, Tracks

# ---------------------------------------------------------------------------------------
# Track algebra shared by the rules
# ---------------------------------------------------------------------------------------


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


def _factor_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes with equal products into runs of dims with equal products."""
    groups = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                gi.append(i)
                i += 1
            else:
                pb *= b[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def reshape_tracks(
    prop: Propagation, tracks: Tracks, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> Tracks:
    """Carry tracks through any view/reshape/flatten/unflatten/squeeze/unsqueeze.

    Dims of size 1 are ignored; the rest split into runs of equal product. The ids of a
    tracked axis are broadcast over its run, reshaped to the output run, and axes along which
    they do not vary are dropped. A channel axis split into several (heads) keeps the first new
    axis and unions the rest, so the cut always removes whole heads."""
    a_idx = [i for i, s in enumerate(in_shape) if s != 1]
    b_idx = [i for i, s in enumerate(out_shape) if s != 1]
    groups = _factor_groups([in_shape[i] for i in a_idx], [out_shape[i] for i in b_idx])
    group_of = {}
    for g, (gi, _) in enumerate(groups):
        for k in gi:
            group_of[a_idx[k]] = g
    out: Tracks = []
    for t in tracks:
        (axis,) = t.axes
        if in_shape[axis] == 1:
            continue
        gi, gj = groups[group_of[axis]]
        in_axes = [a_idx[k] for k in gi]
        block_shape = [in_shape[a] for a in in_axes]
        view = [1] * len(in_axes)
        view[in_axes.index(axis)] = in_shape[axis]
        ids = np.broadcast_to(t.ids.reshape(view), block_shape)
        out_axes = [b_idx[k] for k in gj]
        ids = ids.reshape([out_shape[a] for a in out_axes])
        keep = []
        for pos in range(ids.ndim):
            first = np.take(ids, [0], axis=pos)
            if not np.array_equal(ids, np.broadcast_to(first, ids.shape)):
                keep.append(pos)
        for pos in reversed(range(ids.ndim)):
            if pos not in keep:
                ids = np.take(ids, 0, axis=pos)
        kept_axes = [out_axes[p] for p in keep]
        while ids.ndim > 1:  # a split into heads: whole heads go together
            ids = prop.union_along(ids, ids.ndim - 1)
            kept_axes.pop()
        if ids.ndim == 1:
            out.append(Track((kept_axes[0],), ids))
    return merge_tracks(prop, out)


def _literal_dims(shape_args: list[Any]) -> set[int]:
    """Positions of a view/reshape target given as literal ints (not -1, not traced sizes)."""
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    return {i for i, s in enumerate(shape_args) if isinstance(s, int) and s not in (-1, 1)}


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


def view_rule(prop: Propagation, node: fx.Node) -> None:
    """view/reshape: like :func:`reshape_tracks`; a channel axis whose new size is written as
    a literal int would not adapt after pruning, so its channels are pinned. A size read from
    a tensor (``x.shape[k]``) ties that tensor's axis ``k`` to the output axis: their channels
    are one when both are tracked (so their counts stay equal), pinned otherwise; a size
    computed from several reads (``C // heads``) pins every channel axis it reads and the
    output axis."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    out = reshape_tracks(prop, prop.get(src), in_shape, out_shape)
    shape_args = list(node.args[1:]) or [node.kwargs.get("shape", ())]
    literal = _literal_dims(shape_args)
    for t in out:
        if t.axes[0] in literal:
            prop.freeze(t.ids, "reshape to a literal channel count")
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    if len(shape_args) != len(out_shape):  # a shape computed as a whole: cannot align axes
        pin_size_reads(prop, shape_args, "its size fixes a reshape")
        prop.set(node, out)
        return
    mine = {t.axes[0]: t for t in out}
    for axis, size in enumerate(shape_args):
        if not isinstance(size, fx.Node):
            continue
        direct = _size_read(prop, size)
        if direct is not None and len(direct) == 1 and axis in mine:
            read = prop.track_on(*direct[0])
            if read is not None and len(read.ids) == len(mine[axis].ids):
                prop.union(mine[axis].ids, read.ids)
                continue
        if axis in mine:
            prop.freeze(mine[axis].ids, "reshape to a computed channel count")
        pin_size_reads(prop, size, "its size fixes a reshape")
    prop.set(node, out)


def reshape_as_rule(prop: Propagation, node: fx.Node) -> None:
    """reshape_as/view_as: the new shape is ``other``'s, so each output axis must keep the
    same count as ``other``'s axis: channels on both are one; on one side only, pinned."""
    src, other = node.args[0], node.args[1]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    out = reshape_tracks(prop, prop.get(src), in_shape, out_shape)
    mine = {t.axes[0]: t for t in out}
    theirs = {t.axes[0]: t for t in prop.get(other)}
    for axis in sorted(set(mine) | set(theirs)):
        a, b = mine.get(axis), theirs.get(axis)
        if a is not None and b is not None and len(a.ids) == len(b.ids):
            prop.union(a.ids, b.ids)
            continue
        for t in (a, b):
            if t is not None:
                prop.freeze(t.ids, f"{node.target} of a tensor with other channels")
    prop.set(node, out)


def stack_rule(prop: Propagation, node: fx.Node) -> None:
    """torch.stack: a new axis at ``dim``; the inputs' channels on each other axis are one
    (as in :func:`pointwise`); an input with no ids there pins them."""
    tensors, dim = _node_args(node, ("tensors", "dim"))
    out_shape = prop.shape(node)
    if out_shape is None or not isinstance(tensors, (tuple, list)):
        prop.opaque_op(node, "stack without shapes")
        return
    nd = len(out_shape)
    dim = (dim or 0) % nd

    def moved(t: Track) -> Track:
        return Track((t.axes[0] + (t.axes[0] >= dim),), t.ids)

    merged = merge_tracks(prop, [moved(t) for arg in tensors for t in prop.get(arg)])
    for arg in tensors:
        own = {moved(t).axes for t in prop.get(arg)}
        for t in merged:
            if t.axes not in own and out_shape[t.axes[0]] > 1:
                prop.freeze(t.ids, "stacked with an untracked tensor")
    prop.set(node, merged)


def pad_rule(prop: Propagation, node: fx.Node) -> None:
    """F.pad: ``pad`` pairs cover the last axes; channels on unpadded axes pass, channels on
    a padded axis are pinned (the new positions belong to no channel)."""
    src, pad = _node_args(node, ("input", "pad"))[:2]
    shape = prop.shape(src)
    if shape is None or not isinstance(pad, (tuple, list)):
        prop.opaque_op(node, "pad without shapes")
        return
    nd = len(shape)
    padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
    out = []
    for t in prop.get(src):
        if t.axes[0] in padded:
            prop.freeze(t.ids, "padding along a channel axis")
        else:
            out.append(t)
    prop.set(node, out)


def reshape_like_rule(prop: Propagation, node: fx.Node) -> None:
    """flatten/squeeze/unsqueeze: the target shape follows the input, so nothing is pinned."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    prop.set(node, reshape_tracks(prop, prop.get(src), in_shape, out_shape))


def unflatten_rule(prop: Propagation, node: fx.Node) -> None:
    src = node.args[0]
    out = reshape_tracks(prop, prop.get(src), prop.shape(src), prop.shape(node))
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    nd = len(prop.shape(src))
    dim = dim % nd
    sizes = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
    for t in out:
        if dim <= t.axes[0] < dim + len(sizes):
            prop.freeze(t.ids, "unflatten of a channel axis into literal sizes")
    prop.set(node, out)


def permute_rule(prop: Propagation, node: fx.Node) -> None:
    dims = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims:
        dims = node.kwargs.get("dims")
    nd = len(prop.shape(node))
    dims = [d % nd for d in dims]
    prop.set(node, [Track((dims.index(t.axes[0]),), t.ids) for t in prop.get(node.args[0])])


def transpose_rule(prop: Propagation, node: fx.Node) -> None:
    nd = len(prop.shape(node))
    if node.target in ("t",) or node.target is torch.t:
        d0, d1 = 0, 1
    else:
        d0, d1 = (a % nd for a in _node_args(node, ("input", "dim0", "dim1"))[1:])
    swap = {d0: d1, d1: d0}
    prop.set(node, [Track((swap.get(t.axes[0], t.axes[0]),), t.ids) for t in prop.get(node.args[0])])


def reduce_rule(prop: Propagation, node: fx.Node) -> None:
    """mean/sum/amax/...: channels on reduced axes collapse into one, others move left."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.set(node, [])
        return
    dim, keepdim = _node_args(node, ("input", "dim", "keepdim"))[1:]
    nd = len(in_shape)
    if dim is None:
        dims = set(range(nd))
    else:
        dims = {d % nd for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
    keepdim = bool(keepdim) or len(out_shape) == nd
    out = []
    for t in prop.get(src):
        (axis,) = t.axes
        if axis in dims:
            continue
        new = axis if keepdim else axis - sum(1 for d in dims if d < axis)
        out.append(Track((new,), t.ids))
    prop.set(node, out)


def cat_rule(prop: Propagation, node: fx.Node) -> None:
    """Concatenation: ids of the inputs side by side on the cat axis; other axes union. A
    tensor with no ids on another axis (the raw input, a constant) pins that axis's channels,
    as in :func:`pointwise`: its width there would not follow a cut."""
    tensors, dim = _node_args(node, ("tensors", "dim"))
    dim = 0 if dim is None else dim
    out_shape = prop.shape(node)
    nd = len(out_shape)
    dim %= nd
    pieces, others = [], []
    for arg in tensors:
        shape = prop.shape(arg)
        pieces.append(prop.channel_ids(arg, dim, "concatenated with an untracked tensor")
                      if any(t.axes == (dim,) for t in prop.get(arg)) else _untracked(prop, shape[dim]))
        others.extend(t for t in prop.get(arg) if t.axes != (dim,))
    cat_ids = np.concatenate(pieces)
    others = merge_tracks(prop, others)
    for arg in tensors:
        shape = prop.shape(arg)
        own = {t.axes for t in prop.get(arg)}
        for t in others:
            if shape is not None and t.axes not in own and shape[t.axes[0]] > 1:
                prop.freeze(t.ids, "concatenated with an untracked tensor")
    prop.set(node, merge_tracks(prop, others + [Track((dim,), cat_ids)]))


def _untracked(prop: Propagation, size: int) -> np.ndarray:
    ids = prop.fresh(size)
    prop.freeze(ids, "concatenated with an untracked tensor")
    return ids


def split_rule(prop: Propagation, node: fx.Node) -> None:
    """split/chunk/unbind: outputs are a tuple; splitting a channel axis pins it, since the
    split sizes are fixed when the graph was traced."""
    src = node.args[0]
    in_shape = prop.shape(src)
    metas = node.meta.get("tensor_meta")
    if in_shape is None or not isinstance(metas, (tuple, list)):
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    name = getattr(node.target, "__name__", node.target)
    if name == "unbind":
        dim = _node_args(node, ("input", "dim"))[1] or 0
    elif name == "chunk":
        dim = _node_args(node, ("input", "chunks", "dim"))[2] or 0
    else:
        dim = _node_args(node, ("input", "split_size_or_sections", "dim"))[2] or 0
    nd = len(in_shape)
    dim %= nd
    outs = []
    for meta in metas:
        shape = tuple(meta.shape)
        tracks = []
        for t in prop.get(src):
            (axis,) = t.axes
            if axis == dim:
                prop.freeze(t.ids, f"{name} along a channel axis")
                continue
            new = axis - 1 if (name == "unbind" and axis > dim) else axis
            tracks.append(Track((new,), t.ids))
        outs.append(tracks if len(shape) else [])
    prop.set(node, tuple(outs))


def getitem_rule(prop: Propagation, node: fx.Node) -> None:
    src, index = node.args
    value = prop.tracks.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(value, tuple):
        prop.set(node, value[index] if isinstance(index, (int, slice)) else [])
        return
    in_shape = prop.shape(src)
    if in_shape is None or prop.shape(node) is None:
        prop.set(node, [])
        return
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
        prop.opaque_op(node, "advanced indexing")
        return
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = len(in_shape) - (len([i for i in items if i is not None]) - 1)
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    items += [slice(None)] * (len(in_shape) - len([i for i in items if i is not None]))
    mapping: dict[int, int] = {}
    src_axis = out_axis = 0
    for item in items:
        if item is None:
            out_axis += 1
            continue
        if isinstance(item, int):
            mapping[src_axis] = -1
        elif any(isinstance(b, fx.Node) for b in (item.start, item.stop, item.step)):
            pin_size_reads(prop, item, "its size fixes a slice")  # x[:, :H]: computed bounds
            mapping[src_axis] = -2
            out_axis += 1
        else:
            full = item == slice(None) or (
                item.step in (None, 1)
                and (item.start in (None, 0))
                and (item.stop is None or item.stop >= in_shape[src_axis])
            )
            mapping[src_axis] = out_axis if full else -2
            out_axis += 1
        src_axis += 1
    out = []
    for t in prop.get(src):
        (axis,) = t.axes
        target = mapping.get(axis, axis)
        if target < 0:
            prop.freeze(t.ids, "indexing into a channel axis")
            continue
        out.append(Track((target,), t.ids))
    prop.set(node, out)


def expand_rule(prop: Propagation, node: fx.Node) -> None:
    """expand / expand_as: tracks move right by the new leading axes; an axis broadcast from
    size 1 (a class token expanded over the batch) repeats one value, so its id is dropped."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    off = len(out_shape) - len(in_shape)
    prop.set(node, [Track((t.axes[0] + off,), t.ids) for t in prop.get(src)
                    if in_shape[t.axes[0]] == out_shape[t.axes[0] + off]])


def no_channels(prop: Propagation, node: fx.Node) -> None:
    """Ops returning sizes, dtypes or other non-tensors: nothing to track."""
    prop.set(node, [])


# ---------------------------------------------------------------------------------------
# Layers with weights
# ---------------------------------------------------------------------------------------


def _param_ids(prop: Propagation, arg: Any, dim: int) -> np.ndarray | None:
    t = prop.track_on(arg, dim) if isinstance(arg, fx.Node) else None
    return None if t is None else t.ids


def conv(
    prop: Propagation,
    node: fx.Node,
    x: Any,
    w_out: np.ndarray,
    w_in: np.ndarray | None,
    biases: list[np.ndarray],
    groups: int,
) -> None:
    """Convolution: output channels are the weight's dim 0; inputs meet dim 1. A grouped conv
    couples each input group with its output group, so it loses whole groups (a depthwise
    conv: channel i in with channel i out)."""
    in_ids = prop.channel_ids(x, 1, "input of a conv")
    for b in biases:
        prop.union(b, w_out)
    if groups == 1:
        if w_in is not None:
            prop.union(in_ids, w_in)
        prop.mac_factors[node.name] = [w_out, in_ids]
    else:
        ipg, opg = len(in_ids) // groups, len(w_out) // groups
        for j in range(groups):
            block = np.concatenate([in_ids[j * ipg:(j + 1) * ipg], w_out[j * opg:(j + 1) * opg]])
            prop.union(block, block[:1])
        prop.mac_factors[node.name] = [w_out]
    prop.consumes.append(Consume(node.name, x.name, Track((1,), in_ids)))
    prop.produces[node.name] = w_out
    prop.set(node, [Track((1,), w_out)])


def conv_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    name = node.target
    biases = [prop.param(f"{name}.bias", 0)] if module.bias is not None else []
    w_in = prop.param(f"{name}.weight", 1) if module.groups == 1 else None
    conv(prop, node, node.args[0], prop.param(f"{name}.weight", 0), w_in, biases, module.groups)


def conv_function(prop: Propagation, node: fx.Node) -> None:
    x, w, b, _, _, _, groups = _node_args(
        node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    )
    groups = groups or 1
    w_out = _param_ids(prop, w, 0)
    if w_out is None:
        prop.opaque_op(node, "conv with a computed weight")
        return
    if not isinstance(groups, int):  # groups=x.shape[1]: the axis it reads is pinned
        pin_size_reads(prop, groups, "its size fixes a conv's groups")
        groups = prop.shape(x)[1] // prop.shape(w)[1]
    elif groups > 1:  # a literal group count (F.conv2d(x, w, groups=self.channels)) stays
        prop.freeze(w_out, "conv with a literal group count")
        prop.freeze(prop.channel_ids(x, 1, "input of a conv"), "conv with a literal group count")
    b_ids = _param_ids(prop, b, 0)
    conv(prop, node, x, w_out, _param_ids(prop, w, 1) if groups == 1 else None,
         [b_ids] if b_ids is not None else [], groups)


def linear(prop: Propagation, node: fx.Node, x: Any, w_out: np.ndarray, w_in: np.ndarray,
           biases: list[np.ndarray]) -> None:
    """Linear: reads the last axis, writes the weight's dim 0 there; other axes pass."""
    in_ids = prop.channel_ids(x, -1, "input of a linear layer")
    prop.union(in_ids, w_in)
    for b in biases:
        prop.union(b, w_out)
    nd = len(prop.shape(x))
    keep = [t for t in prop.get(x) if t.axes != (nd - 1,)]
    prop.consumes.append(Consume(node.name, x.name, Track((nd - 1,), in_ids)))
    prop.produces[node.name] = w_out
    prop.mac_factors[node.name] = [w_out, in_ids]
    prop.set(node, keep + [Track((nd - 1,), w_out)])


def linear_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    name = node.target
    biases = [prop.param(f"{name}.bias", 0)] if module.bias is not None else []
    linear(prop, node, node.args[0], prop.param(f"{name}.weight", 0),
           prop.param(f"{name}.weight", 1), biases)


def linear_function(prop: Propagation, node: fx.Node) -> None:
    x, w, b = _node_args(node, ("input", "weight", "bias"))
    w_out, w_in = _param_ids(prop, w, 0), _param_ids(prop, w, 1)
    if w_out is None or w_in is None:
        prop.opaque_op(node, "linear with a computed weight")
        return
    b_ids = _param_ids(prop, b, 0)
    linear(prop, node, x, w_out, w_in, [b_ids] if b_ids is not None else [])


def per_channel(prop: Propagation, node: fx.Node, x: Any, axis: int,
                params: list[np.ndarray]) -> None:
    """Norm-like layers with one parameter entry per channel on ``axis``."""
    if params:
        ids = prop.channel_ids(x, axis, "normalised input")
        for p in params:
            prop.union(p, ids)
    prop.set(node, list(prop.get(x)))


def batch_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    names = [n for n in ("weight", "bias", "running_mean", "running_var")
             if getattr(module, n, None) is not None]
    per_channel(prop, node, node.args[0], 1, [prop.param(f"{node.target}.{n}", 0) for n in names])


def batch_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, rm, rv, w, b = _node_args(node, ("input", "running_mean", "running_var", "weight", "bias"))
    ids = [i for i in (_param_ids(prop, a, 0) for a in (rm, rv, w, b)) if i is not None]
    per_channel(prop, node, x, 1, ids)


def layer_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    params = [prop.param(f"{node.target}.{n}", 0) for n in ("weight", "bias")
              if getattr(module, n, None) is not None]
    _layer_norm(prop, node, node.args[0], len(module.normalized_shape), params)


def layer_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, shape, w, b = _node_args(node, ("input", "normalized_shape", "weight", "bias"))
    params = [i for i in (_param_ids(prop, a, 0) for a in (w, b)) if i is not None]
    _layer_norm(prop, node, x, len(shape), params)


def _layer_norm(prop: Propagation, node: fx.Node, x: Any, k: int, params: list[np.ndarray]) -> None:
    if k != 1:
        prop.opaque_op(node, "layer_norm over several axes")
        return
    per_channel(prop, node, x, -1, params)


def group_norm(prop: Propagation, node: fx.Node, x: Any, groups: int,
               params: list[np.ndarray]) -> None:
    """GroupNorm: statistics are per group, so a group's channels go together."""
    ids = prop.channel_ids(x, 1, "input of group norm")
    per = len(ids) // groups
    for j in range(groups):
        prop.union(ids[j * per:(j + 1) * per], ids[j * per])
    per_channel(prop, node, x, 1, params)


def group_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    params = [prop.param(f"{node.target}.{n}", 0) for n in ("weight", "bias")
              if getattr(module, n, None) is not None]
    group_norm(prop, node, node.args[0], module.num_groups, params)


def group_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, groups, w, b = _node_args(node, ("input", "num_groups", "weight", "bias"))
    params = [i for i in (_param_ids(prop, a, 0) for a in (w, b)) if i is not None]
    group_norm(prop, node, x, groups, params)


def embedding(prop: Propagation, node: fx.Node, dim_ids: np.ndarray) -> None:
    nd = len(prop.shape(node))
    prop.produces[node.name] = dim_ids
    prop.set(node, [Track((nd - 1,), dim_ids)])


def embedding_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    embedding(prop, node, prop.param(f"{node.target}.weight", 1))


def embedding_function(prop: Propagation, node: fx.Node) -> None:
    _, w = _node_args(node, ("input", "weight"))
    ids = _param_ids(prop, w, 1)
    if ids is None:
        prop.opaque_op(node, "embedding with a computed weight")
        return
    embedding(prop, node, ids)


def _contract(prop: Propagation, a: Any, b: Any, a_axis: int, b_axis: int) -> np.ndarray | None:
    """Channels summed over by a product: both sides' ids on that axis are one."""
    ta, tb = prop.track_on(a, a_axis), prop.track_on(b, b_axis)
    if ta is not None and tb is not None:
        prop.union(ta.ids, tb.ids)
        return ta.ids
    for t in (ta, tb):
        if t is not None:
            prop.freeze(t.ids, "contracted against an untracked tensor")
            return t.ids
    return None


def _batch_tracks(prop: Propagation, args: list[Any], out_nd: int, skip_last: int = 2) -> Tracks:
    """Leading (batch/head) axes of matmul-like operands, aligned from the right."""
    placed = []
    for arg in args:
        nd = len(prop.shape(arg))
        off = out_nd - nd
        for t in prop.get(arg):
            (axis,) = t.axes
            if axis < nd - skip_last and prop.shape(arg)[axis] > 1:
                placed.append(Track((axis + off,), t.ids))
    return merge_tracks(prop, placed)


def matmul_rule(prop: Propagation, node: fx.Node) -> None:
    a, b = node.args[0], node.args[1]
    sa, sb, so = prop.shape(a), prop.shape(b), prop.shape(node)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        prop.opaque_op(node, "matmul of vectors")
        return
    k = _contract(prop, a, b, -1, -2)
    nd = len(so)
    out = _batch_tracks(prop, [a, b], nd)
    ta_n, tb_m = prop.track_on(a, -2), prop.track_on(b, -1)
    if ta_n is not None:
        out.append(Track((nd - 2,), ta_n.ids))
    if tb_m is not None:
        out.append(Track((nd - 1,), tb_m.ids))
    prop.mac_factors[node.name] = [t.ids for t in out] + ([k] if k is not None else [])
    is_weight = [isinstance(x, fx.Node) and x.op == "get_attr" for x in (a, b)]
    if is_weight[1] and tb_m is not None and k is not None:
        prop.consumes.append(Consume(node.name, a.name, Track((len(sa) - 1,), k)))
        prop.produces[node.name] = tb_m.ids
    prop.set(node, merge_tracks(prop, out))


def sdpa_rule(prop: Propagation, node: fx.Node) -> None:
    """scaled_dot_product_attention: q and k meet on the head dim; heads of q, k, v are one."""
    q, k, v = node.args[:3]
    nd = len(prop.shape(node))
    e = _contract(prop, q, k, -1, -1)
    out = _batch_tracks(prop, [q, k, v], nd)
    tq = prop.track_on(q, -2)
    if tq is not None:
        out.append(Track((nd - 2,), tq.ids))
    tv = prop.track_on(v, -1)
    if tv is not None:
        out.append(Track((nd - 1,), tv.ids))
    prop.mac_factors[node.name] = [t.ids for t in out] + ([e] if e is not None else [])
    prop.set(node, merge_tracks(prop, out))


# ---------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax, nn.Tanhshrink,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)


def _module_pointwise(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    pointwise(prop, node, [node.args[0]])


def _module_pool(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    keep_leading_axes(prop, node)


def _module_flatten(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    reshape_like_rule(prop, node)


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    rules: dict[type, Callable] = {
        nn.Conv1d: conv_module, nn.Conv2d: conv_module, nn.Conv3d: conv_module,
        nn.Linear: linear_module,
        nn.BatchNorm1d: batch_norm_module, nn.BatchNorm2d: batch_norm_module,
        nn.BatchNorm3d: batch_norm_module, nn.InstanceNorm1d: batch_norm_module,
        nn.InstanceNorm2d: batch_norm_module, nn.InstanceNorm3d: batch_norm_module,
        nn.LayerNorm: layer_norm_module, nn.GroupNorm: group_norm_module,
        nn.Embedding: embedding_module, nn.Flatten: _module_flatten,
    }
    rules.update({t: _module_pointwise for t in _POINTWISE_MODULES})
    rules.update({t: _module_pool for t in _POOL_MODULES})
    return rules


def _unary(prop: Propagation, node: fx.Node) -> None:
    pointwise(prop, node, [node.args[0]])


def _first_arg(prop: Propagation, node: fx.Node) -> None:
    passthrough(prop, node)


_POINTWISE_FUNCTIONS: list[Any] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum,
    "Tensor.add", "Tensor.sub", "Tensor.mul", "Tensor.div", "Tensor.add_", "Tensor.mul_",
    "Tensor.sub_", "Tensor.div_", "Tensor.masked_fill", "Tensor.where",
]
_UNARY_FUNCTIONS: list[Any] = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, F.hardtanh, F.softmax, F.log_softmax,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
    torch.softmax, torch.clamp, torch.erf, torch.pow, operator.neg, operator.pow,
    "Tensor.relu", "Tensor.sigmoid", "Tensor.tanh", "Tensor.exp", "Tensor.sqrt",
    "Tensor.rsqrt", "Tensor.pow", "Tensor.clamp", "Tensor.clamp_min", "Tensor.clamp_max",
    "Tensor.softmax", "Tensor.abs", "Tensor.neg", "Tensor.relu_", "Tensor.sigmoid_",
    "Tensor.erf",
]
_FIRST_ARG_FUNCTIONS: list[Any] = [
    "Tensor.to", "Tensor.type_as", "Tensor.float", "Tensor.half", "Tensor.bfloat16",
    "Tensor.contiguous", "Tensor.clone", "Tensor.detach", "Tensor.type", "Tensor.double",
]
_REDUCE_FUNCTIONS: list[Any] = [
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    "Tensor.mean", "Tensor.sum", "Tensor.amax", "Tensor.amin", "Tensor.std", "Tensor.var",
    "Tensor.logsumexp", "Tensor.norm",
]
_NO_CHANNELS: list[Any] = [
    builtins.getattr, "Tensor.size", "Tensor.dim", "Tensor.numel", "Tensor.ndimension",
    torch._assert, operator.eq, operator.ne, operator.lt, operator.gt, operator.floordiv,
    math.sqrt,
]


@hookimpl
def surgery_function_rules() -> dict[Any, Callable]:
    rules: dict[Any, Callable] = {}
    rules.update({f: pointwise for f in _POINTWISE_FUNCTIONS})
    rules[operator.add] = add_rule
    rules.update({f: _unary for f in _UNARY_FUNCTIONS})
    rules.update({f: _first_arg for f in _FIRST_ARG_FUNCTIONS})
    rules.update({f: reduce_rule for f in _REDUCE_FUNCTIONS})
    rules.update({f: no_channels for f in _NO_CHANNELS})
    rules.update({
        F.conv1d: conv_function, F.conv2d: conv_function, F.conv3d: conv_function,
        F.linear: linear_function, F.batch_norm: batch_norm_function,
        F.layer_norm: layer_norm_function, F.group_norm: group_norm_function,
        F.embedding: embedding_function,
        torch.cat: cat_rule, torch.concat: cat_rule,
        torch.split: split_rule, torch.chunk: split_rule, torch.unbind: split_rule,
        "Tensor.split": split_rule, "Tensor.chunk": split_rule, "Tensor.unbind": split_rule,
        operator.getitem: getitem_rule,
        "Tensor.view": view_rule, "Tensor.reshape": view_rule, torch.reshape: view_rule,
        "Tensor.reshape_as": reshape_as_rule, "Tensor.view_as": reshape_as_rule,
        torch.stack: stack_rule, F.pad: pad_rule,
        torch.flatten: reshape_like_rule, "Tensor.flatten": reshape_like_rule,
        torch.squeeze: reshape_like_rule, "Tensor.squeeze": reshape_like_rule,
        torch.unsqueeze: reshape_like_rule, "Tensor.unsqueeze": reshape_like_rule,
        "Tensor.unflatten": unflatten_rule, torch.unflatten: unflatten_rule,
        "Tensor.permute": permute_rule, torch.permute: permute_rule,
        "Tensor.transpose": transpose_rule, torch.transpose: transpose_rule,
        "Tensor.t": transpose_rule, torch.t: transpose_rule,
        "Tensor.expand": expand_rule, "Tensor.expand_as": expand_rule,
        torch.matmul: matmul_rule, operator.matmul: matmul_rule, torch.bmm: matmul_rule,
        "Tensor.matmul": matmul_rule,
        F.scaled_dot_product_attention: sdpa_rule,
        F.adaptive_avg_pool2d: keep_leading_axes, F.adaptive_max_pool2d: keep_leading_axes,
        F.avg_pool2d: keep_leading_axes, F.max_pool2d: keep_leading_axes,
        F.adaptive_avg_pool1d: keep_leading_axes, F.avg_pool1d: keep_leading_axes,
        F.max_pool1d: keep_leading_axes, F.interpolate: keep_leading_axes,
    })
    return rules
