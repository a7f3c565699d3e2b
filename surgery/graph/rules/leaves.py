"""Rules for modules kept whole as fx leaves whose layout is known: multi-head attention and
embeddings.

fx cannot trace the attention modules of current Hugging Face and timm models well: their
forwards unpack traced shapes (``(*input_shape, -1, head_dim)``), dispatch through attention
registries with data-dependent checks, and reshape the fused ``qkv`` projection with the head
count as a literal int, which the engine would have to pin. So plugins keep each attention
module as one fx leaf and describe it with :func:`attention_rule`, built from a
:class:`HeadLayout` naming where the module keeps its projections:

* every input column of q, k, v (and of a fused qkv) reads the hidden channels coming in;
* the rows of one head in q, k and v, plus any per-head output norm/gate rows and the input
  columns of an output projection inside the module, are one atom: a head is removed whole, so
  every kept head keeps its size and the attention arithmetic stays the same;
* the module's output carries either the value rows (head layout; the model's own output
  projection reads them) or its internal output projection's rows.

Embedding modules (token, position and type tables, patch convolutions, class tokens, learned
position tables) are leaves too, described by :func:`embeddings_rule`: every table's width is
one residual-stream channel. After slicing, :func:`fix_attention` recomputes the head count
(and the products of it) from the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from surgery.graph.propagate import Consume, Propagation, Track


@dataclass(frozen=True)
class HeadLayout:
    """Where a multi-head attention module keeps its projections (child module names).

    Either ``q``/``k``/``v`` (separate projections, rows ``[heads, head_dim]``) or ``qkv`` (one
    fused projection, rows ``[3, heads, head_dim]``). ``out`` is an output projection *inside*
    the module (its input columns are per head), or None when the model applies it outside.
    ``heads``/``head_dim`` name the attributes holding the head count and size; ``products``
    name attributes equal to ``heads * head_dim`` and ``hidden`` attributes equal to the input
    width, both recomputed after slicing. ``per_head_rows`` are child modules whose parameters'
    dim 0 is laid out like the value rows (an output norm or gate)."""

    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    out: str | None = None
    heads: str = "num_attention_heads"
    head_dim: str = "attention_head_size"
    products: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    per_head_rows: tuple[str, ...] = ()

    def first_projection(self) -> str:
        return self.qkv or self.q  # type: ignore[return-value]


def _linear(module: nn.Module, name: str | None) -> nn.Linear | None:
    if name is None:
        return None
    sub = getattr(module, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def matches(module: nn.Module, layout: HeadLayout, sizes: bool = True) -> bool:
    """Whether ``module`` is an attention module with ``layout``, judged from the module alone.

    Structure: the children and integer attributes ``layout`` names, q/k/v projections of as
    many rows each, a multiple of ``head_dim`` (a fused qkv: of ``3 * head_dim``), and an
    inside output projection reading exactly the value rows. This holds before and after
    heads are cut, so fix-ups recognise a pruned module in a process that never traced it.
    With ``sizes``, the rows must also be ``heads * head_dim``: the module is consistent, as
    the channel rule needs (it reshapes the rows into its head count); a sliced module is
    consistent only once :func:`fix_attention` has run."""
    names = [layout.qkv] if layout.qkv else [layout.q, layout.k, layout.v]
    projections = [_linear(module, n) for n in names]
    if any(p is None for p in projections):
        return False
    out = _linear(module, layout.out)
    if layout.out and out is None:
        return False
    heads, dim = (getattr(module, a, None) for a in (layout.heads, layout.head_dim))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (heads, dim)):
        return False
    rows = {p.out_features for p in projections}  # type: ignore[union-attr]
    per_head = dim * (3 if layout.qkv else 1)
    if len(rows) != 1 or next(iter(rows)) % per_head:
        return False
    value_rows = next(iter(rows)) // (3 if layout.qkv else 1)
    if out is not None and out.in_features != value_rows:
        return False
    return not sizes or value_rows == heads * dim


# ---------------------------------------------------------------------------------------
# Channel rules
# ---------------------------------------------------------------------------------------


def _hidden_input(node: fx.Node, names: Iterable[str] = ("hidden_states", "x")) -> Any:
    if node.args:
        return node.args[0]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return next(iter(node.kwargs.values()), None)


def _projection(prop: Propagation, module: nn.Module, prefix: str, name: str,
                in_ids: np.ndarray) -> np.ndarray:
    """Union a linear child's input columns with ``in_ids``; return its row ids."""
    full = f"{prefix}.{name}"
    rows = prop.param(f"{full}.weight", 0)
    prop.union(prop.param(f"{full}.weight", 1), in_ids)
    if getattr(module, name).bias is not None:
        prop.union(prop.param(f"{full}.bias", 0), rows)
    return rows


