"""Normalising the shapes users give inputs in: a tensor, a tuple, or a dict of keywords."""

from __future__ import annotations

from typing import Any

import torch


def as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split example inputs into ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call(model: torch.nn.Module, inputs: Any) -> Any:
    """Run ``model`` on inputs given in any of the accepted shapes."""
    args, kwargs = as_args(inputs)
    return model(*args, **kwargs)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor found in a nested output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        for v in value.values():
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A calibration batch is ``inputs``, ``(inputs, labels)``, or a dict with ``labels``."""
    if isinstance(batch, dict):
        batch = dict(batch)
        labels = batch.pop("labels", None)
        return batch, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and batch[1].dtype in (torch.int64, torch.int32, torch.long) and batch[1].ndim == 1:
        return batch[0], batch[1]
    return batch, None
