"""Budgets: how many atoms each group keeps so that a target share of params or MACs goes.

The cost model prices a keep decision without building the model: a parameter's size is its
dense size times the kept fraction of each tracked dimension, a layer's MACs are its measured
dense MACs (FlopCounterMode, per fx node) times the kept fraction of each channel axis it
multiplies over. Both allocations are one-parameter families solved by bisection: a uniform
keep ratio per group (the paper's setting), or a global threshold on per-group normalised
scores (groups compete for the budget).
"""

from __future__ import annotations

import math

import numpy as np

from surgery.budget.cost import CostModel
from surgery.errors import BudgetError
from surgery.graph.groups import ChannelGroup, Coupling


def atom_step(group: ChannelGroup, round_to: int) -> int:
    """Atoms per rounding step so that the kept *channels* are multiples of ``round_to``: an
    attention head of 32 channels is already a multiple of 8 or 16, a neuron is not."""
    width = max((len(per_atom[0]) for per_atom in group.slices.values() if per_atom), default=1)
    return max(1, round_to // math.gcd(round_to, max(1, width)))


def _rounded(x: float, atoms: int, step: int, min_keep: int) -> int:
    k = int(round(x / step)) * step if step > 1 else int(round(x))
    return int(min(atoms, max(min(min_keep, atoms), k)))


def percents(*values: float) -> tuple[str, ...]:
    """The fractions as percentages with the fewest decimals (at least one) that tell them
    apart: "at most 99.912% ..., asked for 99.900%", never "at most 99.9%, asked for 99.9%"."""
    for digits in range(1, 7):
        text = tuple(f"{v:.{digits}%}" for v in values)
        if len(set(text)) == len(set(values)):
            return text
    return text


def _first_k(coupling: Coupling, counts: dict[int, int]) -> dict[int, np.ndarray]:
    return {g.id: np.arange(counts[g.id]) for g in coupling.prunable}


def width_classes(groups: list[ChannelGroup], steps: dict[int, int]) -> list[list[ChannelGroup]]:
    """Groups that keep one width under ``uniform_widths``: same kind, same number of atoms
    (and rounding step), e.g. the heads of every layer, or the FFN neurons of every layer."""
    classes: dict[tuple[str, int, int], list[ChannelGroup]] = {}
    for g in groups:
        classes.setdefault((g.kind, g.atoms, steps[g.id]), []).append(g)
    return list(classes.values())


DEPTH_SCHEDULES = ("flat", "log")


def depth_weights(coupling: Coupling, groups: list[ChannelGroup], schedule: str
                  ) -> dict[int, float]:
    """Per-group multipliers of the removal rate by depth. ``flat``: 1 everywhere (the
    paper's setting). ``log``: the i-th of a kind's n groups, bottom-up, weighs
    ``ln(i + 1)`` scaled to mean 1, SlimGPT's Incremental Pruning Ratio: the error a cut
    makes low in a deep model is carried and amplified by every layer above it, so the first
    layer of each kind is left whole and the rate rises logarithmically with depth. Depth is
    where a group is first read in the graph (a head group's writers sit inside its attention
    module, so where it is written says nothing)."""
    if schedule == "flat":
        return {g.id: 1.0 for g in groups}
    position = {n.name: i for i, n in enumerate(coupling.capture.graph_module.graph.nodes)}
    first_read: dict[int, int] = {}
    for rel in coupling.relations:
        first_read[rel.group] = min(first_read.get(rel.group, len(position)),
                                    position[rel.layer])
    out: dict[int, float] = {}
    for kind in {g.kind for g in groups}:
        same = sorted((g for g in groups if g.kind == kind),
                      key=lambda g: (first_read.get(g.id, g.order), g.id))
        shape = [math.log(i + 1) for i in range(len(same))]
        mean = sum(shape) / len(shape)
        out.update({g.id: (s / mean if mean > 0 else 1.0) for g, s in zip(same, shape)})
    return out


def uniform_counts(cost: CostModel, sparsity: float, kind: str, *, round_to: int = 1,
                   min_keep: int = 1, kind_weights: dict[str, float] | None = None,
                   uniform_widths: bool = False, spared: tuple[str, ...] = (),
                   depth_schedule: str = "flat") -> dict[int, int]:
    """Atoms kept per group for one removal rate shared by all groups, refined group by group
    until the removed share is as close to ``sparsity`` as whole atoms allow.

    ``kind_weights`` scales the rate per group kind: a group of kind ``k`` loses the fraction
    ``min(1, w_k * t)`` of its atoms, one ``t`` for the whole model (kinds not named weigh 1).
    Transformers lose far less accuracy per parameter from FFN neurons than from heads or
    hidden dims, so e.g. ``{"neuron": 1, "head": 0.5, "hidden": 0.25}`` spends the budget on
    neurons first while every kind still shrinks; equal weights are the paper's setting.
    ``depth_schedule`` scales it per group by depth as well (:func:`depth_weights`).

    The shared rate gives every group of a :func:`width_classes` class the same count; the
    refinement then moves single groups, or, with ``uniform_widths``, whole classes, so that
    every layer keeps the same width per kind (what a model's config can describe).
    ``spared``: why uniform_widths made groups unprunable (:mod:`surgery.budget.widths`),
    said when the budget cannot be met without them."""
    groups = cost.coupling.prunable
    weights = {g.id: float((kind_weights or {}).get(g.kind, 1.0)) for g in groups}
    if any(w < 0 or not np.isfinite(w) for w in weights.values()):
        raise BudgetError(f"kind_weights must be finite and >= 0, got {kind_weights!r}.")
    depth = depth_weights(cost.coupling, groups, depth_schedule)
    weights = {g: w * depth[g] for g, w in weights.items()}
    if not any(w > 0 for w in weights.values()):
        raise BudgetError(f"kind_weights {kind_weights!r} give every prunable group weight 0, so "
                          "nothing can be cut; give at least one of the model's kinds "
                          f"{sorted({g.kind for g in groups})} a positive weight.")
    t_max = 1.0 / min(w for w in weights.values() if w > 0)
    steps = {g.id: atom_step(g, round_to) for g in groups}

    def counts(t: float) -> dict[int, int]:
        return {g.id: _rounded((1.0 - min(1.0, weights[g.id] * t)) * g.atoms, g.atoms,
                               steps[g.id], min_keep) for g in groups}

    def removed(c: dict[int, int]) -> float:
        return cost.removed(cost.mask(_first_k(cost.coupling, c)), kind)

    most = removed(counts(t_max))
    if sparsity > most + 1e-9:
        whole = [g for g in groups if g.atoms <= min_keep]
        note = (f"; min_keep={min_keep} keeps {len(whole)} of the {len(groups)} prunable groups "
                f"whole (largest group: {max(g.atoms for g in groups)} atoms)") if whole else ""
        zero = sorted({g.kind for g in groups if (kind_weights or {}).get(g.kind, 1.0) == 0})
        note += f"; kind_weights spare {zero}" if zero else ""
        note += (f"; depth_schedule={depth_schedule!r} keeps the first group of each kind "
                 "whole and cuts the others at rates rising with depth"
                 if depth_schedule != "flat" else "")
        advice = "Lower the sparsity or min_keep, or unfreeze modules."
        if spared:
            advice = (f"uniform_widths=True cuts only what the model's config can express "
                      f"({'; '.join(spared)}): lower the sparsity, or prune without "
                      "uniform_widths (the result then loads with surgery.io.load, not as a "
                      "plain Hugging Face folder).")
        at_most, asked = percents(most, sparsity)
        raise BudgetError(
            f"at most {at_most} of {kind} can be removed from this model (every prunable group "
            f"down to {min_keep} atom(s){note}); asked for {asked}. {advice}"
        )
    lo, hi = 0.0, t_max
    for _ in range(40):
        mid = (lo + hi) / 2
        if removed(counts(mid)) >= sparsity:
            hi = mid
        else:
            lo = mid
    best = min((counts(lo), counts(hi)), key=lambda c: abs(removed(c) - sparsity))
    moves = width_classes(groups, steps) if uniform_widths else [[g] for g in groups]
    return _refine(best, removed, sparsity, moves, steps, min_keep)


def _refine(counts: dict[int, int], removed, sparsity: float, moves: list[list[ChannelGroup]],
            units: dict[int, int], min_keep: int, steps: int = 64) -> dict[int, int]:
    """Greedy +/- one rounding step (``units``, atoms per group) on one move at a time (a
    single group, or a class of groups kept at one width) while it gets closer to the
    target."""
    err = abs(removed(counts) - sparsity)
    if err < 0.002:
        return counts
    by_size = sorted(moves, key=lambda m: -m[0].atoms)[:24]
    for _ in range(steps):
        best, best_err = None, err
        for move in by_size:
            g = move[0]
            for step in (-units[g.id], units[g.id]):
                k = counts[g.id] + step
                if not max(1, min(min_keep, g.atoms)) <= k <= g.atoms:
                    continue
                trial = {**counts, **{m.id: k for m in move}}
                e = abs(removed(trial) - sparsity)
                if e < best_err:
                    best, best_err = trial, e
        if best is None:
            break
        counts, err = best, best_err
        if err < 0.002:
            break
    return counts


def global_kept(cost: CostModel, scores: dict[int, np.ndarray], sparsity: float, kind: str, *,
                round_to: int = 1, min_keep: int = 1) -> dict[int, np.ndarray]:
    """Keep, in every group, the atoms whose score relative to the group's best clears one
    global threshold; the threshold is set so the removed share meets ``sparsity``."""
    groups = cost.coupling.prunable
    norm = {g.id: scores[g.id] / max(float(np.max(scores[g.id])), 1e-12) for g in groups}
    order = {g.id: np.argsort(-scores[g.id], kind="stable") for g in groups}
    steps = {g.id: atom_step(g, round_to) for g in groups}

    def kept(tau: float) -> dict[int, np.ndarray]:
        out = {}
        for g in groups:
            k = _rounded(float((norm[g.id] >= tau).sum()), g.atoms, steps[g.id], min_keep)
            out[g.id] = np.sort(order[g.id][:k])
        return out

    def removed(tau: float) -> float:
        return cost.removed(cost.mask(kept(tau)), kind)

    top = max(float(np.max(n)) for n in norm.values()) + 1e-9
    if removed(top) < sparsity - 1e-9:
        at_most, asked = percents(removed(top), sparsity)
        raise BudgetError(f"at most {at_most} of {kind} can be removed with min_keep={min_keep};"
                          f" asked for {asked}.")
    lo, hi = min(float(np.min(n)) for n in norm.values()) - 1e-9, top  # scores may be < 0
    for _ in range(40):
        mid = (lo + hi) / 2
        if removed(mid) >= sparsity:
            hi = mid
        else:
            lo = mid
    return min((kept(lo), kept(hi)), key=lambda k: abs(cost.removed(cost.mask(k), kind) - sparsity))
