"""Recovery after surgery: BatchNorm re-estimation (no gradients) and a short distillation.

Removing input channels of a layer shifts the distribution of what it writes, so the running
statistics of every BatchNorm below a cut go stale. Re-estimating them on the calibration
batches (a forward pass in train mode with momentum=None, i.e. a cumulative average) is the
standard fix and costs one pass over the calibration data. A short distillation fine-tune
against the dense model's logits (:func:`distill`) goes further, for a budget of steps that
benchmarks give every method alike.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from surgery._core.batches import as_args, split_batch, to_device
from surgery._core.modes import evaluating


def recalibrate_batchnorm(model: torch.nn.Module, calib_data: Iterable[Any],
                          max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics on ``calib_data``, in place.

    Returns the number of BatchNorm layers updated (0: nothing to do, no pass is run)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    saved = {m: m.momentum for m in norms}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with evaluating(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for b, batch in enumerate(calib_data):
                if max_batches is not None and b >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                args, kwargs = as_args(to_device(inputs, device))
                model(*args, **kwargs)
        finally:
            for m in norms:
                m.momentum = saved[m]
    return len(norms)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    lr: float = 1e-4,
    temperature: float = 2.0,
    weight_decay: float = 0.0,
    progress: bool = True,
    on_step: Any = None,
) -> list[float]:
    """A short distillation fine-tune of ``student`` against ``teacher``'s logits, in place.

    Cycles over ``batches`` (inputs, or (inputs, labels) with labels ignored) for ``steps``
    AdamW steps on the KL divergence between temperature-softened outputs. ``on_step(student)``
    is called after each optimiser step (movement pruning accumulates its scores there).
    Returns the loss per step."""
    import itertools

    import torch.nn.functional as F
    from rich.progress import Progress

    from surgery._core.batches import first_tensor

    device = next(student.parameters()).device
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    teacher.eval()
    student.train()
    losses: list[float] = []
    data = itertools.cycle(list(batches))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("distilling", total=steps)
        for _ in range(steps):
            inputs, _ = split_batch(next(data))
            args, kwargs = as_args(to_device(inputs, device))
            with torch.no_grad():
                target = first_tensor(teacher(*args, **kwargs)).float()
            out = first_tensor(student(*args, **kwargs)).float()
            loss = F.kl_div(F.log_softmax(out / temperature, -1),
                            F.softmax(target / temperature, -1),
                            reduction="batchmean") * temperature ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(student)
            losses.append(loss.item())
            bar.advance(task)
    student.eval()
    return losses
