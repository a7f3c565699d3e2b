"""Criteria: how important each atom of a group is. One class per criterion, one registry.

A criterion scores the atoms of one group given a :class:`ScoreContext`: the channel
structure, the calibration statistics if it needs them, and the atoms already kept in the
groups above (top-down scoring decides those first). Higher is more important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from surgery.calibration import Calibration
from surgery.estimators import get_estimator
from surgery.groups import OUTPUT, ChannelGroup, Coupling


@dataclass
class ScoreContext:
    coupling: Coupling
    calibration: Calibration | None = None
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    seed: int = 0


class Criterion:
    """Base class: set ``needs_calibration`` and implement :meth:`score`."""

    name = "base"
    needs_calibration = False

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError


class MutualInformation(Criterion):
    """Top-down MI (Fan et al. 2021): an atom's score is the sum, over the layers reading it,
    of its mutual information with the channels *kept* in the group that layer writes (the
    model output or labels for the last layers)."""

    name = "mi"
    needs_calibration = True

    def __init__(self, estimator: str = "gaussian") -> None:
        self.estimate = get_estimator(estimator)
        self.estimator = estimator

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        assert ctx.calibration is not None
        cal = ctx.calibration
        total = np.zeros(group.atoms)
        for i, rel in enumerate(ctx.coupling.relations):
            if rel.group != group.id or i not in cal.sums:
                continue
            sums = cal.sums[i]
            if rel.target == OUTPUT:
                t_cols = np.arange(sums.dt)
            else:
                t_atoms = cal.t_features[i].atom_of_column
                kept = ctx.kept.get(rel.target)
                t_cols = np.arange(len(t_atoms)) if kept is None else np.nonzero(np.isin(t_atoms, kept))[0]
            x_atoms = cal.x_features[i].atom_of_column
            total += self.estimate(sums, x_atoms, t_cols, group.atoms)
        return total


class Magnitude(Criterion):
    """L2 norm of every weight the atom owns, summed over the group's parameters
    (Torch-Pruning's group magnitude)."""

    name = "magnitude"

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        state = ctx.coupling.capture.model.state_dict()
        total = np.zeros(group.atoms)
        for (param, dim), per_atom in group.slices.items():
            if not param.endswith(("weight", "bias")):
                continue  # running statistics are not weights
            tensor = state[param].detach().double().movedim(dim, 0)
            sq = tensor.reshape(tensor.shape[0], -1).pow(2).sum(1).cpu().numpy()
            total += np.array([sq[p].sum() for p in per_atom])
        return np.sqrt(total)


class Random(Criterion):
    """Uniform random scores, seeded per group: the baseline every criterion must beat."""

    name = "random"

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        return np.random.default_rng([ctx.seed, group.id]).random(group.atoms)


CRITERIA: dict[str, Callable[..., Criterion]] = {
    "mi": MutualInformation,
    "magnitude": Magnitude,
    "random": Random,
}


def get_criterion(name: str, **options: Any) -> Criterion:
    from surgery.plugins import merged, plugin_manager

    available = {**CRITERIA, **merged(plugin_manager().hook.surgery_criteria())}
    if name not in available:
        raise ValueError(f"unknown criterion {name!r}; available: {sorted(available)}.")
    factory = available[name]
    return factory(**options) if options else factory()


__all__ = ["Criterion", "ScoreContext", "MutualInformation", "Magnitude", "Random",
           "get_criterion", "torch"]
