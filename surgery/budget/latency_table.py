"""The latency table: what each part of a model costs on one device, measured, at a few widths.

A MAC budget prices every multiply alike; a device does not. Fixed per-call costs, memory-bound
ops (norms, activations, softmax) and kernels that prefer some widths make the time of a layer
a different function of its width than its MACs. So the table is *measured*:

1. **Cliffs.** For each kind of layer that reads or writes a prunable group (linear, conv), the
   layer that costs most is timed standalone, at the traced input shape and batch, at every
   output width of a 33-wide window and at every input width; widths that are multiples of
   some ``m`` running faster than the trend of the others is a cliff, and ``m`` with its
   penalty is kept (none is assumed: on a device without one, ``m`` is 1).
   ``round_to="auto"`` uses the largest ``m``.
2. **Points.** The whole model is cut to a few uniform keep ratios (first atoms of every
   prunable group, widths on multiples of ``m``) and every fx node of each cut model is
   timed, the models taking turns round by round; each whole cut model is timed too.
3. **Fit.** Per node, time is a piecewise-linear, non-decreasing function of its *work*: the
   product of the kept fractions of the channel axes its MACs (or, for an op without MACs,
   its output elements) scale with, as the cost model uses them. A node no prunable group
   touches is a constant. The per-node sum is mapped onto the measured whole-model times
   (piecewise linear, non-decreasing: what running node by node adds or hides), so at the
   measured ratios the model says what the device said.

Tables are cached on disk, one file per device, threads, backend, batch, input shapes, model
and prunable structure, written whole or not at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from surgery.budget.allocate import atom_step
from surgery.graph.groups import Coupling
from surgery.graph.propagate import flatten_tracks

CLIFF_KINDS = ("linear", "conv")
MULTIPLES = (2, 4, 8, 16, 32)
WINDOW = 33
MIN_PENALTY = 0.04
"""A cliff must make the widths off the multiple at least this much slower (4%)."""


def node_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """A node's layer kind, as the table's plot and cliffs group them."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        name = type(module).__name__
        if isinstance(module, nn.Linear) or name == "Conv1D":
            return "linear"
        if isinstance(module, nn.modules.conv._ConvNd):
            return "conv"
        if "Norm" in name:
            return "norm"
        if "Attention" in name or "Attn" in name:
            return "attention"
        return "other"
    target = getattr(node.target, "__name__", str(node.target))
    if target in ("matmul", "bmm", "baddbmm", "scaled_dot_product_attention", "softmax"):
        return "attention"
    if "norm" in target:
        return "norm"
    return "elementwise"


