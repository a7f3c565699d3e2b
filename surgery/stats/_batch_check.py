"""Checking calibration batches against the inputs the model was traced with, so a wrong
batch is refused with a description of what is expected instead of failing deep in a layer."""

from __future__ import annotations

from typing import Any

import torch

from surgery._core.batches import as_args
from surgery.errors import CalibrationError


def _example_inputs(capture: Any) -> list[tuple[str, Any]]:
    """(name, example value) for every input of the traced model, in order."""
    placeholders = [n for n in capture.graph_module.graph.nodes if n.op == "placeholder"]
    return [(ph.target.lstrip("*"), v) for ph, v in zip(placeholders, capture.example_args)]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = ", ".join(["N", *map(str, value.shape[1:])]) if value.ndim else ""
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape ({dims})"
    text = repr(value)
    return f"a {type(value).__name__} ({text[:40] + '...' if len(text) > 40 else text})"


def expected_inputs(capture: Any) -> str:
    """What a calibration batch must hold, from the example inputs the model was traced with:
    ``x = a float32 tensor of shape (N, 3, 32, 32)``."""
    parts = [f"{name} = {_describe(v)}" for name, v in _example_inputs(capture)
             if isinstance(v, torch.Tensor)]
    return "; ".join(parts) or "no tensor inputs"


def check_batch(b: int, inputs: Any, capture: Any) -> None:
    """Refuse a calibration batch whose inputs cannot be what the model was traced with: wrong
    count or names, not tensors, integer where floating point is expected (or the reverse), a
    different number of dims, or NaN/inf values. Other mismatches (a channel count) surface
    when the batch runs, with the same description of what is expected."""
    expected = _example_inputs(capture)
    args, kwargs = as_args(inputs)
    problems = []
    if len(args) > len(expected):
        problems.append(f"it gives {len(args)} positional inputs and the model takes "
                        f"{len(expected)}")
    names = {name for name, _ in expected}
    problems += [f"it gives an unknown keyword input {k!r}" for k in kwargs if k not in names]
    for i, (name, example) in enumerate(expected):
        if not isinstance(example, torch.Tensor):
            continue
        got = args[i] if i < len(args) else kwargs.get(name, _MISSING)
        if got is _MISSING:
            problems.append(f"input {name!r} is missing")
        elif not isinstance(got, torch.Tensor):
            problems.append(f"input {name!r} is {_describe(got)}, not a tensor")
        elif got.is_floating_point() != example.is_floating_point():
            kind = "a floating-point" if got.is_floating_point() else "an integer/bool"
            problems.append(f"input {name!r} is {kind} tensor ({str(got.dtype)[6:]})")
        elif got.ndim != example.ndim:
            problems.append(f"input {name!r} has {got.ndim} dims, shape {tuple(got.shape)}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            problems.append(f"input {name!r} contains NaN or inf values")
    if problems:
        raise CalibrationError(
            f"calibration batch {b} does not match the model's inputs: {'; '.join(problems)}. "
            f"Expected {expected_inputs(capture)} (as example_inputs; only the batch size N may "
            "differ). A batch is the inputs, (inputs, labels) with labels a 1-D integer tensor, "
            "or a dict of keyword inputs (with an optional 'labels')."
        )


_MISSING = object()
