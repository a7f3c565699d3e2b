"""The public entry points: ``couple``, ``groups``, ``make_plan``, ``prune``.

``prune`` is three steps, each in its own stage package: *decide* (trace and couple, calibrate,
score top-down, allocate the budget: a :class:`~surgery.cut.plan.PruningPlan`), *realise*
(compensate the readers of cut groups, slice, verify) and *recover* (re-estimate BatchNorm
statistics). ``make_plan`` is the first step alone. Every setting is a field of
:class:`~surgery.options.PruneOptions`, given as keywords or as an ``options=`` object.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from surgery._core.batches import rows
from surgery._core.modes import evaluating
from surgery.budget.allocate import global_kept, uniform_counts
from surgery.budget.cost import CostModel
from surgery.budget.kind_search import output_gap, outputs, search_kind_weights
from surgery.budget.widths import limit_to_config
from surgery.counting import count_macs, count_params, node_macs
from surgery.cut.apply import apply_plan
from surgery.cut.compensation import apply_refits, refits
from surgery.cut.norm_gain import apply_gains, norm_gains
from surgery.cut.plan import PruningPlan, build_plan
from surgery.cut.recovery import recalibrate_batchnorm, stale_batchnorms
from surgery.cut.sequential import cut_by_columns, sequential_refits
from surgery.errors import BudgetError, CalibrationError, OptionsError
from surgery.graph.capture import trace
from surgery.graph.groups import ChannelGroup, Coupling, find_groups
from surgery.options import PruneOptions
from surgery.plugins._manager import call_hook
from surgery.scoring.criteria import Criterion, ScoreContext, get_criterion
from surgery.scoring.estimators import SAMPLES
from surgery.scoring.topdown import top_down
from surgery.stats.calibration import calibrate, calibration_bytes
from surgery.stats.stages import Stages


class _Default:
    """``sparsity`` not given: the options' value (0.5 unless ``options=`` says otherwise)."""

    def __repr__(self) -> str:
        return "PruneOptions.sparsity"


_DEFAULT: Any = _Default()

Progress = Callable[[str, int], None]
"""``progress(stage, i)``: item ``i`` of ``stage`` ("calibrate", "score", "search",
"compensate") is done."""


def couple(model: torch.nn.Module, example_inputs: Any) -> Coupling:
    """Trace ``model`` and find its coupled channel groups (the full structure)."""
    return find_groups(trace(model, example_inputs))


