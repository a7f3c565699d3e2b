"""Recovery after surgery: BatchNorm re-estimation (no gradients) and a short distillation.

Removing input channels of a layer shifts the distribution of what it writes, so the running
statistics of the BatchNorms below it go stale (:func:`stale_batchnorms` says which).
Re-estimating them on the calibration batches (a forward pass in train mode with
momentum=None, i.e. a cumulative average) is the standard fix and costs one pass over the
calibration data. A short distillation fine-tune
against the dense model's logits (:func:`distill`) goes further, for a budget of steps that
benchmarks give every method alike.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from surgery._core.batches import as_args, split_batch, to_device
from surgery._core.modes import evaluating


def stale_batchnorms(coupling: Any, plan: Any) -> set[str]:
    """The BatchNorms whose input values the cut changes, by module name.

    A layer that *reads* a cut group computes something else (fewer inputs, and compensation
    refits it), and so does a norm that normalises *across* a cut axis (LayerNorm, GroupNorm);
    a layer that only *writes* a cut group keeps the values of its kept channels, and a
    BatchNorm is per channel. Every BatchNorm downstream of a changed node in the graph, and
    only those, has stale statistics; the others keep theirs (a plan that cuts nothing
    touches none)."""
    cut = {d.id for d in plan.groups if len(d.kept) < d.atoms}
    gm = coupling.capture.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = [nodes[r.layer] for r in coupling.relations if r.group in cut]
    across = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for gid in cut:
        owners = {p.rpartition(".")[0] for p, _ in coupling.groups[gid].slices}
        changed += [n for n in gm.graph.nodes if n.op == "call_module" and n.target in owners
                    and isinstance(gm.get_submodule(n.target), across)]
    seen: set[str] = set()
    stack = list(changed)
    while stack:
        node = stack.pop()
        if node.name not in seen:
            seen.add(node.name)
            stack.extend(node.users)
    return {nodes[name].target for name in seen if nodes[name].op == "call_module"
            and isinstance(gm.get_submodule(nodes[name].target),
                           torch.nn.modules.batchnorm._BatchNorm)}


def recalibrate_batchnorm(model: torch.nn.Module, calib_data: Iterable[Any],
                          max_batches: int | None = None, *,
                          only: Iterable[str] | None = None) -> int:
    """Re-estimate BatchNorm running statistics on ``calib_data``, in place: every BatchNorm,
    or those named in ``only`` (see :func:`stale_batchnorms`).

    Returns the number of BatchNorm layers updated (0: nothing to do, no pass is run)."""
    names = None if only is None else set(only)
    norms = [m for n, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and (names is None or n in names)]
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
    after_backward: Any = None,
    on_step: Any = None,
) -> list[float]:
    """A short distillation fine-tune of ``student`` against ``teacher``'s logits, in place.

    Cycles over ``batches`` (inputs, or (inputs, labels) with labels ignored) for ``steps``
    AdamW steps on the KL divergence between temperature-softened outputs.
    ``after_backward(student)`` runs once the gradients are there, before the optimiser step,
    and ``on_step(student)`` after it (movement pruning reads the gradients of the masked
    weights in the first and masks again in the second). Returns the loss per step."""
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
            if after_backward is not None:
                after_backward(student)
            opt.step()
            if on_step is not None:
                on_step(student)
            losses.append(loss.item())
            bar.advance(task)
    student.eval()
    return losses
