"""Coupled channel groups: the connected components of the propagated channel ids.

After :func:`surgery.propagate.run`, every union the rules made is an edge between two ids.
The connected components of that graph (computed with networkx) are *atoms*: sets of
positions in parameters that must be removed together (one conv channel with its BatchNorm
entries and the next conv's input column; one residual-stream channel in every block; one
attention head). Atoms that touch exactly the same parameter dimensions form one
:class:`ChannelGroup` — the unit a budget is allocated to and a criterion ranks within.

Relations say who reads a group: a layer with weights (conv, linear) consuming the group's
channels, and the group that layer writes. They are what top-down scoring walks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from surgery.graph.capture import Capture
from surgery.graph.propagate import Propagation, flatten_tracks, run

OUTPUT = -1
"""Relation target meaning "the model's output" (labels or the dense model's logits)."""


@dataclass
class ChannelGroup:
    """Channels that must be cut together, and every parameter slice they touch.

    ``slices[(param, dim)][a]`` are the positions atom ``a`` occupies in that parameter
    dimension. ``prunable`` is False for groups that reach the model's inputs or outputs, an
    unsupported op, or a module a plugin froze (``reason`` says which)."""

    id: int
    name: str
    atoms: int
    slices: dict[tuple[str, int], list[np.ndarray]]
    prunable: bool
    reason: str = ""
    kind: str = "channel"
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    order: int = 0

    @property
    def params(self) -> list[str]:
        return sorted({p for p, _ in self.slices})

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for p, _ in self.slices:
            seen.setdefault(p.rsplit(".", 1)[0] if "." in p else "", None)
        return list(seen)


@dataclass
class Probe:
    """Where a group's channels can be observed: fx node ``node``, tensor axis ``axis``, and for
    each position on that axis the atom it belongs to (-1: another group's channel)."""

    node: str
    axis: int
    atom_of_position: np.ndarray
    module: str | None = None
    """Observe the input of this submodule (inside the leaf ``node``) instead of ``node``'s
    output: the per-head input of an attention module's own output projection."""

    @property
    def key(self) -> tuple[str, int, str | None]:
        """What calibration stores the pooled tensor under."""
        return self.node, self.axis, self.module


@dataclass
class Relation:
    """Layer ``layer`` reads group ``group`` (observed by ``probe``) and writes group ``target``
    (:data:`OUTPUT` when what it writes is the model's output)."""

    group: int
    layer: str
    probe: Probe
    target: int
    target_probe: Probe | None = None
    """The layer's own output, positions mapped to ``target``'s atoms: what scoring compares
    the group with ("the neurons of the layer above"), aligned sample by sample. For a reader
    inside a leaf (``reader``; this probe's ``module`` names it), that reader's output:
    observed by no node, it is computed from the reader's weights (a linear target) or,
    failing that, replaced by the target group's own probe."""
    reader: str | None = None
    """The module with the weights that read the group, when it is not ``layer``'s own module
    (a projection inside a leaf): what compensation refits."""


@dataclass
class Coupling:
    """Everything the engine knows about a traced model's channel structure."""

    capture: Capture
    propagation: Propagation
    groups: list[ChannelGroup]
    label_of: np.ndarray
    relations: list[Relation]
    probes: dict[int, Probe]
    output_groups: set[int]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    def record_labels(self) -> dict[tuple[str, int], np.ndarray]:
        """For each tracked parameter dimension, the atom label of every position."""
        return {k: self.label_of[ids] for k, ids in self.propagation.records.items()}


def _components(prop: Propagation) -> np.ndarray:
    graph = nx.Graph()
    graph.add_nodes_from(range(prop.next_id))
    for a, b in prop.edges:
        graph.add_edges_from(zip(a.tolist(), b.tolist()))
    label_of = np.empty(prop.next_id, dtype=np.int64)
    for label, comp in enumerate(nx.connected_components(graph)):
        label_of[list(comp)] = label
    return label_of


def _activation_nodes(capture: Capture) -> set[str]:
    """Nodes whose value depends on a model input (as opposed to parameters only)."""
    live: set[str] = set()
    for node in capture.graph_module.graph.nodes:
        if node.op == "placeholder" or any(a.name in live for a in node.all_input_nodes):
            live.add(node.name)
    return live


def find_groups(capture: Capture) -> Coupling:
    """Propagate channels through ``capture`` and group them; see the module docstring."""
    prop = run(capture)
    label_of = _components(prop)
    reasons: dict[int, str] = {}
    for ids, reason in prop.frozen:
        for label in np.unique(label_of[ids]).tolist():
            reasons.setdefault(label, reason)
    order = {n.name: i for i, n in enumerate(capture.graph_module.graph.nodes)}
    groups, group_of_label = _groups(prop, label_of, _anchored(capture, prop, label_of), reasons,
                                     order)

    from surgery.plugins._manager import call_hook

    for group in groups:
        kind = call_hook("surgery_group_kind", group=group, model=capture.model)
        if kind:
            group.kind = kind

    output_labels = {lab for lab, r in reasons.items() if r == "model output"}
    relations, probes = _relations(prop, label_of, group_of_label, order)
    output_groups = {group_of_label[lab][0] for lab in output_labels if lab in group_of_label}
    for rel in relations:
        if rel.target in output_groups:
            rel.target = OUTPUT
    return Coupling(capture, prop, groups, label_of, relations, probes, output_groups)


def _anchored(capture: Capture, prop: Propagation, label_of: np.ndarray) -> np.ndarray:
    """Per atom label, whether it appears in an activation (a kernel dim or a positional
    table's token dim never does, so it is never an atom)."""
    anchored = np.zeros(int(label_of.max()) + 1 if len(label_of) else 0, dtype=bool)
    for name in _activation_nodes(capture):
        for t in flatten_tracks(prop.tracks.get(name, [])):
            anchored[label_of[t.ids.ravel()]] = True
    for ids in prop.internal:
        anchored[label_of[np.asarray(ids).ravel()]] = True
    return anchored


def _groups(prop: Propagation, label_of: np.ndarray, anchored: np.ndarray,
            reasons: dict[int, str], order: dict[str, int]
            ) -> tuple[list[ChannelGroup], dict[int, tuple[int, int]]]:
    """Atoms touching the same parameter dimensions (and frozen alike) as one group each, in
    the order their first parameter was met; and ``label -> (group id, atom index)``."""
    per_label: dict[int, dict[tuple[str, int], list[int]]] = {}  # label -> {key: positions}
    first_seen: dict[int, int] = {}
    rank_of = {key: rank for rank, key in enumerate(prop.records)}
    for key, ids in prop.records.items():
        for pos, label in enumerate(label_of[ids].tolist()):
            if anchored[label]:
                per_label.setdefault(label, {}).setdefault(key, []).append(pos)
                first_seen.setdefault(label, rank_of[key])
    by_signature: dict[tuple, list[int]] = {}
    for label in sorted(per_label, key=lambda lab: (first_seen[lab], lab)):
        signature = (tuple(sorted(per_label[label])), label in reasons)
        by_signature.setdefault(signature, []).append(label)
    producer_order: dict[int, int] = {}
    producers: dict[int, list[tuple[int, str]]] = {}  # label -> (order, module) writing it
    nodes = {n.name: n for n in prop.capture.graph_module.graph.nodes}
    for op, ids in prop.produces.items():
        module = nodes[op].target if nodes[op].op == "call_module" else None
        for label in np.unique(label_of[ids]).tolist():
            producer_order[label] = max(producer_order.get(label, -1), order[op])
            if module is not None:
                producers.setdefault(label, []).append((order[op], module))

    groups: list[ChannelGroup] = []
    group_of_label: dict[int, tuple[int, int]] = {}
    for (keys, frozen), labels in by_signature.items():
        first_key = min(keys, key=rank_of.__getitem__)
        labels = sorted(labels, key=lambda lab: min(per_label[lab][first_key]))
        reason = reasons.get(labels[0], "") if frozen else ""
        if not frozen and len(labels) < 2:
            reason = "a single atom cannot be cut"
        writers = sorted({w for lab in labels for w in producers.get(lab, ())})
        groups.append(ChannelGroup(
            id=len(groups),
            name=_name(keys, prop, list(dict.fromkeys(m for _, m in writers))),
            atoms=len(labels),
            slices={k: [np.asarray(per_label[lab][k], dtype=np.int64) for lab in labels]
                    for k in keys},
            prunable=not frozen and len(labels) >= 2,
            reason=reason,
            labels=np.asarray(labels, dtype=np.int64),
            order=max((producer_order.get(lab, -1) for lab in labels), default=-1),
        ))
        for a, lab in enumerate(labels):
            group_of_label[lab] = (groups[-1].id, a)
    return groups, group_of_label


def _probe(node: str, axis: int, labels: np.ndarray, gid: int,
           group_of_label: dict[int, tuple[int, int]], module: str | None = None) -> Probe:
    atom = np.array(
        [group_of_label[lab][1] if group_of_label.get(lab, (-2,))[0] == gid else -1
         for lab in labels.tolist()],
        dtype=np.int64,
    )
    return Probe(node, axis, atom, module)


def _relations(
    prop: Propagation,
    label_of: np.ndarray,
    group_of_label: dict[int, tuple[int, int]],
    order: dict[str, int],
) -> tuple[list[Relation], dict[int, Probe]]:
    relations: list[Relation] = []
    probes: dict[int, tuple[int, Probe]] = {}
    for c in prop.consumes:
        labels = label_of[c.track.ids]
        gids = sorted({group_of_label[lab][0] for lab in labels.tolist() if lab in group_of_label})
        writes = c.writes if c.writes is not None else prop.produces.get(c.op)
        out_labels = label_of[writes] if writes is not None else np.zeros(0, int)
        targets = [group_of_label[lab][0] for lab in out_labels.tolist() if lab in group_of_label]
        target = targets[0] if targets else OUTPUT
        out_axis = next((t.axes[0] for t in prop.get_named(c.op)
                         if c.op in prop.produces and t.ids is prop.produces[c.op]), None)
        target_probe = (_probe(c.op, out_axis, out_labels, target, group_of_label)
                        if target != OUTPUT and out_axis is not None and c.writes is None
                        else None)
        reader = c.reader or c.module
        if reader is not None and target != OUTPUT and target_probe is None:
            # a projection inside a leaf: what it writes no node shows (the leaf's output may
            # be a tuple, or the projection writes heads inside it); calibration computes it
            # from the projection's weights
            target_probe = _probe(c.op, -1, out_labels, target, group_of_label, reader)
        for gid in gids:
            probe = _probe(c.source, c.track.axes[0], labels, gid, group_of_label, c.module)
            relations.append(Relation(gid, c.op, probe, target, target_probe, reader))
            rank = order[c.source]
            if gid not in probes or probes[gid][0] < rank:
                probes[gid] = (rank, probe)
    for op, ids in prop.produces.items():
        labels = label_of[ids]
        axis = next((t.axes[0] for t in prop.get_named(op) if t.ids is ids), None)
        if axis is None:
            continue
        for gid in {group_of_label[lab][0] for lab in labels.tolist() if lab in group_of_label}:
            if gid not in probes:
                probes[gid] = (order[op], _probe(op, axis, labels, gid, group_of_label))
    return relations, {g: p for g, (_, p) in probes.items()}


def _name(keys: tuple, prop: Propagation, producers: list[str]) -> str:
    """A readable name: the modules writing these channels, in graph order (the embeddings of
    a residual stream, the first projections of an FFN); for channels no module writes as its
    output (heads inside an attention leaf) the module holding every parameter they touch;
    else the modules whose weight rows they are, else the first module."""
    rank = {k: i for i, k in enumerate(prop.records)}
    ordered = sorted(keys, key=lambda k: rank[k])
    modules = list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else "" for p, _ in ordered))
    common = _common_module(modules)
    if producers:
        names = producers
    elif common and len(modules) > 1:
        names = [common]
    else:
        writers = [p.rsplit(".", 1)[0] for p, d in ordered if d == 0 and (p, 1) in prop.records]
        names = list(dict.fromkeys(writers)) or modules
    return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")


def _common_module(modules: list[str]) -> str:
    """The innermost module containing all of ``modules`` ('' when none does)."""
    parts = [m.split(".") for m in modules]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


__all__ = ["ChannelGroup", "Coupling", "Probe", "Relation", "OUTPUT", "find_groups"]
