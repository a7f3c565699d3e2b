"""Pruning to a measured latency: ``prune(..., budget="latency", target_speedup=2)``.

The steps, each measured on the device the budget names (:class:`LatencySpec`):

1. the latency table for this model, device, threads, backend, batch and shapes, from the
   cache or measured now (:mod:`surgery.budget.latency_table`);
2. the allocation that meets the asked speedup *under the table's model*
   (:class:`surgery.budget.latency.LatencyModel`: uniform with per-kind weights, or the
   score-greedy knapsack with ``allocation="global"``), channels rounded to the device's
   measured preferred multiple with ``round_to="auto"``;
3. the pruned model is built and timed for real beside the dense one (interleaved rounds,
   median per-round ratio); when it misses the asked speedup by more than the tolerance (5%),
   the model's error on this plan is taken as the correction (ask the model for
   ``asked * modelled / achieved``), and the plan is decided once more with the statistics
   already collected, built and timed again; the attempt measured closer to the asked
   speedup is returned (both are recorded).

``plan.budget`` records what was asked, what the model promised and what was measured, for
each attempt; ``plan.extra["latency_model"]`` the measured points and the fit per layer kind
that the report draws.

Causal language models: the table is generic over groups and fx nodes, so the decoder
plugin's groups (KV heads, FFN neurons, hidden dims) are priced like an encoder's, for
*prefill* latency (the example inputs' sequence length). Decode tokens/s (``generate()`` with
the KV cache) is not measured here yet.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from surgery._core.batches import rows, to_device
from surgery.budget.allocate import atom_step
from surgery.budget.latency import LatencyModel
from surgery.budget.latency_spec import LatencySpec
from surgery.budget.latency_table import load_or_build, measure_multiple
from surgery.budget.timers import timer_for
from surgery.cut.plan import PruningPlan
from surgery.errors import BudgetError, OptionsError
from surgery.options import PruneOptions
from surgery.timing import Speedup


def repeat_rows(inputs: Any, batch: int) -> Any:
    """``inputs`` with every batched tensor's rows repeated (or cut) to ``batch`` rows."""
    from torch.utils._pytree import tree_map_only

    n = rows(inputs)

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] != n or n == 0:
            return t
        reps = -(-batch // n)
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].contiguous()

    return tree_map_only(torch.Tensor, grow, inputs)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclasses.dataclass
class _Setup:
    spec: LatencySpec
    timer: Any
    inputs: Any
    coupling: Any
    model: LatencyModel | None
    cached: bool
    round_to: int


def _setup(model: torch.nn.Module, example_inputs: Any, opts: PruneOptions) -> _Setup:
    from surgery import api

    spec = opts.latency or LatencySpec()
    where = _model_device(model)
    if spec.timer is None and spec.backend == "torch" and where != torch.device(spec.device) \
            and not (where.type == "cuda" and spec.device == "cuda"):
        raise OptionsError(f"the model is on {where} but latency is to be measured on "
                           f"{spec.device!r}: move it there first (model.to({spec.device!r})).")
    timer = timer_for(spec)
    batch = spec.batch or max(1, rows(example_inputs))
    inputs = to_device(repeat_rows(example_inputs, batch), where)
    coupling = api._coupling(model, example_inputs, opts)
    if opts.budget != "latency":  # round_to="auto" under a params or MACs budget
        multiple, _ = measure_multiple(model, coupling, inputs, timer=timer,
                                       rounds=spec.rounds, device=where)
        return _Setup(spec, timer, inputs, coupling, None, False, multiple)
    table, cached = load_or_build(
        model, coupling, inputs, example_inputs, timer=timer, ratios=spec.ratios,
        rounds=spec.rounds, round_to=opts.round_to, min_keep=opts.min_keep, device=where,
        cache=spec.cache)
    return _Setup(spec, timer, inputs, coupling, LatencyModel(coupling, table), cached,
                  table.multiple)


