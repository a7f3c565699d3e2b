"""Channel rules for ops that move, split or join axes: view/reshape, permute, cat, split,
indexing, reductions, padding, expand.

They are shape-driven: each reads the concrete shapes ShapeProp wrote into ``node.meta``. A
size fixed at trace time that a cut would have to change pins the channels it reads.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgery.graph.propagate import Propagation, Track, Tracks
from surgery.graph.rules.registry import BUILTIN
from surgery.graph.rules.tracks import (
    SizeRead,
    merge_tracks,
    node_args,
    pin_size_reads,
    shape_entries,
    size_read,
)


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


@BUILTIN.function("Tensor.view", "Tensor.reshape", torch.reshape)
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
    if len(shape_args) != len(out_shape):  # a shape computed as a whole
        entries = shape_entries(prop, shape_args[0]) if len(shape_args) == 1 else None
        if entries is None or len(entries) != len(out_shape):  # cannot align axes
            pin_size_reads(prop, shape_args, "its size fixes a reshape")
            prop.set(node, out)
            return
        shape_args = entries
        for t in out:
            if t.axes[0] in _literal_dims(entries):
                prop.freeze(t.ids, "reshape to a literal channel count")
    mine = {t.axes[0]: t for t in out}
    for axis, size in enumerate(shape_args):
        if not isinstance(size, (fx.Node, SizeRead)):
            continue
        direct = [(size.tensor, size.axis)] if isinstance(size, SizeRead) else size_read(prop, size)
        if direct is not None and len(direct) == 1 and axis in mine:
            read = prop.track_on(*direct[0])
            if read is not None and len(read.ids) == len(mine[axis].ids):
                prop.union(mine[axis].ids, read.ids)
                continue
        if axis in mine:
            prop.freeze(mine[axis].ids, "reshape to a computed channel count")
        if isinstance(size, SizeRead):
            t = prop.track_on(size.tensor, size.axis)
            if t is not None:
                prop.freeze(t.ids, "its size fixes a reshape")
        else:
            pin_size_reads(prop, size, "its size fixes a reshape")
    prop.set(node, out)


@BUILTIN.function("Tensor.reshape_as", "Tensor.view_as")
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


@BUILTIN.function(torch.stack)
def stack_rule(prop: Propagation, node: fx.Node) -> None:
    """torch.stack: a new axis at ``dim``; the inputs' channels on each other axis are one
    (as in :func:`pointwise`); an input with no ids there pins them."""
    tensors, dim = node_args(node, ("tensors", "dim"))
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


@BUILTIN.function(F.pad)
def pad_rule(prop: Propagation, node: fx.Node) -> None:
    """F.pad: ``pad`` pairs cover the last axes; channels on unpadded axes pass, channels on
    a padded axis are pinned (the new positions belong to no channel)."""
    src, pad = node_args(node, ("input", "pad"))[:2]
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


@BUILTIN.function(torch.flatten, "Tensor.flatten", torch.squeeze, "Tensor.squeeze",
                  torch.unsqueeze, "Tensor.unsqueeze")
def reshape_like_rule(prop: Propagation, node: fx.Node) -> None:
    """flatten/squeeze/unsqueeze: the target shape follows the input, so nothing is pinned."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    prop.set(node, reshape_tracks(prop, prop.get(src), in_shape, out_shape))


@BUILTIN.function("Tensor.unflatten", torch.unflatten)
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


@BUILTIN.function("Tensor.permute", torch.permute)
def permute_rule(prop: Propagation, node: fx.Node) -> None:
    dims = node.args[1:] if node.op == "call_method" else node.args[1]
    if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not dims:
        dims = node.kwargs.get("dims")
    nd = len(prop.shape(node))
    dims = [d % nd for d in dims]
    prop.set(node, [Track((dims.index(t.axes[0]),), t.ids) for t in prop.get(node.args[0])])


@BUILTIN.function("Tensor.transpose", torch.transpose, "Tensor.t", torch.t)
def transpose_rule(prop: Propagation, node: fx.Node) -> None:
    nd = len(prop.shape(node))
    if node.target in ("t",) or node.target is torch.t:
        d0, d1 = 0, 1
    else:
        d0, d1 = (a % nd for a in node_args(node, ("input", "dim0", "dim1"))[1:])
    swap = {d0: d1, d1: d0}
    prop.set(node, [Track((swap.get(t.axes[0], t.axes[0]),), t.ids)
                    for t in prop.get(node.args[0])])


