"""Channel rules for products of activations: matmul and scaled dot-product attention.

Contracted axes are one channel space; head (batch) axes of q, k and v are one.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from surgery.graph.propagate import Consume, Propagation, Track, Tracks
from surgery.graph.rules.registry import BUILTIN
from surgery.graph.rules.tracks import merge_tracks


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


@BUILTIN.function(torch.matmul, operator.matmul, torch.bmm, "Tensor.matmul")
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


@BUILTIN.function(F.scaled_dot_product_attention)
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
