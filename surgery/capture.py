"""Capture: turn a model into an fx graph annotated with tensor shapes, plus a networkx view.

Why fx: a symbolic trace gives every op with its arguments, which is exactly what the channel
rules need; `ShapeProp` then writes the concrete shape of every value into ``node.meta``, so the
rules can reason about axes (which dimension is the channel one) instead of guessing.
Plugins contribute leaf modules (kept as single ``call_module`` nodes) and functions not to
trace into, the same mechanism timm uses for its own fx support.
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from surgery.modes import restore_modes, training_modes
from surgery.errors import CaptureError, SurgeryError
from surgery.inputs import as_args


class _KnownProxy(fx.Proxy):
    """A proxy of an input or a parameter whose dtype, device and ndim are known while tracing
    (the example input's, the parameter's), so forwards may compare them in Python
    (``if pixel_values.dtype != self.proj.weight.dtype``)."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, example: torch.Tensor) -> None:
        super().__init__(node, tracer)
        self._example_meta = (example.dtype, example.device, example.ndim)

    @property
    def dtype(self) -> torch.dtype:
        return self._example_meta[0]

    @property
    def device(self) -> torch.device:
        return self._example_meta[1]

    @property
    def ndim(self) -> int:
        return self._example_meta[2]


class _Tracer(fx.Tracer):
    """An fx tracer that treats plugin-declared module types as leaves.

    Two generalisations over plain fx, both needed by decorated ``forward(self, ..., **kwargs)``
    signatures (Hugging Face models): with keyword ``inputs`` the root gets exactly one
    placeholder per given input and the model's forward is called with those keywords, so
    parameters left out keep their Python defaults instead of becoming proxies (and an input's
    ``dtype``, ``device`` and ``ndim``, fixed by its example, are plain values); and autowrap
    functions are looked up in the Python module of every submodule's *unwrapped* forward, since
    a decorator's wrapper hides the globals fx would otherwise search."""

    def __init__(
        self,
        leaf_types: tuple[type, ...],
        autowrap: tuple[Callable, ...],
        model: torch.nn.Module | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaf_types = leaf_types
        self._inputs = inputs
        self.constants: dict[str, Any] = {}
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

    def call_module(self, m: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """A stateless module built inside a forward (``nn.ReLU()(x)``) is not installed in the
        model, so fx cannot name it; trace into it instead (it only calls functions)."""
        try:
            self.path_of_module(m)
        except NameError:
            if next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None:
                return forward(*args, **kwargs)
            raise
        return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        if self._inputs is None or not is_module:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names = tuple(self._inputs)
        proxies = []
        for name in names:
            proxy = self.create_proxy("placeholder", name, (), {})
            value = self._inputs[name]
            if isinstance(value, torch.Tensor):  # dtype/device/ndim are fixed by the example
                proxy = _KnownProxy(proxy.node, self, value)
            proxies.append(proxy)

        def call_with_keywords(root: torch.nn.Module, *values: Any) -> Any:
            return root_fn(root, **dict(zip(names, values)))

        return call_with_keywords, [self.root, *proxies]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(out, fx.Proxy) and isinstance(attr_val, torch.Tensor):
            out = _KnownProxy(out.node, self, attr_val)
        return out

    def create_arg(self, a: Any) -> Any:
        """Objects fx cannot write into a graph, and dataclass instances fx would rebuild field
        by field (losing private state: a model config passed to an autowrapped function),
        become constants read by a ``get_attr`` node; see :func:`_graph_module`."""
        if not (dataclasses.is_dataclass(a) and not isinstance(a, type) and not _holds_proxy(a)):
            try:
                return super().create_arg(a)
            except NotImplementedError:
                pass
        for name, value in self.constants.items():
            if value is a:
                break
        else:
            name = f"_surgery_constant_{len(self.constants)}"
            self.constants[name] = a
        return self.create_node("get_attr", name, (), {})


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
    from surgery.plugins import call_hook

    leaves = tuple(leaf_modules) + tuple(
        t for types in call_hook("surgery_leaf_modules", model=model) for t in types
    )
    autowrap = tuple(autowrap_functions) + tuple(
        f for fns in call_hook("surgery_autowrap_functions", model=model) for f in fns
    )
    tracer = _Tracer(leaves, autowrap, model, kwargs if kwargs and not args else None)
    try:
        graph = tracer.trace(model)
    except SurgeryError:
        raise
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}{_trace_location(exc, model)}: "
            f"{type(exc).__name__}: {exc}. "
            + ("Data-dependent control flow is the usual cause. "
               if isinstance(exc, fx.proxy.TraceError) else
               "A function that cannot take traced values (tensors or sizes) is the usual cause. ")
            + "Register the offending submodule type as a leaf through a plugin's "
            "surgery_leaf_modules hook, or pass leaf_modules=."
        ) from exc
    name = type(model).__name__
    gm = _graph_module(tracer, graph, name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ordered = _order_inputs(placeholders, args, kwargs)
    modes = training_modes(model)
    model.eval()
    shape_prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            shape_prop.propagate(*ordered)
    except Exception as exc:
        cause, node = exc.__cause__ or exc, shape_prop.current
        at = f" at node {node.name!r} ({node.op} {node.target})" if node is not None else ""
        raise CaptureError(
            f"running the traced {name} on the example inputs failed{at}: "
            f"{type(cause).__name__}: {cause}. Check that example_inputs match what the model's "
            f"forward expects (given: {_describe_inputs(ordered)})."
        ) from exc
    finally:
        restore_modes(modes)
    return Capture(model, gm, tuple(ordered), {}, _to_digraph(gm))


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when it fails."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _describe_inputs(values: list[Any]) -> str:
    return ", ".join(
        f"{str(v.dtype).removeprefix('torch.')} tensor {tuple(v.shape)}"
        if isinstance(v, torch.Tensor) else type(v).__name__
        for v in values
    ) or "nothing"


def _trace_location(exc: BaseException, model: torch.nn.Module) -> str:
    """Where tracing failed: the innermost submodule whose forward was running (its qualified
    name and type) and the model's own source line that raised, e.g.
    `` in submodule 'block.gate' (Gate) at model.py:12 `if x.sum() > 0:` ``."""
    names = {id(m): n for n, m in model.named_modules()}
    library = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    module, line = None, None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = owner
        if not frame.f_code.co_filename.startswith(library):
            line = (frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    where = ""
    if module is not None:
        name = names[id(module)]
        where = (f" in submodule {name!r} ({type(module).__name__})" if name
                 else f" in {type(module).__name__}.forward")
    if line is not None:
        source = linecache.getline(line[0], line[1]).strip()
        where += f" at {Path(line[0]).name}:{line[1]}" + (f" `{source}`" if source else "")
    return where


def _holds_proxy(obj: Any) -> bool:
    """Whether a traced value (a dataclass, possibly a dict) has a Proxy among its fields."""
    values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    if isinstance(obj, dict):
        values += list(obj.values())
    found = False

    def visit(v: Any) -> None:
        nonlocal found
        found = found or isinstance(v, fx.Proxy)

    fx.node.map_aggregate(values, visit)
    return found


def _graph_module(tracer: _Tracer, graph: fx.Graph, name: str) -> fx.GraphModule:
    """The GraphModule, with the tracer's non-tensor constants as its attributes (they are put
    on the root only while the GraphModule copies them, so the user's model is left as is)."""
    root = tracer.root
    for key, value in tracer.constants.items():
        root.__dict__[key] = value
    try:
        return fx.GraphModule(root, graph, name)
    finally:
        for key in tracer.constants:
            root.__dict__.pop(key, None)


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
