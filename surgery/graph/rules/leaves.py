"""Rules for modules kept whole as fx leaves whose layout is known: multi-head attention (and
embeddings, :mod:`surgery.graph.rules.embeddings`).

fx cannot trace the attention modules of current Hugging Face and timm models well: their
forwards unpack traced shapes (``(*input_shape, -1, head_dim)``), dispatch through attention
registries with data-dependent checks, and reshape the fused ``qkv`` projection with the head
count as a literal int, which the engine would have to pin. So plugins keep each attention
module as one fx leaf and describe it with :func:`attention_rule`, built from a
:class:`HeadLayout` naming where the module keeps its projections:

* every input column of q, k, v (and of a fused qkv) reads the hidden channels coming in;
* the rows of one head in q, k and v, plus any per-head output norm/gate rows and the input
  columns of an output projection inside the module, are one atom: a head is removed whole, so
  every kept head keeps its size and the attention arithmetic stays the same (``head_dim`` is
  never cut: rotary embeddings rotate pairs inside it);
* with grouped-query attention (fewer key/value heads than query heads, each key/value head
  read by ``n_q / n_kv`` consecutive query heads) the atom is a *KV group*: one key/value head
  with the query heads that read it, so cutting it lowers both counts together and the query
  heads per group stay equal (what ``repeat_kv`` needs). With ``query_atoms=True`` the
  key/value heads stay and the atom is *query slot j of every group* instead;
* the module's output carries either the value rows (head layout; the model's own output
  projection reads them) or its internal output projection's rows.

Projections are ``nn.Linear`` or modules with a 2-d ``weight`` stored transposed
(``[in, out]``, transformers' ``Conv1D`` in GPT-2: ``HeadLayout.transposed``); a fused qkv is
laid out part by part (``[q heads | k heads | v heads]``, GQA allowed) or head by head
(``[heads, 3, head_dim]``, GPT-NeoX: ``qkv_order="head"``).

A leaf holding a parameter or buffer the layout does not name, with a size a cut could change
(OLMo 2's q/k norms over all heads at once), is refused: opaque, its channels frozen, the
reason naming the tensor. Embedding modules are leaves too, described by
:func:`~surgery.graph.rules.embeddings.embeddings_rule` (re-exported here). After slicing,
:func:`fix_attention` recomputes the head counts (and the products of them) from the new
weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from surgery.graph.propagate import Consume, Propagation, Track
from surgery.graph.rules.embeddings import embeddings_rule


@dataclass(frozen=True)
class HeadLayout:
    """Where a multi-head attention module keeps its projections (child module names).

    Either ``q``/``k``/``v`` (separate projections, rows ``[heads, head_dim]``) or ``qkv`` (one
    fused projection: rows ``[q heads | k heads | v heads]`` with ``qkv_order="part"``,
    ``[heads, 3, head_dim]`` with ``qkv_order="head"``). ``out`` is an output projection
    *inside* the module (its input columns are per query head), or None when the model applies
    it outside. ``transposed``: the projections store their weight ``[in, out]`` (GPT-2's
    ``Conv1D``) instead of ``nn.Linear``'s ``[out, in]``.

    ``head_dim`` names the attribute holding the head size (never cut). ``heads`` names the
    attribute holding the query head count, or None when the module keeps none (the counts
    are then read from the weights); ``kv_heads`` the key/value head count and ``kv_groups``
    the query heads per key/value head (``num_key_value_groups``), where the module keeps
    them; all are recomputed after slicing. ``products`` name attributes equal to
    ``heads * head_dim`` and ``hidden`` attributes equal to the input width, both recomputed
    too. ``per_head_rows`` are child modules whose parameters' dim 0 is laid out like the
    query heads' output (an output norm or gate)."""

    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    out: str | None = None
    heads: str | None = "num_attention_heads"
    head_dim: str = "attention_head_size"
    products: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    per_head_rows: tuple[str, ...] = ()
    kv_heads: str | None = None
    kv_groups: str | None = None
    qkv_order: str = "part"
    transposed: bool = False

    def first_projection(self) -> str:
        return self.qkv or self.q  # type: ignore[return-value]

    @property
    def rows(self) -> int:
        """The weight dim holding a projection's outputs (its input is the other one)."""
        return 1 if self.transposed else 0