def groups(model: torch.nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``, prunable or not, in graph order."""
    return couple(model, example_inputs).groups


def make_plan(model: torch.nn.Module, example_inputs: Any,
              calib_data: Iterable[Any] | None = None, sparsity: float = _DEFAULT, *,
              options: PruneOptions | None = None, progress: Progress | None = None,
              **settings: Any) -> PruningPlan:
    """Decide what to keep without touching the model; the arguments are :func:`prune`'s."""
    opts = _options(options, sparsity, settings)
    if opts.budget == "latency" or opts.round_to == "auto":
        from surgery.latency import plan_to_latency

        return plan_to_latency(model, example_inputs, calib_data, opts, progress=progress)
    return _decide(model, example_inputs, calib_data, opts, progress).plan


def prune(model: torch.nn.Module, example_inputs: Any,
          calib_data: Iterable[Any] | None = None, sparsity: float = _DEFAULT, *,
          options: PruneOptions | None = None, inplace: bool = False,
          progress: Progress | None = None,
          **settings: Any) -> tuple[torch.nn.Module, PruningPlan]:
    """Prune ``model`` to remove ``sparsity`` of its budget (MACs by default).

    - ``example_inputs``: one batch as the model takes it (tensor, tuple, or dict of keyword
      tensors); fixes the shapes the graph is traced with and checks the pruned model.
    - ``calib_data``: an iterable of batches (``inputs``, ``(inputs, labels)`` or dicts with
      ``labels``) for the criteria that need activations (``mi``, the default) and for
      compensation and BatchNorm re-estimation.
    - ``settings`` (``budget=``, ``criterion=``, ``kinds=`` ...) or ``options=``: the fields
      of :class:`surgery.PruneOptions`, which documents each; keywords override ``options``.
    - ``progress``: called as ``progress(stage, i)`` while calibrating, scoring and (with
      ``sequential``) refitting.

    Returns ``(pruned_model, plan)``. The input model is not modified unless ``inplace``.
    """
    opts = _options(options, sparsity, settings)
    if opts.budget == "latency" or opts.round_to == "auto":
        from surgery.latency import prune_to_latency

        return prune_to_latency(model, example_inputs, calib_data, opts, inplace=inplace,
                                progress=progress)
    decision = _decide(model, example_inputs, calib_data, opts, progress,
                       statistics=opts.compensate)
    pruned = _realise(model, decision, example_inputs, compensate=opts.compensate,
                      inplace=inplace, data=_data(opts, calib_data),
                      sequential=opts.sequential, progress=_stage(progress, "compensate"))
    _recover(pruned, decision, calib_data, opts, example_inputs)
    return pruned, decision.plan


def _recover(pruned: torch.nn.Module, decision: "_Decision", calib_data: Iterable[Any] | None,
             opts: PruneOptions, example_inputs: Any) -> None:
    """BatchNorm re-estimation where the cut made statistics stale; the measured params and
    MACs into ``plan.budget``."""
    plan = decision.plan
    if opts.recalibrate and calib_data is not None:
        stale = stale_batchnorms(decision.ctx.coupling, plan)
        plan.extra["recalibrated_batchnorms"] = recalibrate_batchnorm(
            pruned, calib_data, opts.max_batches, only=stale) if stale else 0
    plan.budget["params"] = count_params(pruned)
    plan.budget["macs"] = count_macs(pruned, example_inputs) // max(1, rows(example_inputs))


def _data(opts: PruneOptions, calib_data: Iterable[Any] | None
          ) -> tuple[Iterable[Any], dict[str, Any]] | None:
    """What compensation beyond the calibration statistics (norm gains, the sequential
    walk) runs on: the calibration data and how to shard it, when there is some."""
    if not (opts.compensate and calib_data is not None):
        return None
    return calib_data, dict(max_batches=opts.max_batches, distributed=opts.distributed)


def _options(options: PruneOptions | None, sparsity: float,
             settings: dict[str, Any]) -> PruneOptions:
    if sparsity is not _DEFAULT:
        settings = {**settings, "sparsity": sparsity}
    return PruneOptions.of(options, **settings)


@dataclass
class _Decision:
    """What deciding leaves for realising: the plan, the scoring context (coupling and
    calibration statistics, which compensation reuses) and the kept atoms per group."""

    plan: PruningPlan
    ctx: ScoreContext
    kept: dict[int, Any]


def _decide(model: torch.nn.Module, example_inputs: Any, calib_data: Iterable[Any] | None,
            opts: PruneOptions, progress: Progress | None,
            statistics: bool = False, *, budget_model: Any = None,
            coupling: Coupling | None = None, calibration: Any = None) -> _Decision:
    """make_plan's work; with ``statistics`` the calibration statistics are collected even
    when the criterion needs none (compensation uses them). A latency budget passes its
    ``budget_model`` (:class:`surgery.budget.latency.LatencyModel`), the ``coupling`` it was
    built on and, when deciding again, the ``calibration`` already collected."""
    crit = _criterion(opts, calib_data)
    coupling = coupling or _coupling(model, example_inputs, opts)
    limits = limit_to_config(coupling, model, opts.sparsity) if opts.uniform_widths else []
    cost = CostModel(coupling, node_macs(coupling.capture.graph_module,
                                         coupling.capture.example_args), opts.budget_scope,
                     batch=max(1, rows(example_inputs)))
    kinds = sorted({g.kind for g in coupling.prunable})
    search = opts.kind_weights == "search" and len(kinds) > 1
    if search and calib_data is None:
        raise CalibrationError("kind_weights='search' runs candidate pruned models on "
                               "calibration batches: pass calib_data.")
    weights = _kind_weights(opts, model, kinds)
    allot = cost if budget_model is None else budget_model
    # uniform_counts validates the weights before calibration spends any time
    counts = _counts(allot, opts, weights, limits)
    ctx = ScoreContext(coupling, seed=opts.seed, data=calib_data, max_batches=opts.max_batches,
                       distributed=opts.distributed)
    if opts.sparsity == 0:  # nothing to remove: no statistics, no scores, every atom kept
        kept = {g.id: np.arange(g.atoms) for g in coupling.prunable}
        plan = build_plan(coupling, kept, criterion=opts.criterion, target=opts.target,
                          budget=_budget(opts, cost, kept, None))
        plan.extra["layer_macs"] = cost.layer_macs(cost.mask(kept))
        return _Decision(plan, ctx, kept)
    stages = None
    if crit.needs_calibration or ((statistics or search) and calib_data is not None):
        needs_samples = getattr(getattr(crit, "estimate", None), "needs_samples", False)
        options = dict(target=opts.target, max_batches=opts.max_batches,
                       progress=_stage(progress, "calibrate"), distributed=opts.distributed,
                       samples=SAMPLES if needs_samples else 0, seed=opts.seed)
        stages = _stages(coupling, calib_data, opts, search, statistics, options)
        if stages is None:
            ctx.calibration = (calibration if calibration is not None
                               else calibrate(coupling, calib_data, **options))

    def choose(w: dict[str, float] | None) -> tuple[dict, dict]:
        ctx.kept = {}
        if opts.allocation == "global":  # every atom ranked by its own gain: a joint
            # selection stopped at the uniform count would rank the rest below every pick
            targets = {g.id: g.atoms for g in coupling.prunable}
        else:
            targets = counts if w is weights else _counts(allot, opts, w, limits)
        kept, scores = top_down(crit, ctx, targets, progress=_stage(progress, "score"),
                                stages=stages)
        if opts.allocation == "global" and budget_model is not None:
            from surgery.budget.latency import latency_kept

            kept = latency_kept(budget_model, scores, opts.sparsity, round_to=opts.round_to,
                                min_keep=opts.min_keep)
        elif opts.allocation == "global":
            kept = global_kept(cost, scores, opts.sparsity, opts.budget,
                               round_to=opts.round_to, min_keep=opts.min_keep)
        return kept, scores

    history: list = []
    if search:
        weights, history, (kept, scores) = _search_kinds(
            model, example_inputs, calib_data, ctx, choose, kinds, weights,
            compensate=statistics, progress=progress)
    else:
        kept, scores = choose(weights)
    plan = build_plan(coupling, kept, criterion=opts.criterion, target=opts.target,
                      scores=scores, budget=_budget(opts, cost, kept, weights, history))
    plan.extra["layer_macs"] = cost.layer_macs(cost.mask(kept))
    if stages is not None:
        ctx.refits = stages.refits
        plan.extra["calibration_stages"] = {"passes": stages.passes,
                                            "peak_bytes": stages.peak}
    if ctx.fallbacks:
        plan.extra["fallbacks"] = {coupling.groups[g].name: why
                                   for g, why in sorted(ctx.fallbacks.items())}
    return _Decision(plan, ctx, kept)


def _budget(opts: PruneOptions, cost: CostModel, kept: dict[int, Any],
            weights: dict[str, float] | None, history: list | None = None) -> dict[str, Any]:
    """What ``plan.budget`` records: the settings, the kind weights (and the search's
    candidates) and the estimated cost against the dense one."""
    estimate = cost.cost(cost.mask(kept))
    return {**opts.budget_record(), "kind_weights": dict(weights or {}),
            **({"kind_search": [[w, g] for w, g in history]} if history else {}),
            "dense_params": cost.dense.params, "dense_macs": cost.dense.macs,
            "estimated_params": estimate.params, "estimated_macs": estimate.macs}


def _stages(coupling: Coupling, calib_data: Iterable[Any], opts: PruneOptions, search: bool,
            statistics: bool, options: dict[str, Any]) -> Stages | None:
    """Stages when every relation's statistics at once would exceed
    ``opts.calibration_memory``, else None (one pass, everything held: the usual case)."""
    if sum(calibration_bytes(coupling).values()) <= opts.calibration_memory:
        return None
    if opts.allocation == "global" or search:
        raise OptionsError(
            "the calibration statistics of this model exceed calibration_memory="
            f"{opts.calibration_memory:,} bytes, so they are collected in stages, which needs "
            "allocation='uniform' and no kind_weights='search' (both compare every group at "
            "once); raise calibration_memory or change those options.")
    return Stages(coupling, calib_data, opts.calibration_memory, compensate=statistics,
                  calibrate_options=options)


def _criterion(opts: PruneOptions, calib_data: Iterable[Any] | None) -> Criterion:
    settings = ({"estimator": opts.estimator, "target_noise": opts.target_noise}
                if opts.criterion in ("mi", "mi_topk") else {})
    crit = get_criterion(opts.criterion, **settings)
    if crit.needs_calibration and calib_data is None:
        raise CalibrationError(
            f"criterion {opts.criterion!r} needs calibration data: pass calib_data, an iterable "
            "of batches shaped like example_inputs (optionally (inputs, labels)), or use "
            "criterion='magnitude'."
        )
    return crit


def _coupling(model: torch.nn.Module, example_inputs: Any, opts: PruneOptions) -> Coupling:
    """The model's coupling with the groups outside ``opts.kinds`` and those touching an
    ``opts.exclude``d module made unprunable (each with the reason)."""
    coupling = couple(model, example_inputs)
    present = {g.kind for g in coupling.groups}
    if opts.kinds is not None and not opts.kinds & present:
        raise OptionsError(f"kinds={sorted(opts.kinds)} names no kind of this model's groups; "
                           f"it has {sorted(present)}.")
    modules = [name for name, _ in model.named_modules() if name]
    for pattern in opts.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in modules):
            raise OptionsError(
                f"exclude pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {modules[:3]} (fnmatch patterns: '*' matches dots too)."
            )
    for g in coupling.groups:
        if not g.prunable:
            continue
        if opts.kinds is not None and g.kind not in opts.kinds:
            g.prunable, g.reason = False, f"kind {g.kind!r} not in kinds={sorted(opts.kinds)}"
            continue
        hit = next(((m, p) for m in g.modules for p in opts.exclude
                    if fnmatch.fnmatchcase(m, p)), None)
        if hit is not None:
            g.prunable, g.reason = False, f"module {hit[0]} excluded by {hit[1]!r}"
    if not coupling.prunable and opts.sparsity > 0:
        raise BudgetError(
            f"no prunable channel group in {type(model).__name__}: every channel reaches an "
            "input, an output or an unsupported op, or was excluded (see surgery.groups(...) "
            "reasons)."
        )
    return coupling


