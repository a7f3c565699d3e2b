"""The public entry points: ``prune``, ``make_plan``, ``groups``."""

from __future__ import annotations

import copy
import itertools
import numbers
from typing import Any, Callable, Iterable

import torch

from surgery.budget.allocate import check_sparsity, global_kept, uniform_counts
from surgery.budget.cost import CostModel
from surgery.budget.kind_search import output_gap, outputs, search_kind_weights
from surgery.counting import count_macs, count_params, node_macs
from surgery.cut.apply import apply_plan
from surgery.cut.compensation import compensate as compensate_readers
from surgery.cut.plan import PruningPlan, build_plan
from surgery.cut.recovery import recalibrate_batchnorm
from surgery.errors import BudgetError, CalibrationError
from surgery.graph.capture import trace
from surgery.graph.groups import ChannelGroup, Coupling, find_groups
from surgery.plugins import call_hook
from surgery.scoring.criteria import ScoreContext, get_criterion
from surgery.scoring.estimators import SAMPLES
from surgery.scoring.topdown import top_down
from surgery.stats.calibrate import calibrate

TARGETS = ("output", "labels")
ALLOCATIONS = ("uniform", "global")


def couple(model: torch.nn.Module, example_inputs: Any) -> Coupling:
    """Trace ``model`` and find its coupled channel groups (the full structure)."""
    return find_groups(trace(model, example_inputs))


