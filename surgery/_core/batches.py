"""Normalising the shapes users give inputs in: a tensor, a tuple, or a dict of keywords."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map_only


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


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Every tensor in a (nested) batch moved to ``device``."""
    return tree_map_only(torch.Tensor, lambda v: v.to(device), inputs)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor found in a nested output (tensor, tuple, dict, ModelOutput)."""
    return next((v for v in tree_leaves(value) if isinstance(v, torch.Tensor)), None)


def rows(value: Any) -> int:
    """The batch size of a nested batch: the first tensor's leading dim (0: no tensor)."""
    t = first_tensor(value)
    return int(t.shape[0]) if t is not None and t.ndim else 0


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
