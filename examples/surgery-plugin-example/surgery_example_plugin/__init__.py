"""An example surgery plugin: teach the pruning engine the custom ``ScaledLinear`` layer.

surgery freezes every channel that flows through an op it has no rule for, so models built on
``ScaledLinear`` cannot be pruned around it until a plugin explains the layer. This module *is*
the plugin: it is registered under the entry point ``example`` (see ``pyproject.toml``), and
surgery calls its ``@hookimpl`` functions, in pipeline order:

1. ``surgery_leaf_modules``   while tracing: keep each ScaledLinear as one graph node;
2. ``surgery_module_rules``   while propagating channels: how ids flow through that node;
3. ``surgery_frozen_modules`` while propagating channels: modules whose outputs must stay whole;
4. ``surgery_fix_module``     after slicing: refresh the layer's width attributes.

The walk-through is docs/plugin-guide.md.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from surgery.plugins import Consume, Propagation, Track, hookimpl
from surgery_example_plugin.model import GatedBlockNet, ScaledLinear

__all__ = ["GatedBlockNet", "ScaledLinear", "scaled_linear_rule"]


@hookimpl
def surgery_leaf_modules(model: torch.nn.Module) -> list[type]:
    """Trace ``ScaledLinear`` as a single ``call_module`` node instead of walking into its
    ``addmm``: the rule below then describes the layer as a whole."""
    return [ScaledLinear]


def scaled_linear_rule(prop: Propagation, node: fx.Node, module: ScaledLinear) -> None:
    """Channel rule for ``y = x (s * W)^T + b`` (the built-in linear rule, plus ``scale``).

    Every parameter dimension has one integer id per position (``prop.param``); unions say
    "these positions are the same channel, cut them together"; the output's ``Track`` says which
    ids live on which axis of ``y`` so that the layers downstream can read them."""
    name, x = node.target, node.args[0]
    w_out = prop.param(f"{name}.weight", 0)  # one id per output row
    w_in = prop.param(f"{name}.weight", 1)   # one id per input column
    # The ids on x's last axis (the producer's channels; fresh *frozen* ids if untracked, e.g.
    # the raw model input): removing input channel i removes weight column i.
    in_ids = prop.channel_ids(x, -1, "input of a ScaledLinear")
    prop.union(in_ids, w_in)
    # Removing output channel o removes weight row o, bias[o] and scale[o] together.
    prop.union(prop.param(f"{name}.bias", 0), w_out)
    prop.union(prop.param(f"{name}.scale", 0), w_out)
    # Bookkeeping for scoring and budgets: this layer *reads* in_ids on x's last axis (MI
    # scoring observes x there and compensation refits this layer), *writes* w_out, and its
    # MACs scale with the kept fraction of both.
    last = len(prop.shape(x)) - 1
    prop.consumes.append(Consume(node.name, x.name, Track((last,), in_ids)))
    prop.produces[node.name] = w_out
    prop.mac_factors[node.name] = [w_out, in_ids]
    # Output: leading (batch/token) axes keep whatever they carried; the last axis is new.
    others = [t for t in prop.get(x) if t.axes != (last,)]
    prop.set(node, others + [Track((last,), w_out)])


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    """Rules by module type; a rule for a subclass wins over one for its base."""
    return {ScaledLinear: scaled_linear_rule}


@hookimpl
def surgery_frozen_modules(model: torch.nn.Module) -> list[str]:
    """Never cut the outputs of a ScaledLinear named ``head`` (say, an embedding that other
    code stores or compares): its group shows as not prunable, reason ``frozen module head``.
    Hooks run for *every* model, so match only modules this plugin knows."""
    return [name for name, m in model.named_modules()
            if isinstance(m, ScaledLinear) and name.rsplit(".", 1)[-1] == "head"]


@hookimpl
def surgery_fix_module(name: str, module: torch.nn.Module, model: torch.nn.Module) -> None:
    """After slicing, the parameters are smaller but ``in_features``/``out_features`` are stale;
    surgery's own fixers only know torch.nn layers, so set them from the new weight."""
    if isinstance(module, ScaledLinear):
        module.out_features, module.in_features = (int(n) for n in module.weight.shape)

