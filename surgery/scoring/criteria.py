"""Criteria: how important each atom of a group is. One class per criterion, one registry.

A criterion scores the atoms of one group given a :class:`ScoreContext`: the channel
structure, the calibration statistics if it needs them, and the atoms already kept in the
groups above (top-down scoring decides those first). Higher is more important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from surgery.errors import OptionsError
from surgery.graph.groups import ChannelGroup, Coupling
from surgery.stats.calibration import Calibration


@dataclass
class ScoreContext:
    coupling: Coupling
    calibration: Calibration | None = None
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    seed: int = 0
    data: Any = None
    """The calibration batches themselves, for criteria that run the model (Taylor)."""
    max_batches: int | None = None
    distributed: bool = False
    """How calibration read ``data``: criteria that run the model read it the same way."""
    cache: dict[str, Any] = field(default_factory=dict)
    """What a criterion computes once for all groups (Taylor's weight x gradient sums)."""
    refits: list[Any] | None = None
    """Compensation's refits when calibration was staged (computed stage by stage, since no
    stage's statistics outlive it); None: compensation reads ``calibration``."""
    fallbacks: dict[int, str] = field(default_factory=dict)
    """Groups a criterion could not score as asked, with what it did instead: reported in the
    plan (``plan.extra["fallbacks"]``) and the report, never silent."""


CRITERIA: dict[str, Callable[..., "Criterion"]] = {}
"""Built-in criteria by name, filled by :func:`register` where each is defined; plugins add
theirs through the ``surgery_criteria`` hook."""

_T = TypeVar("_T")


def register(name: str) -> Callable[[_T], _T]:
    """Class (or factory) decorator: make it the built-in criterion ``name``."""

    def add(factory: _T) -> _T:
        CRITERIA[name] = factory  # type: ignore[assignment]
        return factory

    return add


class Criterion:
    """Base class: set ``needs_calibration`` and implement :meth:`score`."""

    name = "base"
    needs_calibration = False

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError

    def select(self, group: ChannelGroup, ctx: ScoreContext, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Kept atoms (sorted) and per-atom scores; the default keeps the top-``k`` scores."""
        s = np.nan_to_num(np.asarray(self.score(group, ctx), dtype=np.float64), nan=-np.inf)
        if s.shape != (group.atoms,):
            raise ValueError(f"criterion {self.name!r} returned {s.shape} scores for group "
                             f"{group.name!r} with {group.atoms} atoms.")
        return np.sort(np.argsort(-s, kind="stable")[:k]), s

    def select_many(self, groups: list[ChannelGroup], ctx: ScoreContext, ks: list[int]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`select` for groups none of which is another's target (same context)."""
        return [self.select(g, ctx, k) for g, k in zip(groups, ks)]


def _atom_sums(group: ChannelGroup, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """Per atom, the sum of the entries of ``tensors[param]`` at the atom's positions, over
    every parameter dimension of the group that ``tensors`` has a tensor for."""
    total = np.zeros(group.atoms)
    for (param, dim), per_atom in group.slices.items():
        if param not in tensors:
            continue
        t = tensors[param].double().movedim(dim, 0)
        per_pos = t.reshape(t.shape[0], -1).sum(1).cpu().numpy()
        total += np.array([per_pos[p].sum() for p in per_atom])
    return total


@register("magnitude")
class Magnitude(Criterion):
    """L2 norm of every weight the atom owns, summed over the group's parameters
    (Torch-Pruning's group magnitude)."""

    name = "magnitude"

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        state = ctx.coupling.capture.model.state_dict()
        squares = {p: state[p].detach().double().pow(2) for p in group.params
                   if p.endswith(("weight", "bias"))}  # running statistics are not weights
        return np.sqrt(_atom_sums(group, squares))


@register("act_weight")
class ActivationWeight(Criterion):
    """Activation x weight: for each layer reading the group, the RMS of the atom's input
    channels over the calibration data times the norm of the weights that read them, summed
    over readers. What a channel contributes to the readers' outputs, ignoring correlations;
    a strong cheap baseline. Groups with no reader seen with weights fall back to magnitude."""

    name = "act_weight"
    needs_calibration = True

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        from surgery.cut.compensation import reader_weight, weighted_reader

        assert ctx.calibration is not None
        cal, gm = ctx.calibration, ctx.coupling.capture.graph_module
        total, seen = np.zeros(group.atoms), False
        for i, rel in enumerate(ctx.coupling.relations):
            if rel.group != group.id or i not in cal.sums or cal.x_features[i].average_atoms:
                continue
            _, module = weighted_reader(gm, rel)
            if module is None:
                continue
            sums, feats = cal.sums[i], cal.x_features[i]
            mean = sums.mean()[:sums.dx]
            rms = (torch.diagonal(sums.blocks()[0]) + mean * mean).clamp_min(0).sqrt()
            cols = torch.as_tensor(feats.positions, device=module.weight.device)
            w = reader_weight(module).detach().double().index_select(1, cols).movedim(1, 0)
            norms = w.reshape(len(cols), -1).norm(dim=1).to(rms.device)
            np.add.at(total, feats.position_atoms, (rms * norms).cpu().numpy())
            seen = True
        if seen:
            return total
        ctx.fallbacks[group.id] = ("act_weight -> magnitude: no layer with weights is seen "
                                   "reading this group")
        return Magnitude().score(group, ctx)


@register("taylor")
class Taylor(Criterion):
    """First-order Taylor (Molchanov et al. 2019; Torch-Pruning's group Taylor): the loss
    change from zeroing an atom's weights, sum |w * dL/dw| over every weight it owns, with
    dL/dw summed over up to ``batches`` calibration batches. The loss is the cross-entropy
    of the model's logits against the batches' labels, or against the dense model's own
    predictions when the batches have none. Needs a backward pass; the model's ``.grad``
    fields are not touched."""

    name = "taylor"
    needs_calibration = True

    def __init__(self, batches: int = 8) -> None:
        self.batches = batches

    def _products(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        import itertools

        import torch.nn.functional as F

        from surgery._core.batches import as_args, first_tensor, split_batch, to_device
        from surgery._core.modes import evaluating
        from surgery.errors import CalibrationError

        model = ctx.coupling.capture.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        device = next(iter(params.values())).device
        with evaluating(model), torch.enable_grad():
            for batch in itertools.islice(iter(ctx.data), self.batches):
                inputs, labels = split_batch(batch)
                args, kwargs = as_args(to_device(inputs, device))
                logits = first_tensor(model(*args, **kwargs))
                if logits is None or logits.ndim != 2:
                    raise CalibrationError(
                        "criterion 'taylor' needs a model returning class logits (batch, "
                        f"classes); got {None if logits is None else tuple(logits.shape)}.")
                target = (labels.to(device) if labels is not None
                          else logits.detach().argmax(-1))
                loss = F.cross_entropy(logits, target)
                names = list(params)
                for n, g in zip(names, torch.autograd.grad(
                        loss, [params[n] for n in names], allow_unused=True)):
                    if g is not None:
                        grads[n] += g
        return {n: (params[n].detach() * grads[n]).abs() for n in params}

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        if "taylor" not in ctx.cache:
            ctx.cache["taylor"] = self._products(ctx)
        return _atom_sums(group, ctx.cache["taylor"])  # buffers have no gradient: not in it


@register("random")
class Random(Criterion):
    """Uniform random scores, seeded per group: the baseline every criterion must beat."""

    name = "random"

    def score(self, group: ChannelGroup, ctx: ScoreContext) -> np.ndarray:
        return np.random.default_rng([ctx.seed, group.id]).random(group.atoms)


def get_criterion(name: str, **options: Any) -> Criterion:
    from surgery.plugins._manager import call_hook, merged

    available = {**CRITERIA, **merged(call_hook("surgery_criteria"))}
    if name not in available:
        raise OptionsError(f"unknown criterion {name!r}; available: {sorted(available)}.")
    factory = available[name]
    return factory(**options) if options else factory()


__all__ = ["Criterion", "ScoreContext", "CRITERIA", "register", "get_criterion", "Magnitude",
           "ActivationWeight", "Taylor", "Random"]