class WorkMap:
    """Per fx node of a coupling, the channel axes its cost scales with, evaluated fast.

    ``fractions(keep)`` is the kept fraction of every factor (concatenated label arrays summed
    in one ``np.add.reduceat``) and ``work(keep)`` each varying node's product of them: the
    whole table is priced by a few numpy calls per keep mask, so allocation can afford
    thousands of evaluations."""

    def __init__(self, coupling: Coupling) -> None:
        gm = coupling.capture.graph_module
        prop = coupling.propagation
        label_of = coupling.label_of
        prunable = np.zeros(len(label_of) and int(label_of.max()) + 1, dtype=bool)
        for g in coupling.prunable:
            prunable[g.labels] = True
        self.nodes: list[str] = []
        self.kinds: list[str] = []
        labels: list[np.ndarray] = []
        owner: list[int] = []
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if node.name in prop.mac_factors:
                factors = [label_of[np.asarray(f).ravel()] for f in prop.mac_factors[node.name]]
            else:
                factors = [label_of[t.ids.ravel()]
                           for t in flatten_tracks(prop.tracks.get(node.name, []))]
            factors = [f for f in factors if len(f)]
            if not any(prunable[f].any() for f in factors):
                continue
            for f in factors:
                labels.append(f)
                owner.append(len(self.nodes))
            self.nodes.append(node.name)
            self.kinds.append(node_kind(gm, node))
        self.n_labels = len(prunable)
        self.lengths = np.array([len(f) for f in labels], dtype=np.float64)
        self.concat = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.owner = np.asarray(owner, dtype=np.int64)
        self.node_starts = np.searchsorted(self.owner, np.arange(len(self.nodes)))

    def kept_positions(self, keep: np.ndarray) -> np.ndarray:
        """Kept positions (channels) of every factor."""
        if not len(self.concat):
            return np.zeros(0)
        return np.add.reduceat(keep[self.concat].astype(np.float64), self.starts)

    def work(self, keep: np.ndarray) -> np.ndarray:
        """Per varying node, the product of its factors' kept fractions."""
        if not self.nodes:
            return np.zeros(0)
        fractions = self.kept_positions(keep) / self.lengths
        return np.multiply.reduceat(fractions, self.node_starts)

    def off_multiple(self, keep: np.ndarray, multiple: int) -> np.ndarray:
        """Per varying node, whether any of its factors keeps a width that is not a multiple
        of ``multiple``."""
        if multiple <= 1 or not self.nodes:
            return np.zeros(len(self.nodes), dtype=bool)
        kept = np.rint(self.kept_positions(keep)).astype(np.int64)
        off = (kept % multiple != 0).astype(np.int64)
        return np.add.reduceat(off, self.node_starts) > 0


@dataclass
class Cliff:
    """One layer kind's measured width sweep and what it says: widths that are multiples of
    ``multiple`` run ``penalty`` (a fraction) faster than the others (1 and 0: no cliff)."""

    layer: str
    widths: list[int]
    seconds: list[float]
    multiple: int = 1
    penalty: float = 0.0


@dataclass
class LatencyTable:
    """The measurements (see the module docstring); ``model()`` turns them into a function."""

    key: str
    batch: int
    ratios: list[float]
    end_to_end: list[float]
    """Seconds per batch of the whole cut model at each ratio (median of the rounds)."""
    nodes: list[str]
    kinds: list[str]
    work: list[list[float]]
    """Per varying node, its work fraction at each ratio."""
    seconds: list[list[float]]
    """Per varying node, its median seconds at each ratio."""
    constant: float
    """Seconds of the nodes no prunable group touches (median over the ratios)."""
    constant_kinds: dict[str, float] = field(default_factory=dict)
    cliffs: dict[str, Cliff] = field(default_factory=dict)
    multiple: int = 1
    """The widths the points were measured at are multiples of this."""

    @property
    def preferred_multiple(self) -> int:
        """What ``round_to="auto"`` rounds kept channels to: the largest measured cliff."""
        return max([c.multiple for c in self.cliffs.values()] + [1])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        raw = json.loads(text)
        raw["cliffs"] = {k: Cliff(**v) for k, v in raw.get("cliffs", {}).items()}
        return cls(**raw)


