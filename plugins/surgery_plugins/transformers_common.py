"""What the transformer plugins share: group kinds (head, neuron, hidden), the FFN layers
of a model, default per-kind cut rates.

The attention and embedding leaves they describe are engine rules
(:mod:`surgery.graph.rules.leaves`); this module is the transformer-specific part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn

from surgery.graph.rules.leaves import HeadLayout

TRANSFORMER_KIND_WEIGHTS = {"neuron": 1.0, "head": 0.5, "hidden": 0.1}
"""Default cut rates of an encoder's kinds: FFN neurons fastest, heads at half their rate,
hidden dims (every matrix's width) at a tenth. Chosen on all-MiniLM-L6-v2 with calibration
data only: among the candidates ``kind_weights="search"`` tried at 75% of encoder parameters
removed, it moved the output least (relative squared error 0.25 vs 0.61 for equal rates);
see docs/benchmarks/minilm_rotten_tomatoes.md for what it gives on the test set."""


def transformer_kind_weights(kinds: list[str]) -> dict[str, float] | None:
    """:data:`TRANSFORMER_KIND_WEIGHTS` for the kinds present, when there are two or more."""
    present = {k: w for k, w in TRANSFORMER_KIND_WEIGHTS.items() if k in kinds}
    return present if len(present) > 1 else None


@dataclass
class KindMap:
    """Parameter dimensions that identify a group's kind in one model."""

    head: set[tuple[str, int]] = field(default_factory=set)
    neuron: set[tuple[str, int]] = field(default_factory=set)

    def kind(self, keys: Iterable[tuple[str, int]], model: nn.Module) -> str | None:
        keys = list(keys)
        if any(k in self.head for k in keys):
            return "head"
        if any(k in self.neuron for k in keys):
            return "neuron"
        modules = dict(model.named_modules())
        owners = {k: modules.get(k[0].rpartition(".")[0]) for k in keys}
        if any(isinstance(m, nn.LayerNorm) or (isinstance(m, nn.Embedding) and d == 1)
               for (_, d), m in owners.items()):
            return "hidden"
        writers = [m for (p, d), m in owners.items() if d == 0 and p.endswith(".weight")]
        if writers and all(isinstance(m, nn.Linear) for m in writers):
            return "neuron"
        return None


def head_keys(name: str, layout: HeadLayout) -> set[tuple[str, int]]:
    return {(f"{name}.{layout.first_projection()}.weight", 0)}


_FFN_FIRST = (("Intermediate", "dense"), ("FFN", "lin1"), ("MLP", "fc1"), ("Mlp", "fc1"))


def ffn_first_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The first linear of every transformer feed-forward block, in model order (BERT's
    ``*Intermediate.dense``, DistilBERT's ``FFN.lin1``, ViT/timm ``MLP.fc1``)."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        for suffix, child in _FFN_FIRST:
            sub = getattr(module, child, None)
            if cls.endswith(suffix) and isinstance(sub, nn.Linear):
                found.append((f"{name}.{child}" if name else child, sub))
                break
    return found


def is_module_of(model: nn.Module, prefixes: tuple[str, ...]) -> bool:
    """Whether any submodule's class comes from a Python package starting with ``prefixes``."""
    return any(type(m).__module__.startswith(prefixes) for m in model.modules())


__all__ = ["TRANSFORMER_KIND_WEIGHTS", "transformer_kind_weights", "KindMap", "head_keys",
           "ffn_first_linears", "is_module_of"]
