"""ONNX export of a (pruned) model, checked by running it in onnxruntime.

``torch.onnx.export`` writes the file (the dynamo exporter, with a dynamic batch dimension;
the TorchScript exporter when that fails), then onnxruntime runs it on fresh inputs and every
output is compared with PyTorch's: a max absolute difference above ``atol`` is an error, so a
file this module wrote is known to compute what the PyTorch model computes.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery._core.batches import as_args, call
from surgery._core.modes import evaluating
from surgery.errors import ExportError


@dataclass
class ExportResult:
    path: Path
    exporter: str
    max_abs_diff: float
    outputs: int
    dynamic_batch: bool


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def _flat_inputs(example: Any) -> tuple[list[str], list[torch.Tensor]]:
    args, kwargs = as_args(example)
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    return names, [*args, *kwargs.values()]


def _export(model: torch.nn.Module, example: Any, path: Path, opset: int | None,
            dynamic_batch: bool) -> str:
    args, kwargs = as_args(example)
    names, _ = _flat_inputs(example)
    errors = []
    quiet = contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        try:
            dynamic: Any = None
            if dynamic_batch and not (args and kwargs):
                spec = {0: torch.export.Dim.DYNAMIC}
                dynamic = {k: spec for k in kwargs} if kwargs else tuple(spec for _ in args)
            torch.onnx.export(model, tuple(args), str(path), kwargs=kwargs or None, dynamo=True,
                              dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                              input_names=names)
            return "dynamo"
        except Exception as exc:  # fall back to the TorchScript exporter
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:300]}")
            path.unlink(missing_ok=True)
        try:
            axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
            torch.onnx.export(model, tuple(args) + ((kwargs,) if kwargs else ()), str(path),
                              dynamo=False, input_names=names, dynamic_axes=axes,
                              opset_version=opset or 17)
            return "torchscript"
        except Exception as exc:
            errors.append(f"torchscript: {type(exc).__name__}: {str(exc)[:300]}")
            path.unlink(missing_ok=True)
    raise ExportError("torch.onnx.export failed with both exporters: " + "; ".join(errors))


def check_onnx(path: str | os.PathLike, model: torch.nn.Module, inputs: Any, *,
               atol: float = 1e-4) -> tuple[float, int]:
    """Run ``path`` in onnxruntime on ``inputs`` and compare every output with ``model``'s.

    Returns ``(max_abs_diff, outputs compared)``; raises :class:`ExportError` above ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("onnxruntime is needed to check the export: "
                          "pip install 'model-surgery[report]'.") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names, tensors = _flat_inputs(inputs)
    by_name = dict(zip(names, tensors))
    feed = {}
    graph_inputs = session.get_inputs()
    for i, gi in enumerate(graph_inputs):
        t = by_name.get(gi.name, tensors[i] if i < len(tensors) else None)
        if t is None:
            raise ExportError(f"the ONNX graph wants input {gi.name!r}, which the example lacks.")
        feed[gi.name] = t.detach().cpu().numpy()
    got = session.run(None, feed)
    with evaluating(model), torch.no_grad():
        want = _flat_tensors(call(model, inputs))
    if len(got) < 1 or len(want) < 1:
        raise ExportError("nothing to compare: the model or the ONNX graph returned no tensor.")
    worst = 0.0
    for i, (w, g) in enumerate(zip(want, got)):
        w = w.detach().cpu().float()
        g = torch.as_tensor(g).float()
        if tuple(w.shape) != tuple(g.shape):
            raise ExportError(f"output {i}: ONNX shape {tuple(g.shape)} differs from PyTorch's "
                              f"{tuple(w.shape)}.")
        worst = max(worst, (w - g).abs().max().item() if w.numel() else 0.0)
    if not worst <= atol:
        raise ExportError(f"the ONNX model disagrees with PyTorch: max abs diff {worst:.3g} > "
                          f"{atol:g} ({path}).")
    return worst, min(len(want), len(got))


def _batch_is_dynamic(path: Path) -> bool:
    """Whether every graph input's first dimension is symbolic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [i.type.tensor_type.shape.dim for i in graph.input]
    return bool(dims) and all(len(d) > 0 and d[0].dim_param for d in dims)


def export_onnx(model: torch.nn.Module, example: Any, path: str | os.PathLike, *,
                check_inputs: Any = None, atol: float = 1e-4, opset: int | None = None,
                dynamic_batch: bool = True) -> ExportResult:
    """Export ``model`` (moved to CPU, eval mode) to ``path`` and check it in onnxruntime on
    ``check_inputs`` (default: ``example``). The file is written atomically: on any error
    nothing is left at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.onnx")
    model = model.cpu().eval()
    try:
        exporter = _export(model, example, tmp, opset, dynamic_batch)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():  # external weights: load them into one self-contained file
            import onnx

            onnx.save_model(onnx.load(str(tmp)), str(tmp), save_as_external_data=False)
            data.unlink()
        dynamic = dynamic_batch and _batch_is_dynamic(tmp)
        batched = check_inputs if check_inputs is not None and dynamic else example
        diff, outputs = check_onnx(tmp, model, batched, atol=atol)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    return ExportResult(path, exporter, diff, outputs, dynamic)