def _asked(opts: PruneOptions, setup: _Setup) -> float:
    """The asked speedup; a target time becomes one through the table's measured dense time."""
    if opts.budget != "latency":
        return 1.0
    if opts.target_speedup is not None:
        return float(opts.target_speedup)
    dense_ms = setup.model.table.end_to_end[0] * 1e3
    target_ms = float(setup.spec.target_ms)
    if target_ms > dense_ms:
        raise BudgetError(f"target_ms={target_ms:g} is slower than the dense model, measured at "
                          f"{dense_ms:.3g} ms per batch of {setup.model.table.batch}: nothing to "
                          "cut.")
    return dense_ms / target_ms


def _options_for(opts: PruneOptions, setup: _Setup, modelled: float) -> PruneOptions:
    """``opts`` with the modelled target as the share of dense time to save."""
    if opts.budget != "latency":
        return dataclasses.replace(opts, round_to=setup.round_to)
    return dataclasses.replace(opts, sparsity=max(0.0, 1.0 - 1.0 / modelled),
                               round_to=setup.round_to)


def _decide(model: torch.nn.Module, example_inputs: Any, calib_data: Iterable[Any] | None,
            opts: PruneOptions, setup: _Setup, modelled: float, progress: Any,
            calibration: Any = None, statistics: bool = False) -> Any:
    from surgery import api

    per = _options_for(opts, setup, modelled)
    budget_model = setup.model if opts.budget == "latency" else None
    try:
        return api._decide(model, example_inputs, calib_data, per, progress,
                           statistics=statistics, budget_model=budget_model,
                           coupling=setup.coupling, calibration=calibration)
    except BudgetError as exc:
        if budget_model is None:
            raise
        most = _reachable(setup, opts)
        raise BudgetError(
            f"target speedup {modelled:.2f}x is beyond what this model can reach on "
            f"{setup.timer.key}: with every prunable group down to min_keep={opts.min_keep} "
            f"atom(s) the latency model says {most:.2f}x at batch {setup.model.table.batch} "
            f"(the untouched layers and fixed costs remain). Ask for less.") from exc