@BUILTIN.function(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                  torch.logsumexp, "Tensor.mean", "Tensor.sum", "Tensor.amax", "Tensor.amin",
                  "Tensor.std", "Tensor.var", "Tensor.logsumexp", "Tensor.norm")
def reduce_rule(prop: Propagation, node: fx.Node) -> None:
    """mean/sum/amax/...: channels on reduced axes collapse into one, others move left."""
    src = node.args[0]
    in_shape, out_shape = prop.shape(src), prop.shape(node)
    if in_shape is None or out_shape is None:
        prop.set(node, [])
        return
    dim, keepdim = node_args(node, ("input", "dim", "keepdim"))[1:]
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


@BUILTIN.function(torch.cat, torch.concat)
def cat_rule(prop: Propagation, node: fx.Node) -> None:
    """Concatenation: ids of the inputs side by side on the cat axis; other axes union. A
    tensor with no ids on another axis (the raw input, a constant) pins that axis's channels,
    as in :func:`pointwise`: its width there would not follow a cut."""
    tensors, dim = node_args(node, ("tensors", "dim"))
    dim = 0 if dim is None else dim
    out_shape = prop.shape(node)
    nd = len(out_shape)
    dim %= nd
    pieces, others = [], []
    for arg in tensors:
        shape = prop.shape(arg)
        tracked = any(t.axes == (dim,) for t in prop.get(arg))
        pieces.append(prop.channel_ids(arg, dim, "concatenated with an untracked tensor")
                      if tracked else _untracked(prop, shape[dim]))
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


@BUILTIN.function(torch.split, torch.chunk, torch.unbind, "Tensor.split", "Tensor.chunk",
                  "Tensor.unbind")
def split_rule(prop: Propagation, node: fx.Node) -> None:
    """split/chunk/unbind: outputs are a tuple. Splitting a channel axis into equal pieces
    (``gate, up = x.chunk(2, -1)``, Phi-3's fused ``gate_up_proj``) makes position ``i`` of
    every piece one channel: cut alike, the pieces stay equal, which is all ``chunk`` (and a
    split into equal sizes) needs. Unequal pieces and ``unbind`` pin the axis, since the split
    sizes are fixed when the graph was traced."""
    src = node.args[0]
    in_shape = prop.shape(src)
    metas = node.meta.get("tensor_meta")
    if in_shape is None or not isinstance(metas, (tuple, list)):
        prop.opaque_op(node, f"{node.target} without shapes")
        return
    name = getattr(node.target, "__name__", node.target)
    if name == "unbind":
        dim = node_args(node, ("input", "dim"))[1] or 0
    elif name == "chunk":
        dim = node_args(node, ("input", "chunks", "dim"))[2] or 0
    else:
        dim = node_args(node, ("input", "split_size_or_sections", "dim"))[2] or 0
    nd = len(in_shape)
    dim %= nd
    sizes = {tuple(meta.shape)[dim] for meta in metas} if name != "unbind" else set()
    outs = []
    for meta in metas:
        shape = tuple(meta.shape)
        tracks = []
        for t in prop.get(src):
            (axis,) = t.axes
            if axis == dim and len(sizes) == 1 and len(t.ids) == len(metas) * min(sizes):
                pieces = t.ids.reshape(len(metas), -1)
                prop.union(pieces, pieces[:1])
                tracks.append(Track((axis,), pieces[0]))
                continue
            if axis == dim:
                prop.freeze(t.ids, f"{name} along a channel axis")
                continue
            new = axis - 1 if (name == "unbind" and axis > dim) else axis
            tracks.append(Track((new,), t.ids))
        outs.append(tracks if len(shape) else [])
    prop.set(node, tuple(outs))


@BUILTIN.function(operator.getitem)
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


@BUILTIN.function("Tensor.expand", "Tensor.expand_as")
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


@BUILTIN.module(nn.Flatten)
def flatten_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    reshape_like_rule(prop, node)
