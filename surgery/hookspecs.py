"""Every hook a surgery plugin may implement, in one file.

A plugin is any module or object with functions decorated by ``surgery.hookimpl``; it is
registered through the ``surgery`` entry-point group (third parties) or by the host itself
(built-ins, which use exactly these hooks). Hooks are called with keyword arguments, and a
plugin implements only the hooks it needs, taking only the arguments it needs.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy
import torch

hookspec = pluggy.HookspecMarker("surgery")
hookimpl = pluggy.HookimplMarker("surgery")


@hookspec
def surgery_leaf_modules(model: torch.nn.Module) -> list[type]:
    """Module types fx must not trace into for ``model`` (kept as one ``call_module`` node).

    Return types whose forward has data-dependent control flow, or whose channel behaviour a
    rule describes as a whole (see ``surgery_module_rules``)."""


@hookspec
def surgery_autowrap_functions(model: torch.nn.Module) -> list[Callable]:
    """Free functions fx should record as single calls instead of tracing into."""


@hookspec
def surgery_trace_kwargs(model: torch.nn.Module) -> dict[str, Any] | None:
    """Keyword arguments the model's forward is traced with, besides the example inputs, and
    fixed in the graph (e.g. ``{"use_cache": False}``).

    The graph only analyses one forward at the example's shapes: state the forward would build
    for later calls (a key/value cache) must not become part of it, or every calibration pass
    would grow it. Applied when the example inputs are given by name (a dict, or positional
    inputs fx maps to names) and the forward takes that keyword; an example input of the same
    name wins. The pruned model runs its own forward, unaffected."""


@hookspec
def surgery_module_rules() -> dict[type, Callable]:
    """Channel rules for module types: ``{ModuleType: rule}``.

    A rule is ``rule(prop, node, module)``; it reads the channel tracks of the node's inputs
    from ``prop`` (a :class:`surgery.propagate.Propagation`) and sets the node's output tracks.
    Rules for subclasses win over rules for their bases."""


@hookspec
def surgery_function_rules() -> dict[Any, Callable]:
    """Channel rules for functions and tensor methods: ``{callable_or_method_name: rule}``."""


@hookspec
def surgery_frozen_modules(model: torch.nn.Module) -> list[str]:
    """Qualified names of modules whose output channels must never be cut (beyond the
    model's outputs, which are always kept)."""


@hookspec(firstresult=True)
def surgery_group_kind(group: Any, model: torch.nn.Module) -> str | None:
    """The kind of a channel group (a :class:`surgery.groups.ChannelGroup`) of ``model``, or
    None to leave it to other plugins (default ``"channel"``).

    Kinds name what an atom is, for reports and per-kind budgets: ``"channel"`` (a conv
    channel), ``"head"`` (one attention head: its q/k/v rows and output-projection columns),
    ``"neuron"`` (one hidden unit of an MLP/FFN), ``"hidden"`` (one residual-stream dimension of
    a transformer, through embeddings, every norm and every projection). The first plugin
    returning a kind wins."""


@hookspec(firstresult=True)
def surgery_kind_weights(model: torch.nn.Module, kinds: list[str]) -> dict[str, float] | None:
    """Default per-kind cut rates for ``model`` whose prunable groups have ``kinds``, or None
    (every kind at the same rate). See ``kind_weights`` in :func:`surgery.prune`: a kind with
    weight ``w`` loses ``w`` times the share of atoms a weight-1 kind loses. The first plugin
    returning weights wins; ``kind_weights=`` in the call overrides them."""


@hookspec(firstresult=True)
def surgery_config_limits(model: torch.nn.Module, groups: list[Any]) -> dict[int, str] | None:
    """Which of ``model``'s prunable ``groups`` its own config cannot express once cut, for a
    model whose config describes its widths (a Hugging Face model saved as config.json plus
    weights): ``{group.id: reason}``, ``{}`` when the config expresses them all, None when the
    plugin does not know ``model`` (the first answer wins).

    Asked only under ``uniform_widths=True``, where every layer keeps the same width per kind,
    so the question is whether a config field holds that width: a BERT config derives the head
    size from ``hidden_size``, so its heads and hidden dims cannot be cut (the reason says so,
    e.g. "kind 'head' cannot be written in a plain BertConfig: it derives the head size from
    hidden_size"), and a pooler's neurons have no field of their own. The groups named become
    unprunable with that reason; the pruned model then rebuilds from its updated config."""


@hookspec
def surgery_fix_module(name: str, module: torch.nn.Module, model: torch.nn.Module) -> None:
    """Update ``module``'s attributes after its parameters were sliced (e.g. ``num_heads``).

    Called for every module whose parameters or buffers changed shape; the built-in fixes for
    torch.nn layer types have already run."""


@hookspec
def surgery_fix_model(model: torch.nn.Module) -> None:
    """Update model-level state (configs) after all modules were fixed."""


@hookspec
def surgery_criteria() -> dict[str, Callable]:
    """New scoring criteria: ``{name: factory}``; see :mod:`surgery.criteria`."""


@hookspec
def surgery_estimators() -> dict[str, Callable]:
    """New mutual-information estimators: ``{name: factory}``; see :mod:`surgery.estimators`."""
