"""Cheap recovery after surgery, with no labels and no gradient steps.

Removing input channels of a layer shifts the distribution of what it writes, so the running
statistics of every BatchNorm below a cut go stale. Re-estimating them on the calibration
batches (a forward pass in train mode with momentum=None, i.e. a cumulative average) is the
standard fix and costs one pass over the calibration data.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from surgery.calibration import split_batch
from surgery.inputs import as_args, to_device


def recalibrate_batchnorm(model: torch.nn.Module, calib_data: Iterable[Any],
                          max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics on ``calib_data``, in place.

    Returns the number of BatchNorm layers updated (0: nothing to do, no pass is run)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    saved = {m: m.momentum for m in norms}
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for b, batch in enumerate(calib_data):
                if max_batches is not None and b >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                args, kwargs = as_args(to_device(inputs, device))
                model(*args, **kwargs)
    finally:
        for m in norms:
            m.momentum = saved[m]
        model.train(was_training)
    return len(norms)
