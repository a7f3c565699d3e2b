"""RuleTable: channel rules registered where they are written, by decorators.

A rule is ``rule(prop, node)`` for a function or tensor method and ``rule(prop, node, module)``
for a module type (see :mod:`surgery.graph.propagate`). A table collects them by what they
describe; a plugin hands ``table.modules`` and ``table.functions`` to the engine from its
``surgery_module_rules`` / ``surgery_function_rules`` hooks, as the built-in table
(:data:`BUILTIN`) does.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

_Rule = TypeVar("_Rule", bound=Callable[..., None])


class RuleTable:
    """Rules by module type (``modules``) and by function or ``"Tensor.method"`` name
    (``functions``). Registering a second rule for the same key is an error: which one wins
    would otherwise depend on import order."""

    def __init__(self) -> None:
        self.modules: dict[type, Callable[..., None]] = {}
        self.functions: dict[Any, Callable[..., None]] = {}

    def module(self, *types: type) -> Callable[[_Rule], _Rule]:
        """Decorator: ``rule`` describes modules of these types (and their subclasses)."""
        return self._adder(self.modules, types)

    def function(self, *targets: Any) -> Callable[[_Rule], _Rule]:
        """Decorator: ``rule`` describes calls of these functions or ``"Tensor.name"``
        methods."""
        return self._adder(self.functions, targets)

    @staticmethod
    def _adder(table: dict, keys: tuple) -> Callable[[_Rule], _Rule]:
        def add(rule: _Rule) -> _Rule:
            for key in keys:
                if key in table and table[key] is not rule:
                    raise ValueError(f"two channel rules for {key!r}: {table[key].__name__} "
                                     f"and {rule.__name__}")
                table[key] = rule
            return rule

        return add


BUILTIN = RuleTable()
"""The engine's own rules for torch operators and torch.nn layers."""