def _projection_module(module: nn.Module, name: str | None) -> nn.Module | None:
    """Child ``name`` when it is a projection: an ``nn.Linear`` or a module with a 2-d
    ``weight`` (a transposed ``Conv1D``)."""
    if name is None:
        return None
    sub = getattr(module, name, None)
    if isinstance(sub, nn.Linear):
        return sub
    weight = getattr(sub, "weight", None)
    return sub if isinstance(sub, nn.Module) and getattr(weight, "ndim", 0) == 2 else None


def _width(module: nn.Module, layout: HeadLayout, name: str, outputs: bool = True) -> int:
    sub = getattr(module, name)
    return int(sub.weight.shape[layout.rows if outputs else 1 - layout.rows])


def head_counts(module: nn.Module, layout: HeadLayout) -> tuple[int, int]:
    """(query heads, key/value heads) of an attention module, read from its weights: the
    output projection's input width (or the query rows) over the head size, and the key rows
    (or what a fused projection has beyond the queries, halved)."""
    dim = int(getattr(module, layout.head_dim))
    if layout.out:
        n_q = _width(module, layout, layout.out, outputs=False) // dim
    elif layout.q:
        n_q = _width(module, layout, layout.q) // dim
    else:
        n_q = _width(module, layout, layout.qkv) // (3 * dim)  # type: ignore[arg-type]
    if layout.qkv:
        n_kv = (_width(module, layout, layout.qkv) // dim - n_q) // 2
    else:
        n_kv = _width(module, layout, layout.k) // dim  # type: ignore[arg-type]
    return n_q, n_kv


def matches(module: nn.Module, layout: HeadLayout, sizes: bool = True) -> bool:
    """Whether ``module`` is an attention module with ``layout``, judged from the module alone.

    Structure: the children and integer attributes ``layout`` names, projections of the
    orientation it says, each writing a multiple of ``head_dim`` rows, and query rows (or a
    fused qkv's) that agree with the head counts read from the weights (an inside output
    projection reading exactly the query heads' values). This holds before and after heads
    are cut, so fix-ups recognise a pruned module in a process that never traced it. With
    ``sizes``, the module's head attributes must also agree with its weights: the module is
    consistent, as the channel rule needs (it reshapes the rows into its head count); a
    sliced module is consistent only once :func:`fix_attention` has run."""
    names = [layout.qkv] if layout.qkv else [layout.q, layout.k, layout.v]
    if layout.out:
        names.append(layout.out)
    if any(_projection_module(module, n) is None for n in names):
        return False
    if any(isinstance(getattr(module, n), nn.Linear) == layout.transposed for n in names):
        return False
    attrs = [layout.head_dim] + ([layout.heads] if layout.heads else [])
    values = [getattr(module, a, None) for a in attrs]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return False
    dim = values[0]
    projections = names[:-1] if layout.out else names
    if any(_width(module, layout, n) % dim for n in projections):
        return False
    if not layout.qkv and _width(module, layout, layout.k) != _width(module, layout, layout.v):
        return False
    n_q, n_kv = head_counts(module, layout)
    if n_kv <= 0 or n_q % n_kv:
        return False
    if layout.qkv:
        expected = (n_q + 2 * n_kv) * dim
        if layout.qkv_order == "head" and n_q != n_kv:
            return False
    else:
        expected = n_q * dim
    if _width(module, layout, names[0]) != expected:
        return False
    if not sizes:
        return True
    if layout.heads and getattr(module, layout.heads) != n_q:
        return False
    groups = getattr(module, layout.kv_groups, None) if layout.kv_groups else None
    return not (isinstance(groups, int) and groups != n_q // n_kv)


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


def _projection(prop: Propagation, module: nn.Module, layout: HeadLayout, prefix: str,
                name: str, in_ids: np.ndarray) -> np.ndarray:
    """Union a projection child's input columns with ``in_ids``; return its output ids."""
    full = f"{prefix}.{name}"
    rows = prop.param(f"{full}.weight", layout.rows)
    prop.union(prop.param(f"{full}.weight", 1 - layout.rows), in_ids)
    if getattr(getattr(module, name), "bias", None) is not None:
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


def _atoms(prop: Propagation, n_q: int, n_kv: int, query_atoms: bool, prefix: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atom ids, the atom of each query head, the atom of each key/value head). Query head
    ``h`` reads key/value head ``h // (n_q / n_kv)``. KV groups: atom ``g`` is key/value head
    ``g`` with its query heads. Query slots (``query_atoms``, several query heads per group):
    atom ``j`` is the ``j``-th query head of every group, and the key/value heads are pinned."""
    per = n_q // n_kv
    if query_atoms and per > 1:
        atoms = prop.fresh(per)
        kv = prop.fresh(n_kv)
        prop.freeze(kv, f"key/value heads of {prefix} (query heads are the atoms)")
        prop.internal.append(kv)
        return atoms, np.tile(atoms, n_kv), kv
    atoms = prop.fresh(n_kv)
    return atoms, np.repeat(atoms, per), atoms


def _qkv_rows(prop: Propagation, module: nn.Module, layout: HeadLayout, prefix: str,
              in_ids: np.ndarray, n_q: int, n_kv: int, dim: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output ids of the query, key and value projections, each ``[heads, head_dim]``."""
    if not layout.qkv:
        return tuple(_projection(prop, module, layout, prefix, name, in_ids).reshape(-1, dim)
                     for name in (layout.q, layout.k, layout.v))  # type: ignore[return-value]
    rows = _projection(prop, module, layout, prefix, layout.qkv, in_ids)
    if layout.qkv_order == "head":
        grid = rows.reshape(n_q, 3, dim)
        return grid[:, 0], grid[:, 1], grid[:, 2]
    q, k, v = np.split(rows, [n_q * dim, (n_q + n_kv) * dim])
    return q.reshape(n_q, dim), k.reshape(n_kv, dim), v.reshape(n_kv, dim)


def _undescribed_tensor(module: nn.Module, layout: HeadLayout, dim: int) -> str | None:
    """A parameter or buffer of the leaf outside the projections and per-head children the
    layout names, with a size a cut could change (anything but ``head_dim``): slicing would
    miss it (OLMo 2's q/k norms over all heads), so the leaf is refused. Per-head-dim tensors
    (Qwen3's and Gemma 3's q/k norms) are fine: ``head_dim`` is never cut."""
    described = {n for n in (layout.q, layout.k, layout.v, layout.qkv, layout.out) if n}
    described |= set(layout.per_head_rows)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if name.split(".")[0] not in described and any(n not in (1, dim) for n in tensor.shape):
            return f"{name} {tuple(tensor.shape)}"
    return None


def attention_rule(layout: HeadLayout, query_atoms: bool = False
                   ) -> Callable[[Propagation, fx.Node, nn.Module], None]:
    """The channel rule of an attention leaf with ``layout``; see the module docstring.
    ``query_atoms``: with grouped-query attention, cut query heads (slot ``j`` of every KV
    group) and keep every key/value head, instead of whole KV groups."""

    def rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
        x = _hidden_input(node)
        shape = prop.shape(x)
        prefix = node.target
        if shape is None:
            prop.opaque_op(node, f"attention {prefix} without shapes")
            return
        dim = int(getattr(module, layout.head_dim))
        n_q, n_kv = head_counts(module, layout)
        if n_kv <= 0 or n_q % n_kv or (n_q != n_kv and (
                layout.qkv_order == "head" or not layout.out)):
            prop.opaque_op(node, f"attention {prefix} with {n_q} query and {n_kv} key/value "
                           "heads in a layout the rule does not describe")
            return
        unknown = _undescribed_tensor(module, layout, dim)
        if unknown is not None:
            prop.opaque_op(node, f"attention {prefix} holding {unknown}, which its layout does "
                           "not describe")
            return
        nd = len(shape)
        in_ids = prop.channel_ids(x, -1, "input of attention")
        atoms, q_atom, kv_atom = _atoms(prop, n_q, n_kv, query_atoms, prefix)
        q_rows, k_rows, v_rows = _qkv_rows(prop, module, layout, prefix, in_ids, n_q, n_kv, dim)
        prop.union(q_rows, q_atom[:, None])
        prop.union(k_rows, kv_atom[:, None])
        prop.union(v_rows, kv_atom[:, None])
        for name in layout.per_head_rows:
            sub = getattr(module, name, None)
            if sub is None:
                continue
            for pname, p in sub.named_parameters(recurse=False):
                if p.ndim and p.shape[0] == n_q * dim:
                    ids = prop.param(f"{prefix}.{name}.{pname}", 0).reshape(n_q, dim)
                    prop.union(ids, q_atom[:, None])
        out_ids = v_rows.reshape(-1)
        if layout.out:
            full = f"{prefix}.{layout.out}"
            cols = prop.param(f"{full}.weight", 1 - layout.rows)
            prop.union(cols.reshape(n_q, dim), q_atom[:, None])
            out_ids = prop.param(f"{full}.weight", layout.rows)
            if getattr(getattr(module, layout.out), "bias", None) is not None:
                prop.union(prop.param(f"{full}.bias", 0), out_ids)
        _freeze_other_tracks(prop, x, -1, f"token axis through attention {prefix}")
        for arg in node.all_input_nodes:
            if arg is not x:
                _freeze_other_tracks(prop, arg, None, f"extra input of attention {prefix}", q_atom)
        for name in (layout.qkv,) if layout.qkv else (layout.q, layout.k, layout.v):
            full = f"{prefix}.{name}"  # each projection reads the leaf's input as it is
            prop.consumes.append(Consume(node.name, x.name, Track((nd - 1,), in_ids),
                                         reader=full,
                                         writes=prop.param(f"{full}.weight", layout.rows)))
        if layout.out:  # the heads are read inside: observe the output projection's input
            prop.consumes.append(Consume(node.name, node.name, Track((nd - 1,), cols),
                                         module=f"{prefix}.{layout.out}"))
        prop.produces[node.name] = out_ids
        # MACs scale with the query heads kept (q, scores, output projection; k and v too
        # when whole KV groups go)
        prop.mac_factors[node.name] = [in_ids, q_rows.reshape(-1)]
        prop.internal.append(atoms)
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
            outs: list[Any] = []
            for i, m in enumerate(meta):
                if i == 0:
                    outs.append([Track((nd - 1,), out_ids)])
                elif hasattr(m, "shape") and len(m.shape) == 4 and m.shape[1] == n_q:
                    outs.append([Track((1,), q_atom)])  # attention probabilities, per head
                else:
                    outs.append([])
            prop.set(node, tuple(outs))
        else:
            prop.set(node, [Track((nd - 1,), out_ids)])

    return rule


# ---------------------------------------------------------------------------------------
# Fix-ups and group kinds
# ---------------------------------------------------------------------------------------


def fix_attention(module: nn.Module, layout: HeadLayout) -> None:
    """Recompute the head counts and their products from the sliced weights."""
    dim = int(getattr(module, layout.head_dim))
    n_q, n_kv = head_counts(module, layout)
    for attr, value in ((layout.heads, n_q), (layout.kv_heads, n_kv),
                        (layout.kv_groups, n_q // max(n_kv, 1))):
        if attr and isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)
    for attr in layout.products:
        if hasattr(module, attr):
            setattr(module, attr, n_q * dim)
    for attr in layout.hidden:
        if hasattr(module, attr):
            setattr(module, attr, _width(module, layout, layout.first_projection(), False))


__all__ = ["HeadLayout", "matches", "head_counts", "attention_rule", "embeddings_rule",
           "fix_attention"]
