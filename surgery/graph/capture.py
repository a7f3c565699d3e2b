"""Capture: turn a model into an fx graph annotated with tensor shapes.

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
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from surgery._core.batches import as_args
from surgery._core.modes import evaluating
from surgery.errors import CaptureError, SurgeryError


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
    a decorator's wrapper hides the globals fx would otherwise search. Positional inputs are
    traced the same way when the signature allows it (:func:`_as_keywords`). And a branch on
    sizes, dtypes or devices takes the way the example inputs take (:meth:`to_bool`)."""

    def __init__(
        self,
        leaf_types: tuple[type, ...],
        autowrap: tuple[Callable, ...],
        model: torch.nn.Module | None = None,
        inputs: dict[str, Any] | None = None,
        fixed: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaf_types = leaf_types
        self._inputs = inputs
        self._fixed = dict(fixed or {})
        self.constants: dict[str, Any] = {}
        if autowrap and model is not None and hasattr(self, "_autowrap_search"):
            seen = {id(m) for m in self._autowrap_search}
            for sub in model.modules():
                fn = inspect.unwrap(getattr(type(sub), "forward", None) or (lambda: None))
                mod = sys.modules.get(getattr(fn, "__module__", "") or "")
                if mod is not None and id(mod) not in seen:
                    seen.add(id(mod))
                    self._autowrap_search.append(mod)

    # ---- control flow on traced values: decided by the example inputs -------------------
    example: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    """The example inputs (set by :func:`trace`). When a forward branches on a traced value
    (``if H % self.patch_size:``, ``if x.ndim == 4:``), plain fx gives up; this tracer runs the
    graph recorded so far on the example inputs, once and only then, and takes the branch
    the example takes. The graph is only used to analyse the model at the example's shapes
    (the pruned model runs its own code), so specialising it to them is sound."""

    def _concrete(self, target: fx.Node) -> Any:
        values = self.__dict__.setdefault("_values", {})
        if target in values:
            return values[target]
        if self.example is None:
            return _UNKNOWN
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        try:  # copies: an in-place op in the forward must not change the user's tensors
            inputs = {ph: v.clone() if isinstance(v, torch.Tensor) else v for ph, v in
                      zip(placeholders, _order_inputs(placeholders, *self.example))}
        except SurgeryError:
            inputs = {}
        # fx patches Module.__call__ and wrapped functions while tracing: undo that meanwhile
        unpatched = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
        if unpatched is None:
            return _UNKNOWN
        with unpatched():
            for node in self.graph.nodes:
                if node in values:
                    continue
                values[node] = self._evaluate(node, values, inputs)
                if node is target:
                    break
        return values.get(target, _UNKNOWN)

    def _evaluate(self, node: fx.Node, values: dict, inputs: dict) -> Any:
        unknown = False

        def value(n: fx.Node) -> Any:
            nonlocal unknown
            v = values.get(n, _UNKNOWN)
            unknown = unknown or v is _UNKNOWN
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if unknown:
            return _UNKNOWN
        try:
            with torch.no_grad():
                if node.op == "placeholder":
                    return inputs.get(node, _UNKNOWN)
                if node.op == "get_attr":
                    if node.target in self.constants:
                        return self.constants[node.target]
                    return operator.attrgetter(str(node.target))(self.root)
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    module = self.root.get_submodule(node.target)
                    was_training = module.training
                    module.eval()  # no running statistics updated by this look-ahead
                    try:
                        return module(*args, **kwargs)
                    finally:
                        module.train(was_training)
        except Exception:
            return _UNKNOWN
        return _UNKNOWN

    def _on_sizes_only(self, node: fx.Node) -> bool:
        """Whether ``node`` depends on the inputs through their sizes, dtypes and devices only:
        a branch on tensor *values* (``if x.sum() > 0``) could go the other way on other
        inputs, so it is not specialised."""
        values = self.__dict__.get("_values", {})
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if (n.op == "call_function" and n.target is getattr and n.args[1:2]
                    and n.args[1] in _METADATA) or (n.op == "call_method"
                                                    and n.target in _METADATA_METHODS):
                continue
            if isinstance(values.get(n), torch.Tensor):
                return False
            stack.extend(n.all_input_nodes)
        return True

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._concrete(obj.node)
        if value is _UNKNOWN or isinstance(value, torch.Tensor) \
                or not self._on_sizes_only(obj.node):
            return super().to_bool(obj)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Any:
        value = self._concrete(obj.node)
        try:
            n = len(value)
        except TypeError:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])

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

        fixed = {k: v for k, v in self._fixed.items() if k not in names}

        def call_with_keywords(root: torch.nn.Module, *values: Any) -> Any:
            return root_fn(root, **fixed, **dict(zip(names, values)))

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


