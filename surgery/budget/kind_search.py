"""How fast each kind of group is cut: a search on the pruned model's own output.

One budget over heads, FFN neurons and hidden dims leaves a choice the paper does not make:
how much of it each kind pays. Kinds differ a lot in what a parameter is worth (on MiniLM,
removing half of the encoder's parameters from FFN neurons alone loses about 0.01 accuracy,
spread evenly over the three kinds about 0.04), and no per-atom score compares a head with a
hidden dim. So the choice is made by measurement: each candidate set of per-kind rates
(``kind_weights`` of :func:`surgery.budget.uniform_counts`) is turned into a real pruned model
(selection, compensation, slicing) and run on a few calibration batches; the candidate whose
output moves least from the dense model's wins. No labels are needed.

The search is a coordinate descent in log space: starting from the given weights, each kind's
weight is in turn divided or multiplied by a step (3.3, then 1.8), kept when the output gap
shrinks, until a round improves nothing or ``max_evals`` candidates were tried.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from surgery._core.batches import as_args, first_tensor, to_device

STEPS = (1 / 0.3, 1 / 0.55)


def output_gap(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> float:
    """Squared error of the pruned outputs relative to the dense outputs' variance (0: same
    outputs; 1: as far off as predicting the dense mean)."""
    d = torch.cat([o.reshape(o.shape[0], -1).double() for o in dense])
    p = torch.cat([o.reshape(o.shape[0], -1).double() for o in pruned])
    return float(((p - d) ** 2).sum() / ((d - d.mean(0)) ** 2).sum().clamp_min(1e-30))


def outputs(model: torch.nn.Module, batches: Iterable[Any]) -> list[torch.Tensor]:
    """The first tensor of ``model``'s output on each batch (inputs only, no labels)."""
    from surgery._core.batches import split_batch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs, _ = split_batch(batch)
            args, kwargs = as_args(to_device(inputs, device))
            out.append(first_tensor(model(*args, **kwargs)).detach().float())
    return out


def search_kind_weights(
    gap: Callable[[dict[str, float]], float],
    kinds: list[str],
    start: dict[str, float] | None = None,
    max_evals: int = 10,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[tuple[dict[str, float], float]]]:
    """Per-kind weights (the largest 1) minimising ``gap(weights)``; also every candidate
    tried with its gap, in order. ``gap`` may raise :class:`surgery.errors.BudgetError` for
    weights that cannot meet the budget; such candidates are skipped."""
    from surgery.errors import BudgetError

    def norm(w: dict[str, float]) -> dict[str, float]:
        top = max(w.values())
        return {k: round(v / top, 4) for k, v in w.items()}

    tried: dict[tuple, float] = {}
    history: list[tuple[dict[str, float], float]] = []

    def evaluate(w: dict[str, float]) -> float:
        key = tuple(sorted(w.items()))
        if key not in tried:
            try:
                tried[key] = gap(w)
            except BudgetError:
                tried[key] = float("inf")
            history.append((w, tried[key]))
            if log is not None:
                log(f"kind weights {w}: output gap {tried[key]:.4g}")
        return tried[key]

    best = norm({k: float((start or {}).get(k, 1.0)) or 1.0 for k in kinds})
    best_gap = evaluate(best)
    for step in STEPS:
        improved = True
        while improved and len(history) < max_evals:
            improved = False
            for kind in kinds:
                for factor in (1 / step, step):
                    if len(history) >= max_evals:
                        break
                    trial = norm({**best, kind: best[kind] * factor})
                    g = evaluate(trial)
                    if g < best_gap:
                        best, best_gap, improved = trial, g, True
                        break
    return best, history
