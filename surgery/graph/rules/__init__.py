"""Built-in channel rules for torch operators and torch.nn layers, registered as a plugin.

Each rule describes how channel ids flow through one op (see :mod:`surgery.graph.propagate`)
and is registered in :data:`~surgery.graph.rules.registry.BUILTIN` by a decorator where it is
written: ``tracks`` (the shared algebra, elementwise, pooling and size ops), ``shapes``
(ops that move, split or join axes), ``layers`` (layers with weights and norms),
``attention`` (products of activations). This module hands the table to the engine through
``surgery_module_rules`` and ``surgery_function_rules``, the same hooks a third-party plugin
uses to teach the engine a new layer.
"""

from __future__ import annotations

from typing import Any, Callable

# importing the rule modules fills the table
from surgery.graph.rules import attention, layers, shapes, tracks  # noqa: F401
from surgery.graph.rules.registry import BUILTIN, RuleTable
from surgery.hookspecs import hookimpl


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    return dict(BUILTIN.modules)


@hookimpl
def surgery_function_rules() -> dict[Any, Callable]:
    return dict(BUILTIN.functions)


__all__ = ["BUILTIN", "RuleTable"]