def _kind_weights(opts: PruneOptions, model: torch.nn.Module, kinds: list[str]
                  ) -> dict[str, float] | None:
    """The per-kind rates to start from: the plugin's default (also where a search starts),
    none for ``"uniform"``, or the caller's."""
    if opts.kind_weights is None or opts.kind_weights == "search":
        return call_hook("surgery_kind_weights", model=model, kinds=kinds)
    if opts.kind_weights == "uniform":
        return None
    return dict(opts.kind_weights)


def _counts(cost: CostModel, opts: PruneOptions, weights: dict[str, float] | None,
            limits: list[str]) -> dict[int, int]:
    """Atoms kept per group; ``limits``: why uniform_widths spared groups."""
    return uniform_counts(cost, opts.sparsity, opts.budget, round_to=opts.round_to,
                          min_keep=opts.min_keep, kind_weights=weights,
                          uniform_widths=opts.uniform_widths, spared=tuple(limits),
                          depth_schedule=opts.depth_schedule)


def _stage(progress: Progress | None, stage: str) -> Callable[[int], None] | None:
    return None if progress is None else (lambda i: progress(stage, i))


def _realise(model: torch.nn.Module, decision: _Decision, example_inputs: Any, *,
             compensate: bool, inplace: bool = False,
             data: tuple[Iterable[Any], dict[str, Any]] | None = None, sequential: bool = False,
             progress: Callable[[int], None] | None = None) -> torch.nn.Module:
    """Cut ``model`` (a copy unless ``inplace``) by the decision's plan, refitting the readers
    of cut groups first when ``compensate`` and calibration statistics are there. With
    ``data`` (calibration data and how to shard it), the norms across a cut hidden group get
    their gains (:mod:`surgery.cut.norm_gain`), and with ``sequential`` too, the groups a
    column cut removes are refitted on the cut model's own activations
    (:mod:`surgery.cut.sequential`), the rest from the dense statistics (``progress(i)``:
    reader ``i`` refitted)."""
    target_model = model if inplace else copy.deepcopy(model)
    ctx, plan = decision.ctx, decision.plan
    if not compensate or (ctx.refits is None and ctx.calibration is None):
        return apply_plan(target_model, plan, example_inputs, inplace=True)
    gains = norm_gains(target_model, plan.keep, data[0], **data[1]) if data else {}
    cut = [g for g in ctx.coupling.prunable if len(decision.kept[g.id]) < g.atoms]
    walked = ([g for g in cut if cut_by_columns(ctx.coupling, g)]
              if data is not None and sequential else [])
    skip = {g.id for g in walked}
    if ctx.refits is not None:
        dense = [r for r in ctx.refits if r.group not in skip]
    else:
        dense = refits(target_model, ctx.coupling, ctx.calibration,
                       {k: v for k, v in decision.kept.items() if k not in skip})
    done = []
    if walked:
        done = sequential_refits(target_model, ctx.coupling, data[0], decision.kept, walked,
                                 progress=progress, **data[1])
        plan.extra["sequential_compensation"] = {"groups": len(walked)}
    plan.extra["compensated"] = done + apply_refits(target_model, dense)
    pruned = apply_plan(target_model, plan, example_inputs, inplace=True)
    if gains:
        apply_gains(pruned, gains)
        plan.extra["norm_gains"] = {name: round(c, 6) for name, c in gains.items()}
    return pruned


def _search_kinds(model, example_inputs, calib_data, ctx: ScoreContext, choose, kinds, start,
                  *, compensate: bool, progress: Progress | None, batches: int = 8):
    """kind_weights='search' (see :mod:`surgery.budget.kind_search`): returns the chosen
    weights, the candidates tried with their output gaps, and the chosen candidate's
    (kept, scores)."""
    evaluation = list(itertools.islice(iter(calib_data), batches))
    with evaluating(model):
        dense = outputs(model, evaluation)
    found: dict[tuple, tuple[dict, dict]] = {}

    def gap(w: dict[str, float]) -> float:
        kept, scores = choose(w)
        found[tuple(sorted(w.items()))] = (kept, scores)
        plan = build_plan(ctx.coupling, kept, criterion="search", target="output", budget={})
        small = _realise(model, _Decision(plan, ctx, kept), example_inputs,
                         compensate=compensate, data=(evaluation, {})).eval()
        return output_gap(dense, outputs(small, evaluation))

    tried = itertools.count()
    log = (lambda msg: progress("search", next(tried))) if progress else None
    weights, history = search_kind_weights(gap, kinds, start, log=log)
    return weights, history, found[tuple(sorted(weights.items()))]
