"""Channel propagation: which channel positions of which tensors and parameters are one.

Every parameter dimension gets fresh integer ids, one per position. Walking the fx graph in
order, each op's rule says how the ids of its inputs reach its output (a conv makes new ones
from its weight's dim 0, a BatchNorm passes them through, a residual add *unions* the ids of
its operands, a concat lays them side by side, a reshape into heads keeps them in a grid).
Unions are recorded as edges; the connected components of those edges (networkx) are the
atoms that must be removed together. Values carry a list of :class:`Track` objects: the
tensor axes that hold channel ids and the id array over those axes.

Anything a rule does not understand is *frozen*: its channels are never cut. That is how the
engine stays safe on unknown ops: it may prune less, never wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from surgery.errors import PluginError, SurgeryError
from surgery.graph.capture import Capture


@dataclass
class Track:
    """Channel ids living on some axes of a tensor: ``ids.shape == [shape[a] for a in axes]``."""

    axes: tuple[int, ...]
    ids: np.ndarray

    def moved(self, axes: tuple[int, ...]) -> "Track":
        return Track(axes, self.ids)


Tracks = list[Track]


@dataclass
class Consume:
    """A layer with weights reads channels of ``source`` (an fx node) on ``track``'s axes.

    ``module`` names the reader when it sits inside a leaf module (the output projection of an
    attention module kept whole): the channels are then observed at that submodule's *input*
    (a forward pre-hook), which no fx node shows, and ``source`` is the leaf's own node.
    ``reader`` names a reader inside the leaf that reads ``source`` as it is (an attention
    module's q/k/v projections read the leaf's input): observed there, refitted in the leaf.
    ``writes``: the channel ids that reader writes, when they are not the leaf's output."""

    op: str
    source: str
    track: Track
    module: str | None = None
    reader: str | None = None
    writes: np.ndarray | None = None


