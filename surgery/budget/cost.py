"""The cost model: params and MACs of a keep decision, priced without building the model.

A parameter's size is its dense size times the kept fraction of each tracked dimension; a
layer's MACs are its measured dense MACs (FlopCounterMode, per fx node) times the kept fraction
of each channel axis it multiplies over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from surgery.errors import BudgetError
from surgery.graph.groups import Coupling

KINDS = ("params", "macs")


@dataclass
class Cost:
    params: int
    macs: int

    def of(self, kind: str) -> int:
        return self.params if kind == "params" else self.macs


class CostModel:
    """Prices a keep mask over atom labels; see the module docstring."""

    def __init__(self, coupling: Coupling, macs_per_node: dict[str, int],
                 scope: tuple[str, ...] = (), batch: int = 1) -> None:
        """``scope``: parameter-name prefixes the params budget counts (e.g. the encoder's);
        empty counts every parameter. ``macs_per_node`` were counted on a batch of ``batch``
        samples; MACs are kept per sample (what ``count_macs`` on one sample and the CLI say)."""
        macs_per_node = {n: m // batch for n, m in macs_per_node.items()}
        self.coupling = coupling
        self.n_labels = int(coupling.label_of.max()) + 1 if len(coupling.label_of) else 0
        records = coupling.record_labels()
        params = {n: p for n, p in coupling.capture.model.named_parameters()
                  if not scope or n.startswith(scope)}
        if not params:
            raise BudgetError(f"no parameter name starts with {scope}; budget_scope takes "
                              "prefixes of model.named_parameters() names, e.g. 'bert.encoder'.")
        self.param_terms: list[tuple[int, list[np.ndarray]]] = []
        tracked = 0
        for name, p in params.items():
            dims = [records[(name, d)] for d in range(p.ndim) if (name, d) in records]
            if dims:
                self.param_terms.append((p.numel(), dims))
                tracked += p.numel()
        dense_params = sum(p.numel() for p in params.values())
        self.fixed_params = dense_params - tracked
        prop = coupling.propagation
        label_of = coupling.label_of
        self.macs_per_node = macs_per_node
        self.factors = {n: [label_of[f.ravel()] for f in prop.mac_factors[n]]
                        for n in macs_per_node if n in prop.mac_factors}
        self.mac_terms = [(macs_per_node[n], fs) for n, fs in self.factors.items()]
        self.fixed_macs = sum(macs_per_node.values()) - sum(m for m, _ in self.mac_terms)
        self.dense = self.cost(np.ones(self.n_labels, dtype=bool))

    def cost(self, keep: np.ndarray) -> Cost:
        params = self.fixed_params + sum(
            n * np.prod([keep[d].mean() for d in dims]) for n, dims in self.param_terms
        )
        macs = self.fixed_macs + sum(
            m * np.prod([keep[f].mean() for f in fs if len(f)]) for m, fs in self.mac_terms
        )
        return Cost(int(round(params)), int(round(macs)))

    def layer_macs(self, keep: np.ndarray) -> dict[str, list[int]]:
        """MACs per layer, ``{module name: [dense, kept]}``: an fx node belongs to the module
        it calls, or to the innermost module whose forward ran it (functions on activations,
        a model's own top-level ops under "(model)")."""
        nodes = {n.name: n for n in self.coupling.capture.graph_module.graph.nodes}
        out: dict[str, list[int]] = {}
        for name, macs in self.macs_per_node.items():
            fs = self.factors.get(name, [])
            kept = macs * np.prod([keep[f].mean() for f in fs if len(f)]) if fs else macs
            entry = out.setdefault(_layer_of(nodes[name]), [0, 0])
            entry[0] += macs
            entry[1] += int(round(kept))
        return out

    def removed(self, keep: np.ndarray, kind: str) -> float:
        return 1.0 - self.cost(keep).of(kind) / max(1, self.dense.of(kind))

    def mask(self, kept: dict[int, np.ndarray]) -> np.ndarray:
        keep = np.ones(self.n_labels, dtype=bool)
        for g in self.coupling.prunable:
            if g.id in kept:
                drop = np.setdiff1d(np.arange(g.atoms), kept[g.id])
                keep[g.labels[drop]] = False
        return keep


def _layer_of(node: Any) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") or "(model)"