def _freeze_other_tracks(prop: Propagation, arg: Any, keep_axis: int | None, reason: str,
                         heads: np.ndarray | None = None) -> None:
    """Tracks of a leaf's input the leaf does not pass on are pinned (like an unknown op), except
    a per-head axis (axis 1 of a 4-d bias such as MPNet's relative position bias), which joins
    the heads."""
    shape = prop.shape(arg)
    if shape is None:
        return
    for t in prop.get(arg):
        (axis,) = t.axes if len(t.axes) == 1 else (None,)
        if keep_axis is not None and axis == keep_axis % len(shape):
            continue
        if heads is not None and len(shape) == 4 and axis == 1 and shape[1] == len(heads):
            prop.union(t.ids, heads)
            continue
        prop.freeze(t.ids, reason)


def attention_rule(layout: HeadLayout) -> Callable[[Propagation, fx.Node, nn.Module], None]:
    """The channel rule of an attention leaf with ``layout``; see the module docstring."""

    def rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
        x = _hidden_input(node)
        shape = prop.shape(x)
        if shape is None:
            prop.opaque_op(node, f"attention {node.target} without shapes")
            return
        nd = len(shape)
        in_ids = prop.channel_ids(x, -1, "input of attention")
        n_heads = int(getattr(module, layout.heads))
        head_dim = int(getattr(module, layout.head_dim))
        heads = prop.fresh(n_heads)
        prefix = node.target
        if layout.qkv:
            rows = _projection(prop, module, prefix, layout.qkv, in_ids)
            rows = rows.reshape(3, n_heads, head_dim)
            prop.union(rows, heads[None, :, None])
            value_rows = rows[2].reshape(-1)
        else:
            value_rows = None
            for name in (layout.q, layout.k, layout.v):
                rows = _projection(prop, module, prefix, name, in_ids).reshape(n_heads, head_dim)
                prop.union(rows, heads[:, None])
                value_rows = rows.reshape(-1)
        for name in layout.per_head_rows:
            sub = getattr(module, name, None)
            if sub is None:
                continue
            for pname, p in sub.named_parameters(recurse=False):
                if p.ndim and p.shape[0] == n_heads * head_dim:
                    ids = prop.param(f"{prefix}.{name}.{pname}", 0).reshape(n_heads, head_dim)
                    prop.union(ids, heads[:, None])
        out_ids = value_rows
        if layout.out:
            full = f"{prefix}.{layout.out}"
            cols = prop.param(f"{full}.weight", 1)
            prop.union(cols.reshape(n_heads, head_dim), heads[:, None])
            out_ids = prop.param(f"{full}.weight", 0)
            if getattr(module, layout.out).bias is not None:
                prop.union(prop.param(f"{full}.bias", 0), out_ids)
        _freeze_other_tracks(prop, x, -1, f"token axis through attention {prefix}")
        for arg in node.all_input_nodes:
            if arg is not x:
                _freeze_other_tracks(prop, arg, None, f"extra input of attention {prefix}", heads)
        prop.consumes.append(Consume(node.name, x.name, Track((nd - 1,), in_ids)))
        if layout.out:  # the heads are read inside: observe the output projection's input
            prop.consumes.append(Consume(node.name, node.name, Track((nd - 1,), cols),
                                         module=f"{prefix}.{layout.out}"))
        prop.produces[node.name] = out_ids
        prop.mac_factors[node.name] = [in_ids, value_rows]
        prop.internal.append(heads)
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
            outs: list[Any] = []
            for i, m in enumerate(meta):
                if i == 0:
                    outs.append([Track((nd - 1,), out_ids)])
                elif hasattr(m, "shape") and len(m.shape) == 4 and m.shape[1] == n_heads:
                    outs.append([Track((1,), heads)])  # attention probabilities, per head
                else:
                    outs.append([])
            prop.set(node, tuple(outs))
        else:
            prop.set(node, [Track((nd - 1,), out_ids)])

    return rule


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def embeddings_rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    """An embeddings leaf: the sum (or concatenation along tokens) of tables whose width is the
    model's hidden size, optionally normalised. Every such width is one residual channel:
    ``nn.Embedding`` columns, patch-convolution output channels, the last dim of directly held
    parameters (class/distillation tokens, learned position tables), norm parameters."""
    out_shape = prop.shape(node)
    if out_shape is None:
        prop.opaque_op(node, f"embeddings {node.target} without shapes")
        return
    width = out_shape[-1]
    nd = len(out_shape)
    joined: list[np.ndarray] = []
    prefix = node.target
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(sub, nn.Embedding) and sub.embedding_dim == width:
            joined.append(prop.param(f"{full}.weight", 1))
        elif isinstance(sub, _NORMS) and getattr(sub, "weight", None) is not None \
                and sub.weight.shape[0] == width:
            joined.extend(prop.param(f"{full}.{p}", 0) for p in ("weight", "bias")
                          if getattr(sub, p, None) is not None)
        elif isinstance(sub, nn.modules.conv._ConvNd) and sub.out_channels == width:
            rows = prop.param(f"{full}.weight", 0)
            joined.append(rows)
            if sub.bias is not None:
                prop.union(prop.param(f"{full}.bias", 0), rows)
            pixels = next((a for a in node.all_input_nodes if prop.shape(a) is not None
                           and len(prop.shape(a)) == sub.weight.ndim), None)
            if pixels is not None and sub.groups == 1:
                cols = prop.channel_ids(pixels, 1, "input of a patch embedding")
                prop.union(cols, prop.param(f"{full}.weight", 1))
    for pname, p in module.named_parameters(recurse=False):
        if p.ndim and p.shape[-1] == width:
            joined.append(prop.param(f"{prefix}.{pname}", p.ndim - 1))
    if not joined:
        prop.opaque_op(node, f"embeddings {prefix} with no table of width {width}")
        return
    ids = joined[0]
    for other in joined[1:]:
        prop.union(other, ids)
    for arg in node.all_input_nodes:
        shape = prop.shape(arg)
        for t in prop.get(arg):
            if shape is not None and t.axes == (len(shape) - 1,) and shape[-1] == width:
                prop.union(t.ids, ids)  # inputs_embeds given directly
            else:
                prop.freeze(t.ids, f"input of embeddings {prefix}")
    prop.produces[node.name] = ids
    prop.mac_factors[node.name] = [ids]  # a patch convolution's MACs scale with the width
    prop.set(node, [Track((nd - 1,), ids)])


# ---------------------------------------------------------------------------------------
# Fix-ups and group kinds
# ---------------------------------------------------------------------------------------


def fix_attention(module: nn.Module, layout: HeadLayout) -> None:
    """Recompute the head count and its products from the sliced weights."""
    head_dim = int(getattr(module, layout.head_dim))
    first = getattr(module, layout.first_projection())
    rows = first.weight.shape[0] // (3 if layout.qkv else 1)
    setattr(module, layout.heads, rows // head_dim)
    for attr in layout.products:
        if hasattr(module, attr):
            setattr(module, attr, rows)
    for attr in layout.hidden:
        if hasattr(module, attr):
            setattr(module, attr, first.weight.shape[1])


__all__ = ["HeadLayout", "matches", "attention_rule", "embeddings_rule", "fix_attention"]