@dataclass
class Propagation:
    """State of one propagation pass over a captured graph."""

    capture: Capture
    module_rules: dict[type, Callable] = field(default_factory=dict)
    function_rules: dict[Any, Callable] = field(default_factory=dict)
    next_id: int = 0
    edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    frozen: list[tuple[np.ndarray, str]] = field(default_factory=list)
    records: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    tracks: dict[str, Any] = field(default_factory=dict)
    consumes: list[Consume] = field(default_factory=list)
    produces: dict[str, np.ndarray] = field(default_factory=dict)
    mac_factors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)
    tensor_names: dict[int, str] = field(default_factory=dict)
    internal: list[np.ndarray] = field(default_factory=list)
    """Ids of channels a leaf module's rule says live on activations *inside* the leaf (the
    heads of an attention module with its output projection inside): no fx node shows them,
    but they are activation channels all the same (see :func:`surgery.groups.find_groups`)."""

    # ---- id bookkeeping -------------------------------------------------------------------
    def fresh(self, shape: int | tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64).reshape(shape)
        self.next_id += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.edges.append((a.ravel().copy(), b.ravel().copy()))

    def union_along(self, ids: np.ndarray, axis: int) -> np.ndarray:
        """Union all ids along ``axis``; return the ids with that axis removed."""
        first = np.take(ids, [0], axis=axis)
        self.union(ids, first)
        return np.take(ids, 0, axis=axis)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self.frozen.append((np.asarray(ids).ravel(), reason))

    def freeze_value(self, value: Any, reason: str) -> None:
        for t in flatten_tracks(value):
            self.freeze(t.ids, reason)

    def param(self, name: str, dim: int) -> np.ndarray:
        """Ids of dimension ``dim`` of parameter/buffer ``name`` (created once, then reused)."""
        key = (name, dim)
        if key not in self.records:
            tensor = self.capture.graph_module.get_parameter(name) if _is_param(
                self.capture.graph_module, name
            ) else self.capture.graph_module.get_buffer(name)
            self.records[key] = self.fresh(tensor.shape[dim])
            if name in self._unsaved():  # a plan names state-dict entries only
                self.freeze(self.records[key], f"non-persistent buffer {name}")
            first = self.tensor_names.setdefault(id(tensor), name)
            if first != name:  # tied weights (an MLM decoder and the word embeddings): one
                self.union(self.records[key], self.param(first, dim))  # tensor, one cut
        return self.records[key]

    def _unsaved(self) -> set[str]:
        """Names of the model's non-persistent buffers (absent from its state dict)."""
        if "_unsaved_names" not in self.__dict__:
            self.__dict__["_unsaved_names"] = {
                f"{prefix}.{b}" if prefix else b
                for prefix, module in self.capture.model.named_modules()
                for b in getattr(module, "_non_persistent_buffers_set", ())
            }
        return self.__dict__["_unsaved_names"]

    # ---- values -------------------------------------------------------------------------
    def shape(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            meta = arg.meta.get("tensor_meta")
            if hasattr(meta, "shape"):
                return tuple(meta.shape)
        return None

    def get(self, arg: Any) -> Tracks:
        if isinstance(arg, fx.Node):
            value = self.tracks.get(arg.name, [])
            return value if isinstance(value, list) else []
        return []

    def get_named(self, name: str) -> Tracks:
        value = self.tracks.get(name, [])
        return value if isinstance(value, list) else []

    def set(self, node: fx.Node, value: Any) -> None:
        self.tracks[node.name] = value

    def track_on(self, arg: Any, axis: int) -> Track | None:
        """The single-axis track on ``axis`` of ``arg``, if any (multi-axis tracks collapse)."""
        shape = self.shape(arg)
        if shape is None:
            return None
        axis = axis % len(shape)
        for t in self.get(arg):
            if t.axes == (axis,):
                return t
        return None

    def channel_ids(self, arg: Any, axis: int, reason: str) -> np.ndarray:
        """The ids on ``axis`` of ``arg``; fresh frozen ids when that axis is not tracked
        (e.g. the model's raw input), so a layer reading it keeps its input width."""
        shape = self.shape(arg)
        assert shape is not None
        axis = axis % len(shape)
        for t in self.get(arg):
            if axis in t.axes:
                ids = t.ids
                for other in sorted((a for a in t.axes if a != axis), reverse=True):
                    ids = self.union_along(ids, t.axes.index(other))
                return ids
        ids = self.fresh(shape[axis])
        self.freeze(ids, reason)
        return ids

    def opaque_op(self, node: fx.Node, what: str) -> None:
        """An op no rule describes: freeze every channel flowing in, track nothing out."""
        for arg in node.all_input_nodes:
            self.freeze_value(self.tracks.get(arg.name, []), f"input of unsupported {what}")
        self.opaque[node.name] = what
        self.set(node, [])


def _is_param(gm: torch.nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def flatten_tracks(value: Any) -> Tracks:
    if isinstance(value, Track):
        return [value]
    if isinstance(value, (list, tuple)):
        out: Tracks = []
        for v in value:
            out.extend(flatten_tracks(v))
        return out
    return []


def lookup_module_rule(rules: dict[type, Callable], module: torch.nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in rules:
            return rules[cls]
    return None


def run(capture: Capture) -> Propagation:
    """Propagate channel ids through every node of ``capture``."""
    from surgery.plugins._manager import call_hook, merged

    prop = Propagation(
        capture,
        module_rules=merged(call_hook("surgery_module_rules")),
        function_rules=merged(call_hook("surgery_function_rules")),
    )
    frozen_modules = {
        n for names in call_hook("surgery_frozen_modules", model=capture.model) for n in names
    }
    gm = capture.graph_module
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prop.set(node, [])
        elif node.op == "get_attr":
            shape = prop.shape(node)
            if shape is None:
                prop.set(node, [])
                continue
            prop.set(node, [Track((d,), prop.param(node.target, d)) for d in range(len(shape))])
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            rule = lookup_module_rule(prop.module_rules, module)
            if rule is None:
                prop.opaque_op(node, f"module {type(module).__name__} ({node.target})")
            else:
                _apply_rule(rule, prop, node, module)
            if node.target in frozen_modules:
                prop.freeze_value(prop.tracks.get(node.name, []), f"frozen module {node.target}")
        elif node.op in ("call_function", "call_method"):
            key = node.target
            rule = prop.function_rules.get(key)
            if rule is None and node.op == "call_method":
                rule = prop.function_rules.get(f"Tensor.{key}")
            if rule is None:
                if not any(prop.get(a) for a in node.all_input_nodes):
                    prop.set(node, [])  # nothing channel-carrying flows through it
                else:
                    prop.opaque_op(node, f"{node.op} {_name(key)}")
            else:
                _apply_rule(rule, prop, node)
        elif node.op == "output":
            prop.freeze_value(
                [prop.tracks.get(a.name, []) for a in node.all_input_nodes], "model output"
            )
    return prop


def _apply_rule(rule: Callable, prop: Propagation, node: fx.Node, *extra: Any) -> None:
    """Run one channel rule; a crash becomes a :class:`PluginError` naming the rule, the
    plugin module it comes from and the node (the original exception is chained)."""
    try:
        rule(prop, node, *extra)
    except SurgeryError:
        raise
    except Exception as exc:
        raise PluginError(
            f"channel rule {_name(rule)} (plugin module {getattr(rule, '__module__', '?')!r}) "
            f"raised {type(exc).__name__} on node {node.name!r} ({node.op} {_name(node.target)}): "
            f"{exc}. This is a bug in that rule; report it with the model class, or unregister "
            "the plugin."
        ) from exc


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", "") or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


__all__ = ["Track", "Tracks", "Consume", "Propagation", "run", "flatten_tracks"]