_UNKNOWN = object()
"""A traced value the look-ahead could not compute."""
_METADATA = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "type"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})


@dataclass
class Capture:
    """A traced model: the fx ``GraphModule`` (sharing parameters with the model, every node
    annotated with its output shape in ``node.meta["tensor_meta"]``) and the example inputs it
    was traced and shape-propagated with, one per placeholder."""

    model: torch.nn.Module
    graph_module: fx.GraphModule
    example_args: tuple[Any, ...]


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
    from surgery.plugins._manager import call_hook

    declared = tuple(t for types in call_hook("surgery_leaf_modules", model=model) for t in types)
    autowrap = tuple(autowrap_functions) + tuple(
        f for fns in call_hook("surgery_autowrap_functions", model=model) for f in fns
    )
    inputs = kwargs if kwargs and not args else (_as_keywords(model, args) if not kwargs else None)
    fixed = _trace_kwargs(model, call_hook("surgery_trace_kwargs", model=model))
    # A plugin's leaf without a channel rule would be opaque (every channel through it
    # frozen): trace into it first, and keep it whole only if that fails (timm marks blocks
    # with shape-dependent branches as leaves; the look-ahead of _Tracer.to_bool handles most).
    from surgery.plugins._manager import merged

    rules = merged(call_hook("surgery_module_rules"))
    ruled = tuple(t for t in declared if any(c in rules for c in t.__mro__))
    attempts = [tuple(leaf_modules) + declared]
    if len(ruled) < len(declared):
        attempts.insert(0, tuple(leaf_modules) + ruled)
    failure: Exception | None = None
    for leaves in attempts:
        tracer = _Tracer(leaves, autowrap, model, inputs, fixed)
        tracer.example = (args, kwargs)
        try:
            graph = tracer.trace(model)
            failure = None
            break
        except SurgeryError:
            raise
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            failure = exc
    if failure is not None:
        exc = failure
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
    shape_prop = _ShapeProp(gm)
    try:
        with evaluating(model), torch.no_grad():
            shape_prop.propagate(*ordered)
    except Exception as exc:
        node = shape_prop.current
        at = f" at node {node.name!r} ({node.op} {node.target})" if node is not None else ""
        what = str(exc).split("\n\nWhile executing")[0]  # fx appends the node and graph
        raise CaptureError(
            f"running the traced {name} on the example inputs failed{at}: "
            f"{type(exc).__name__}: {what}. Check that example_inputs match what the model's "
            f"forward expects (given: {_describe_inputs(ordered)})."
        ) from exc
    return Capture(model, gm, tuple(ordered))


def _as_keywords(model: torch.nn.Module, args: tuple[Any, ...]) -> dict[str, Any] | None:
    """Positional example inputs by the names of ``forward``'s leading parameters, so they are
    traced like keyword inputs: parameters not given keep their defaults (``mask=None`` stays
    None rather than becoming a traced input that ``if mask is not None`` takes for given).
    None when the signature does not allow it (``*args``, positional-only parameters)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not args or len(params) < len(args):
        return None
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[: len(args)]):
        return None
    return {p.name: a for p, a in zip(params, args)}


def _trace_kwargs(model: torch.nn.Module, answers: list[dict[str, Any] | None]
                  ) -> dict[str, Any]:
    """The keyword arguments plugins fix for tracing (``surgery_trace_kwargs``), those the
    forward names as parameters: a ``**kwargs`` catch-all might hand them to code that does
    not expect them."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    fixed: dict[str, Any] = {}
    for answer in reversed(answers):  # later registrations (third parties) win
        fixed.update({k: v for k, v in (answer or {}).items() if k in params
                      and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                             inspect.Parameter.KEYWORD_ONLY)})
    return fixed


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when it fails, and lets the
    failure propagate as it is: ShapeProp's own ``run_node`` prints the whole traceback to
    stderr before re-raising, which a user would see above the :class:`CaptureError` that
    says what to do. Without fake tensors (never used here) the metadata is the same."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = fx.Interpreter.run_node(self, n)
        found = False

        def meta(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        tensor_meta = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)
        return result


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
