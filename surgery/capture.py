"""Capture: turn a model into an fx graph annotated with tensor shapes, plus a networkx view.

Why fx: a symbolic trace gives every op with its arguments, which is exactly what the channel
rules need; `ShapeProp` then writes the concrete shape of every value into ``node.meta``, so the
rules can reason about axes (which dimension is the channel one) instead of guessing.
Plugins contribute leaf modules (kept as single ``call_module`` nodes) and functions not to
trace into, the same mechanism timm uses for its own fx support.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from surgery.errors import CaptureError
from surgery.inputs import as_args


class _Tracer(fx.Tracer):
    """An fx tracer that treats plugin-declared module types as leaves.

    Two generalisations over plain fx, both needed by decorated ``forward(self, ..., **kwargs)``
    signatures (Hugging Face models): with ``input_names`` the root gets exactly one placeholder
    per given keyword input and the model's forward is called with those keywords, so
    parameters left out keep their Python defaults instead of becoming proxies; and autowrap
    functions are looked up in the Python module of every submodule's *unwrapped* forward, since
    a decorator's wrapper hides the globals fx would otherwise search."""

    def __init__(
        self,
        leaf_types: tuple[type, ...],
        autowrap: tuple[Callable, ...],
        model: torch.nn.Module | None = None,
        input_names: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaf_types = leaf_types
        self._input_names = input_names
        if autowrap and model is not None and hasattr(self, "_autowrap_search"):
            seen = {id(m) for m in self._autowrap_search}
            for sub in model.modules():
                fn = inspect.unwrap(getattr(type(sub), "forward", None) or (lambda: None))
                mod = sys.modules.get(getattr(fn, "__module__", "") or "")
                if mod is not None and id(mod) not in seen:
                    seen.add(id(mod))
                    self._autowrap_search.append(mod)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        if self._input_names is None or not is_module:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names = self._input_names
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in names]

        def call_with_keywords(root: torch.nn.Module, *values: Any) -> Any:
            return root_fn(root, **dict(zip(names, values)))

        return call_with_keywords, [self.root, *proxies]


@dataclass
class Capture:
    """A traced model: the fx ``GraphModule`` (sharing parameters with the model), the example
    inputs it was traced and shape-propagated with, and a networkx ``DiGraph`` of its nodes."""

    model: torch.nn.Module
    graph_module: fx.GraphModule
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    digraph: nx.DiGraph = field(repr=False)

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph_module.graph.nodes)

    def module(self, target: str) -> torch.nn.Module:
        return self.graph_module.get_submodule(target)


def _to_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """A networkx view: one vertex per fx node (name), edges from producer to user."""
    g = nx.DiGraph()
    for order, node in enumerate(gm.graph.nodes):
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else None
        g.add_node(node.name, op=node.op, target=str(node.target), shape=shape, order=order)
        for parent in node.all_input_nodes:
            g.add_edge(parent.name, node.name)
    return g


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> Capture:
    """Symbolically trace ``model`` and annotate every node with its output shape.

    ``example_inputs`` is a tensor, a tuple of positional tensors, or a dict of keyword tensors;
    it fixes the shapes that ShapeProp records. The model is not modified.
    """
    args, kwargs = as_args(example_inputs)
    from surgery.plugins import plugin_manager

    pm = plugin_manager()
    leaves = tuple(leaf_modules) + tuple(
        t for types in pm.hook.surgery_leaf_modules(model=model) for t in types
    )
    autowrap = tuple(autowrap_functions) + tuple(
        f for fns in pm.hook.surgery_autowrap_functions(model=model) for f in fns
    )
    tracer = _Tracer(leaves, autowrap, model, tuple(kwargs) if kwargs and not args else None)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Data-dependent control flow is the usual cause. Register the offending submodule "
            "type as a leaf through a plugin's surgery_leaf_modules hook, or pass leaf_modules=."
        ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ordered = _order_inputs(placeholders, args, kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*ordered)
    except Exception as exc:
        raise CaptureError(
            f"running the traced {name} on the example inputs failed: {type(exc).__name__}: "
            f"{exc}. Check that example_inputs match what the model's forward expects."
        ) from exc
    finally:
        model.train(was_training)
    return Capture(model, gm, tuple(ordered), {}, _to_digraph(gm))


def _order_inputs(
    placeholders: list[fx.Node], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """Map positional and keyword example inputs onto the graph's placeholders in order.

    Placeholders not given keep their default value (fx records it in ``node.args``)."""
    values: list[Any] = []
    for i, ph in enumerate(placeholders):
        name = ph.target.lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif ph.args:
            values.append(ph.args[0])
        else:
            raise CaptureError(
                f"the model's forward needs an input named {name!r} that example_inputs does not "
                "give; pass it positionally or in a dict."
            )
    return values