def _chosen(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return next((a for a in attempts if a.get("chosen")), attempts[-1])


def _reachable(setup: _Setup, opts: PruneOptions) -> float:
    """The modelled speedup with every prunable group down to the floor the allocations use:
    ``min_keep`` atoms, raised to one rounding step (a width off the device's multiple is
    priced with its cliff, so a floor of one atom could model slower than the step)."""
    floor = {g.id: min(g.atoms, max(1, opts.min_keep, atom_step(g, setup.round_to)))
             for g in setup.coupling.prunable}
    return setup.model.speedup(setup.model.counts_mask(floor))


def _record(plan: PruningPlan, opts: PruneOptions, setup: _Setup, asked: float,
            attempts: list[dict[str, Any]]) -> None:
    table = setup.model.table
    plan.budget.update({
        "kind": opts.budget, "round_to": setup.round_to,
        "latency": {"device": setup.timer.key, "batch": table.batch,
                    "backend": setup.spec.backend, "asked_speedup": asked,
                    **({"target_ms": setup.spec.target_ms} if setup.spec.target_ms else {}),
                    "table_cached": setup.cached, "preferred_multiple":
                        table.preferred_multiple, "attempts": attempts,
                    **({"modelled_speedup": _chosen(attempts)["modelled"],
                        "achieved_speedup": _chosen(attempts).get("achieved"),
                        "corrected": len(attempts) > 1} if attempts else {})}})
    plan.extra["latency_model"] = {**setup.model.summary(), "asked": asked,
                                   "attempts": attempts}


def plan_to_latency(model: torch.nn.Module, example_inputs: Any,
                    calib_data: Iterable[Any] | None, opts: PruneOptions, *,
                    progress: Any = None) -> PruningPlan:
    """``make_plan`` for a latency budget (or ``round_to="auto"``): the modelled allocation,
    nothing built or timed beyond the table."""
    setup = _setup(model, example_inputs, opts)
    asked = _asked(opts, setup)
    decision = _decide(model, example_inputs, calib_data, opts, setup, asked, progress)
    if setup.model is None:
        decision.plan.budget["round_to"] = setup.round_to
        return decision.plan
    modelled = setup.model.speedup(setup.model.mask(decision.kept))
    _record(decision.plan, opts, setup, asked, [{"modelled": modelled, "target": asked}])
    return decision.plan


def prune_to_latency(model: torch.nn.Module, example_inputs: Any,
                     calib_data: Iterable[Any] | None, opts: PruneOptions, *,
                     inplace: bool = False, progress: Any = None
                     ) -> tuple[torch.nn.Module, PruningPlan]:
    """``prune`` for a latency budget (see the module docstring); with ``round_to="auto"``
    and a params or MACs budget, only the rounding comes from the measured table."""
    from surgery import api

    setup = _setup(model, example_inputs, opts)
    asked = _asked(opts, setup)
    target = asked
    attempts: list[dict[str, Any]] = []
    results: list[tuple[float, Any, torch.nn.Module, float]] = []
    calibration = None
    latency = opts.budget == "latency"
    tries = 2 if latency and setup.spec.correct else 1
    for attempt in range(tries):
        decision = _decide(model, example_inputs, calib_data, opts, setup, target, progress,
                           calibration=calibration, statistics=opts.compensate)
        calibration = decision.ctx.calibration
        pruned = api._realise(model, decision, example_inputs, compensate=opts.compensate,
                              data=api._data(opts, calib_data), sequential=opts.sequential,
                              progress=api._stage(progress, "compensate"))
        per = _options_for(opts, setup, target)
        api._recover(pruned, decision, calib_data, per, example_inputs)
        if not latency:
            break
        modelled = setup.model.speedup(setup.model.mask(decision.kept))
        samples = setup.timer.models({"dense": model, "pruned": pruned}, setup.inputs,
                                     max(9, setup.spec.rounds))
        achieved = Speedup.of(samples["dense"], samples["pruned"])
        attempts.append({"target": target, "modelled": modelled, "achieved": achieved.ratio,
                         "quartiles": [achieved.low, achieved.high],
                         "dense_ms": 1e3 * sorted(samples["dense"])[len(samples["dense"]) // 2],
                         "pruned_ms": 1e3 * sorted(samples["pruned"])[len(samples["pruned"]) // 2],
                         "noisy": achieved.noisy})
        results.append((abs(achieved.ratio / asked - 1.0), decision, pruned, target))
        if abs(achieved.ratio / asked - 1.0) <= setup.spec.tolerance or attempt == tries - 1:
            break
        # the model's error on this plan, taken to hold for the plan next to it (at most
        # what the model can reach: a miss beyond it is reported, not refused)
        target = max(1.0, min(modelled * asked / achieved.ratio,
                              0.999 * _reachable(setup, opts)))
    if results:  # the attempt measured closest to the asked speedup
        best = min(range(len(results)), key=lambda i: results[i][0])
        _, decision, pruned, target = results[best]
        for i, a in enumerate(attempts):
            a["chosen"] = i == best
    plan = decision.plan
    if latency:
        _record(plan, opts, setup, asked, attempts)
    else:
        plan.budget["round_to"] = setup.round_to
    if inplace:  # the dense model was needed for timing until now: cut it the same way
        pruned = api._realise(model, decision, example_inputs, compensate=opts.compensate,
                              inplace=True, data=api._data(opts, calib_data),
                              sequential=opts.sequential)
        api._recover(pruned, decision, calib_data, _options_for(opts, setup, target),
                     example_inputs)
    return pruned, plan


__all__ = ["plan_to_latency", "prune_to_latency", "repeat_rows"]