def preferred_multiple(widths: list[int], seconds: list[float]) -> tuple[int, float]:
    """``(m, penalty)`` from a width sweep: the ``m`` whose multiples split the times into a
    fast and a slow class explaining the most variance around the linear trend, when the slow
    class is at least :data:`MIN_PENALTY` slower and the split is clear of the noise (t > 3);
    otherwise ``(1, 0.0)``."""
    w = np.asarray(widths, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    slope, intercept = np.polyfit(w, t, 1)
    trend = np.maximum(intercept + slope * w, 1e-12)
    rho = t / trend - 1.0
    best, best_ss, best_gap = 1, 0.0, 0.0
    for m in MULTIPLES:
        fast = (w.astype(np.int64) % m) == 0
        nf, ns = int(fast.sum()), int((~fast).sum())
        if nf < 2 or ns < 2:
            continue
        gap = float(rho[~fast].mean() - rho[fast].mean())
        ss = nf * ns / len(w) * gap ** 2
        pooled = math.sqrt(((rho[fast] - rho[fast].mean()) ** 2).sum()
                           + ((rho[~fast] - rho[~fast].mean()) ** 2).sum()) / math.sqrt(len(w) - 2)
        t_stat = gap / max(pooled * math.sqrt(1 / nf + 1 / ns), 1e-12)
        if gap > 0 and ss > best_ss and t_stat > 3:
            best, best_ss, best_gap = m, ss, gap
    fast_level = 1.0 + float(rho[(w.astype(np.int64) % best) == 0].mean()) if best > 1 else 1.0
    penalty = best_gap / max(fast_level, 1e-6)
    if penalty < MIN_PENALTY:
        return 1, 0.0
    return best, float(penalty)


def _probe_layer(gm: torch.fx.GraphModule, node: torch.fx.Node, width: int, side: str,
                 device: torch.device) -> tuple[nn.Module, torch.Tensor] | None:
    """A standalone copy of ``node``'s layer with ``width`` outputs (``side="out"``) or
    inputs (``"in"``), fed an input of the traced shape (batch rows cut so that one call stays
    near 0.2 GMAC)."""
    module = gm.get_submodule(str(node.target))
    source = node.args[0] if node.args else None
    meta = getattr(source, "meta", {}).get("tensor_meta")
    if meta is None:
        return None
    shape = list(meta.shape)
    if isinstance(module, nn.Linear):
        fan_in, fan_out = ((width, module.out_features) if side == "in"
                           else (module.in_features, width))
        layer: nn.Module = nn.Linear(fan_in, fan_out, bias=module.bias is not None)
        shape[-1] = fan_in
        per_row = fan_in * fan_out * math.prod(shape[1:-1] or [1])
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        fan_in, fan_out = ((width, module.out_channels) if side == "in"
                           else (module.in_channels, width))
        layer = type(module)(fan_in, fan_out, module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation,
                             bias=module.bias is not None)
        shape[1] = fan_in
        out = node.meta.get("tensor_meta")
        spatial = math.prod(out.shape[2:]) if out is not None else math.prod(shape[2:])
        per_row = fan_in * fan_out * math.prod(module.kernel_size) * spatial
    else:
        return None
    shape[0] = max(1, min(shape[0], int(2e8 // max(1, per_row))))
    return layer.to(device).eval(), torch.randn(*shape, device=device)


def _probe_cliffs(gm: torch.fx.GraphModule, work_map: WorkMap, timer: Any, rounds: int,
                  device: torch.device) -> dict[str, Cliff]:
    """Per layer kind in :data:`CLIFF_KINDS`, width sweeps of its costliest layer's outputs
    and inputs (a hidden size is the input width of most matrices that read it); the side
    with the larger penalty is kept."""
    nodes = {n.name: n for n in gm.graph.nodes}
    cliffs: dict[str, Cliff] = {}
    for kind in CLIFF_KINDS:
        candidates = []
        for name, k in zip(work_map.nodes, work_map.kinds):
            node = nodes.get(name)
            if k != kind or node is None or node.op != "call_module":
                continue
            out = node.meta.get("tensor_meta")
            module = gm.get_submodule(str(node.target))
            weight = getattr(module, "weight", None)
            if out is None or weight is None:
                continue
            candidates.append((math.prod(out.shape) * weight[0].numel(), name))
        for _, name in sorted(candidates, reverse=True):
            node = nodes[name]
            module = gm.get_submodule(str(node.target))
            sweeps = []
            for side in ("out", "in"):
                dense = (getattr(module, "out_features", None) or module.out_channels
                         if side == "out" else
                         getattr(module, "in_features", None) or module.in_channels)
                base = max(16, (dense // 2) // 32 * 32)
                widths = list(range(base, base + WINDOW))
                made = {str(w): _probe_layer(gm, node, w, side, device) for w in widths}
                if any(v is None for v in made.values()):
                    break
                seconds = timer.layers(made, rounds)
                times = [seconds[str(w)] for w in widths]
                m, penalty = preferred_multiple(widths, times)
                sweeps.append(Cliff(f"{name} ({side}put width)", widths, times, m, penalty))
            if len(sweeps) == 2:
                cliffs[kind] = max(sweeps, key=lambda c: (c.penalty, c.multiple))
                break
    return cliffs


def uniform_counts_at(coupling: Coupling, ratio: float, multiple: int,
                      min_keep: int) -> dict[int, int]:
    """Atoms kept per prunable group at one keep ratio, channels on multiples of
    ``multiple``."""
    out = {}
    for g in coupling.prunable:
        if ratio >= 1.0:
            out[g.id] = g.atoms
            continue
        step = atom_step(g, multiple)
        k = int(round(ratio * g.atoms / step)) * step
        k = max(k, min(step, g.atoms), min(min_keep, g.atoms))
        out[g.id] = int(min(g.atoms, k))
    return out


def keep_mask(coupling: Coupling, counts: dict[int, int]) -> np.ndarray:
    """The label mask of keeping the first ``counts[g]`` atoms of every prunable group."""
    keep = np.ones(len(coupling.label_of) and int(coupling.label_of.max()) + 1, dtype=bool)
    for g in coupling.prunable:
        keep[g.labels[counts[g.id]:]] = False
    return keep


def _cut(model: torch.nn.Module, coupling: Coupling, counts: dict[int, int],
         example: Any) -> torch.nn.Module:
    from surgery.cut.apply import apply_plan
    from surgery.cut.plan import build_plan

    kept = {g.id: np.arange(counts[g.id]) for g in coupling.prunable}
    plan = build_plan(coupling, kept, criterion="latency-table", target="output", budget={})
    return apply_plan(copy.deepcopy(model), plan, example, inplace=True).eval()


def table_key(model: torch.nn.Module, coupling: Coupling, inputs: Any, timer_key: str,
              ratios: tuple[float, ...], multiple: int | str, min_keep: int) -> str:
    """Everything a table depends on, as one string (hashed into the cache file name)."""
    from torch.utils._pytree import tree_leaves

    shapes = [(tuple(t.shape), str(t.dtype)) for t in tree_leaves(inputs)
              if isinstance(t, torch.Tensor)]
    params = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    structure = [(g.name, g.atoms) for g in coupling.prunable]
    raw = json.dumps({"timer": timer_key, "model": type(model).__name__, "inputs": shapes,
                      "params": hashlib.sha256(repr(params).encode()).hexdigest(),
                      "groups": structure, "ratios": list(ratios), "multiple": multiple,
                      "min_keep": min_keep, "version": 2}, sort_keys=True)
    return raw


def cache_path(key: str, cache: Any) -> Path | None:
    if cache is False or cache is None:
        return None
    if cache is True:
        root = Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
        folder = root / "latency"
    else:
        folder = Path(cache)
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def measure_multiple(model: torch.nn.Module, coupling: Coupling, inputs: Any, *, timer: Any,
                     rounds: int, device: torch.device) -> tuple[int, dict[str, Cliff]]:
    """Only the cliffs (step 1 of the module docstring): what ``round_to="auto"`` needs under
    a params or MACs budget, without timing cut models."""
    from surgery.graph.capture import trace

    cliffs = _probe_cliffs(trace(model, inputs).graph_module, WorkMap(coupling), timer, rounds,
                           device)
    return max([c.multiple for c in cliffs.values()] + [1]), cliffs


def build_table(model: torch.nn.Module, coupling: Coupling, inputs: Any, example: Any, *,
                timer: Any, key: str, ratios: tuple[float, ...], rounds: int,
                round_to: int | str, min_keep: int, device: torch.device,
                log: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure a :class:`LatencyTable` (module docstring): ``inputs`` are the timing batch
    on ``device``, ``example`` the small batch cut models are verified on."""
    from surgery._core.batches import rows
    from surgery.graph.capture import trace

    say = log or (lambda _m: None)
    work_map = WorkMap(coupling)
    dense_capture = trace(model, inputs)
    say("timing layers at a window of widths (cliffs)")
    cliffs = _probe_cliffs(dense_capture.graph_module, work_map, timer, rounds, device)
    multiple = (max([c.multiple for c in cliffs.values()] + [1]) if round_to == "auto"
                else int(round_to))
    levels = sorted({1.0, *ratios}, reverse=True)
    graphs, args, models, work = {}, {}, {}, {}
    for r in levels:
        counts = uniform_counts_at(coupling, r, multiple, min_keep)
        name = f"{r:g}"
        work[name] = work_map.work(keep_mask(coupling, counts))
        cut = model if r == 1.0 else _cut(model, coupling, counts, example)
        capture = dense_capture if r == 1.0 else trace(cut, inputs)
        graphs[name], args[name], models[name] = (capture.graph_module, capture.example_args,
                                                  cut)
    say(f"timing every node at keep ratios {', '.join(graphs)}")
    per_node = timer.nodes(graphs, args, rounds)
    say("timing the cut models end to end")
    whole = timer.models(models, inputs, rounds)
    names = list(graphs)
    varying = set(work_map.nodes)
    constant_kinds: dict[str, float] = {}
    gm = dense_capture.graph_module
    for node in gm.graph.nodes:
        if node.name in varying or node.name not in per_node[names[0]]:
            continue
        kind = node_kind(gm, node)
        seconds = float(np.median([per_node[n].get(node.name, 0.0) for n in names]))
        constant_kinds[kind] = constant_kinds.get(kind, 0.0) + seconds
    seconds_rows = []
    for node in work_map.nodes:
        dense_time = per_node[names[0]].get(node, 0.0)
        seconds_rows.append([float(per_node[n].get(node, dense_time)) for n in names])
    return LatencyTable(
        key=key, batch=rows(inputs), ratios=levels,
        end_to_end=[float(np.median(whole[n])) for n in names], nodes=list(work_map.nodes),
        kinds=list(work_map.kinds), work=[[float(work[n][i]) for n in names]
                                          for i in range(len(work_map.nodes))],
        seconds=seconds_rows, constant=float(sum(constant_kinds.values())),
        constant_kinds=constant_kinds, cliffs=cliffs, multiple=multiple)


def load_or_build(model: torch.nn.Module, coupling: Coupling, inputs: Any, example: Any, *,
                  timer: Any, ratios: tuple[float, ...], rounds: int, round_to: int | str,
                  min_keep: int, device: torch.device, cache: Any = True,
                  log: Callable[[str], None] | None = None) -> tuple[LatencyTable, bool]:
    """The cached table for this model, device and shapes, or a freshly measured one (then
    cached, written atomically); and whether it came from the cache."""
    key = table_key(model, coupling, inputs, timer.key, ratios, round_to, min_keep)
    path = cache_path(key, cache)
    if path is not None and path.exists():
        try:
            table = LatencyTable.from_json(path.read_text())
            if table.key == key:
                return table, True
        except (ValueError, TypeError, KeyError):
            pass  # a table from another version: measure again
    table = build_table(model, coupling, inputs, example, timer=timer, key=key, ratios=ratios,
                        rounds=rounds, round_to=round_to, min_keep=min_keep, device=device,
                        log=log)
    if path is not None:
        from surgery.io._atomic import atomic_write_text

        atomic_write_text(path, table.to_json())
    return table, False


__all__ = ["Cliff", "LatencyTable", "WorkMap", "build_table", "keep_mask", "load_or_build",
           "measure_multiple", "node_kind", "preferred_multiple", "uniform_counts_at"]