def groups(model: torch.nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``, prunable or not, in graph order."""
    return couple(model, example_inputs).groups


def make_plan(
    model: torch.nn.Module,
    example_inputs: Any,
    calib_data: Iterable[Any] | None = None,
    sparsity: float = 0.5,
    *,
    budget: str = "macs",
    budget_scope: str | tuple[str, ...] = (),
    kinds: Iterable[str] | None = None,
    kind_weights: dict[str, float] | str | None = None,
    criterion: str = "mi",
    target: str = "output",
    allocation: str = "uniform",
    estimator: str = "gaussian",
    round_to: int = 1,
    min_keep: int = 1,
    max_batches: int | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PruningPlan:
    """Decide what to keep without touching the model; see :func:`prune` for the arguments."""
    return _decide(
        model, example_inputs, calib_data, sparsity, budget=budget, budget_scope=budget_scope,
        kinds=kinds, kind_weights=kind_weights, criterion=criterion,
        target=target, allocation=allocation, estimator=estimator, round_to=round_to,
        min_keep=min_keep, max_batches=max_batches, seed=seed, distributed=distributed,
        progress=progress,
    )[0]


def _decide(
    model: torch.nn.Module,
    example_inputs: Any,
    calib_data: Iterable[Any] | None,
    sparsity: float,
    *,
    budget: str,
    budget_scope: str | tuple[str, ...],
    kinds: Iterable[str] | None,
    kind_weights: dict[str, float] | str | None,
    criterion: str,
    target: str,
    allocation: str,
    estimator: str,
    round_to: int,
    min_keep: int,
    max_batches: int | None,
    seed: int,
    distributed: bool | None,
    progress: Callable[[str, int], None] | None,
    statistics: bool = False,
) -> tuple[PruningPlan, ScoreContext, dict]:
    """make_plan's work, also returning the scoring context (coupling, statistics) and the
    kept atoms, which compensation needs."""
    check_sparsity(sparsity, budget)
    if target not in TARGETS:
        raise CalibrationError(f"target must be one of {TARGETS}, got {target!r}.")
    if allocation not in ALLOCATIONS:
        raise BudgetError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
               for v in (round_to, min_keep)):
        raise BudgetError(
            f"round_to and min_keep must be whole numbers >= 1 (got {round_to!r}, {min_keep!r})."
        )
    options = {"estimator": estimator} if criterion in ("mi", "mi_topk") else {}
    crit = get_criterion(criterion, **options)
    if crit.needs_calibration and calib_data is None:
        raise CalibrationError(
            f"criterion {criterion!r} needs calibration data: pass calib_data, an iterable of "
            "batches shaped like example_inputs (optionally (inputs, labels)), or use "
            "criterion='magnitude'."
        )
    coupling = couple(model, example_inputs)
    if kinds is not None:
        for g in coupling.groups:
            if g.prunable and g.kind not in kinds:
                g.prunable, g.reason = False, f"kind {g.kind!r} not in kinds={sorted(kinds)}"
    if not coupling.prunable and sparsity > 0:
        raise BudgetError(
            f"no prunable channel group in {type(model).__name__}: every channel reaches an "
            "input, an output or an unsupported op (see surgery.groups(...) reasons)."
        )
    scope = (budget_scope,) if isinstance(budget_scope, str) else tuple(budget_scope)
    cost = CostModel(coupling, node_macs(coupling.capture.graph_module,
                                         coupling.capture.example_args), scope)
    if isinstance(kind_weights, str) and kind_weights not in ("search", "uniform"):
        raise BudgetError(f"kind_weights must be a dict {{kind: weight}}, 'search', 'uniform' "
                          f"or None, got {kind_weights!r}.")
    kinds_present = sorted({g.kind for g in coupling.prunable})
    search = kind_weights == "search" and len(kinds_present) > 1
    if search and calib_data is None:
        raise CalibrationError("kind_weights='search' runs candidate pruned models on "
                               "calibration batches: pass calib_data.")
    prior = call_hook("surgery_kind_weights", model=model, kinds=kinds_present)
    if kind_weights is None or kind_weights == "search":
        weights = prior
    elif kind_weights == "uniform":
        weights = None
    else:
        weights = kind_weights
    # uniform_counts validates the weights before calibration spends any time
    counts = uniform_counts(cost, sparsity, budget, round_to=round_to, min_keep=min_keep,
                            kind_weights=weights)
    ctx = ScoreContext(coupling, seed=seed, data=calib_data)
    if crit.needs_calibration or ((statistics or search) and calib_data is not None):
        needs_samples = getattr(getattr(crit, "estimate", None), "needs_samples", False)
        ctx.calibration = calibrate(
            coupling, calib_data, target=target, max_batches=max_batches,
            progress=(lambda i: progress("calibrate", i)) if progress else None,
            distributed=distributed, samples=SAMPLES if needs_samples else 0, seed=seed,
        )

    def choose(w: dict[str, float] | None) -> tuple[dict, dict]:
        ctx.kept = {}
        c = counts if w is weights else uniform_counts(
            cost, sparsity, budget, round_to=round_to, min_keep=min_keep, kind_weights=w)
        kept, scores = top_down(
            crit, ctx, c, progress=(lambda i: progress("score", i)) if progress else None
        )
        if allocation == "global":
            kept = global_kept(cost, scores, sparsity, budget, round_to=round_to,
                               min_keep=min_keep)
        return kept, scores

    history: list = []
    if search:
        weights, history, (kept, scores) = _search_kinds(
            model, example_inputs, calib_data, ctx, choose, kinds_present, weights,
            compensate=statistics, progress=progress)
    else:
        kept, scores = choose(weights)
    estimate = cost.cost(cost.mask(kept))
    plan = build_plan(
        coupling, kept, criterion=criterion, target=target, scores=scores,
        budget={
            "kind": budget, "scope": list(scope), "sparsity": sparsity, "allocation": allocation,
            "round_to": round_to, "min_keep": min_keep, "estimator": estimator,
            "kind_weights": dict(weights or {}),
            **({"kind_search": [[w, g] for w, g in history]} if history else {}),
            "dense_params": cost.dense.params, "dense_macs": cost.dense.macs,
            "estimated_params": estimate.params, "estimated_macs": estimate.macs,
        },
    )
    return plan, ctx, kept


def _realise(model: torch.nn.Module, ctx: ScoreContext, kept: dict, plan: PruningPlan,
             example_inputs: Any, *, compensate: bool, inplace: bool = False) -> torch.nn.Module:
    """Cut ``model`` (a copy unless ``inplace``) by ``plan``, refitting the readers of cut
    groups first when ``compensate`` and calibration statistics are there."""
    target_model = model if inplace else copy.deepcopy(model)
    if compensate and ctx.calibration is not None:
        plan.extra["compensated"] = compensate_readers(target_model, ctx.coupling,
                                                       ctx.calibration, kept)
    return apply_plan(target_model, plan, example_inputs, inplace=True)


def _search_kinds(model, example_inputs, calib_data, ctx: ScoreContext, choose, kinds, start,
                  *, compensate: bool, progress, batches: int = 8):
    """kind_weights='search' (see :mod:`surgery.allocation`): returns the chosen weights, the
    candidates tried with their output gaps, and the chosen candidate's (kept, scores)."""
    from surgery._core.modes import restore_modes, training_modes

    evaluation = list(itertools.islice(iter(calib_data), batches))
    modes = training_modes(model)
    model.eval()
    try:
        dense = outputs(model, evaluation)
    finally:
        restore_modes(modes)
    found: dict[tuple, tuple[dict, dict]] = {}

    def gap(w: dict[str, float]) -> float:
        kept, scores = choose(w)
        found[tuple(sorted(w.items()))] = (kept, scores)
        plan = build_plan(ctx.coupling, kept, criterion="search", target="output", budget={})
        small = _realise(model, ctx, kept, plan, example_inputs, compensate=compensate).eval()
        return output_gap(dense, outputs(small, evaluation))

    tried = itertools.count()
    log = (lambda msg: progress("search", next(tried))) if progress else None
    weights, history = search_kind_weights(gap, kinds, start, log=log)
    return weights, history, found[tuple(sorted(weights.items()))]


def prune(
    model: torch.nn.Module,
    example_inputs: Any,
    calib_data: Iterable[Any] | None = None,
    sparsity: float = 0.5,
    *,
    budget: str = "macs",
    budget_scope: str | tuple[str, ...] = (),
    kinds: Iterable[str] | None = None,
    kind_weights: dict[str, float] | str | None = None,
    criterion: str = "mi",
    target: str = "output",
    allocation: str = "uniform",
    estimator: str = "gaussian",
    round_to: int = 1,
    min_keep: int = 1,
    max_batches: int | None = None,
    seed: int = 0,
    inplace: bool = False,
    recalibrate: bool = True,
    compensate: bool = True,
    distributed: bool | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[torch.nn.Module, PruningPlan]:
    """Prune ``model`` to remove ``sparsity`` of its ``budget`` ("macs" or "params").

    - ``example_inputs``: one batch as the model takes it (tensor, tuple, or dict of kwargs);
      fixes the shapes the graph is traced with and checks the pruned model.
    - ``budget_scope``: parameter-name prefixes the params budget counts (e.g.
      ``"bert.encoder"`` for "encoder parameters removed"); default: all parameters.
    - ``kinds``: only cut groups of these kinds (e.g. ``{"neuron", "head"}`` to keep a
      transformer's hidden size); default: every prunable group.
    - ``kind_weights``: per-kind removal rates relative to one shared rate, e.g.
      ``{"neuron": 1, "head": 0.5, "hidden": 0.25}`` cuts FFN neurons twice as fast as heads;
      ``"search"`` refines the default by trying candidates on calibration batches (about
      ten prunes' time; see :mod:`surgery.allocation`); ``"uniform"``: every kind at the
      same rate (the paper's setting); default: the plugin's (transformers: neurons 1, heads
      0.5, hidden dims 0.1), else uniform.
    - ``calib_data``: iterable of batches (``inputs``, ``(inputs, labels)`` or dicts with
      ``labels``) for criteria that need activations (``mi``).
    - ``criterion``: ``mi`` (default), ``magnitude``, ``random`` or a plugin's.
    - ``target``: what the top layer's channels must explain: ``output`` (the dense model's
      own output; no labels needed) or ``labels``.
    - ``allocation``: ``uniform`` keep ratio per group, or ``global`` by normalised score.
    - ``round_to``: kept channels per group are multiples of this (e.g. 16 for hardware; a
      head of 32 channels needs no rounding, a neuron does); ``min_keep``: the fewest atoms
      a group keeps.
    - ``distributed``: under ``torch.distributed`` (auto-detected when None), each rank
      folds in its share of ``calib_data`` and the statistics are all-reduced; every rank
      returns the same plan (see :mod:`surgery.distributed`).
    - ``compensate``: refit every conv/linear that reads a cut group by least squares from
      its kept inputs (uses the calibration statistics; skipped without them).
    - ``recalibrate``: re-estimate BatchNorm running statistics on ``calib_data`` after the
      cut (no labels, one pass; skipped when there is no BatchNorm or no data).

    Returns ``(pruned_model, plan)``. The input model is not modified unless ``inplace``.
    """
    plan, ctx, kept = _decide(
        model, example_inputs, calib_data, sparsity, budget=budget, budget_scope=budget_scope,
        kinds=kinds, kind_weights=kind_weights, criterion=criterion,
        target=target, allocation=allocation, estimator=estimator, round_to=round_to,
        min_keep=min_keep, max_batches=max_batches, seed=seed, distributed=distributed,
        progress=progress, statistics=compensate,
    )
    pruned = _realise(model, ctx, kept, plan, example_inputs, compensate=compensate,
                      inplace=inplace)
    if recalibrate and calib_data is not None:
        plan.extra["recalibrated_batchnorms"] = recalibrate_batchnorm(pruned, calib_data, max_batches)
    plan.budget["params"] = count_params(pruned)
    plan.budget["macs"] = count_macs(pruned, example_inputs)
    return pruned, plan
