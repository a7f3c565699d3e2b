"""PruneOptions: every choice ``prune`` and ``make_plan`` make, in one validated object.

The same settings reach the engine from Python keywords, from ``surgery prune``'s options and
from benchmarks; one dataclass holds their defaults, their documentation and their checks, so a
bad value is refused before anything is traced or calibrated, whichever way it came in.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from surgery.budget.allocate import DEPTH_SCHEDULES
from surgery.budget.cost import KINDS
from surgery.budget.latency_spec import LatencySpec, check_speedup
from surgery.errors import BudgetError, CalibrationError, OptionsError
from surgery.scoring.estimators import TARGET_NOISE

TARGETS = ("output", "labels")
BUDGETS = (*KINDS, "latency")
ALLOCATIONS = ("uniform", "global")
KIND_WEIGHT_MODES = ("search", "uniform")


@dataclass(frozen=True)
class PruneOptions:
    """What to remove and how to choose it.

    - ``sparsity``: share of the ``budget`` to remove, in [0, 1).
    - ``budget``: what ``sparsity`` counts: ``"macs"`` or ``"params"``; or ``"latency"``:
      measured time on a device, with ``target_speedup`` (``sparsity`` is then unused).
    - ``target_speedup``: with ``budget="latency"``, how many times faster than the dense
      model (e.g. 2); or give ``latency=LatencySpec(target_ms=...)``.
    - ``latency``: where and how latency is measured (device, threads, batch, backend
      ``"torch"`` or ``"onnxruntime"``; :class:`surgery.budget.latency_spec.LatencySpec`);
      default: CPU at torch's threads, the example inputs' batch. See
      :mod:`surgery.budget.latency_table`.
    - ``budget_scope``: parameter-name prefixes the params budget counts (e.g.
      ``"bert.encoder"`` for "encoder parameters removed"); default: all parameters.
    - ``kinds``: only cut groups of these kinds (e.g. ``{"neuron", "head"}`` to keep a
      transformer's hidden size); default: every prunable group.
    - ``exclude``: module-name patterns (``fnmatch``: ``"layer4.*"``, ``"*.attention.*"``)
      whose weights must stay as they are: every group touching a matching module is left
      whole. A pattern that matches no module is refused (a typo would silently do nothing).
    - ``kind_weights``: per-kind removal rates relative to one shared rate, e.g.
      ``{"neuron": 1, "head": 0.5, "hidden": 0.25}`` cuts FFN neurons twice as fast as heads;
      ``"search"`` refines the default by trying candidates on calibration batches (about ten
      prunes' time; see :mod:`surgery.budget.kind_search`); ``"uniform"``: every kind at the
      same rate (the paper's setting); default: the plugin's (transformers: neurons 1, heads
      0.5, hidden dims 0.1), else uniform.
    - ``depth_schedule``: ``"flat"`` (every layer at the shared rate: the paper's setting) or
      ``"log"``: the rate rises with depth as ``ln(i + 1)`` (the first layer of each kind
      whole; SlimGPT's schedule; :func:`surgery.budget.allocate.depth_weights`). Needs
      ``allocation="uniform"`` without ``uniform_widths``.
    - ``criterion``: ``mi`` (default: joint top-down MI), ``mi_topk``, ``act_weight``,
      ``taylor``, ``magnitude``, ``random`` or a plugin's.
    - ``target``: what the top layer's channels must explain: ``output`` (the dense model's
      own output; no labels needed) or ``labels``.
    - ``allocation``: ``uniform`` keep ratio per group, or ``global`` by normalised score.
    - ``estimator``: the MI estimator of ``mi``/``mi_topk`` (``gaussian``, ``binned``,
      ``ksg`` or a plugin's).
    - ``target_noise``: the Gaussian estimators see each target through noise of this many
      times its mean variance (default 10: a direction of the target counts by its variance;
      near 0 every direction counts alike; see
      :data:`surgery.scoring.estimators.TARGET_NOISE` for what was measured).
    - ``round_to``: kept channels per group are multiples of this (e.g. 16 for hardware; a
      head of 32 channels needs no rounding, a neuron does); ``"auto"``: the multiple the
      latency device was measured to prefer (1 when it prefers none); ``min_keep``: the
      fewest atoms a group keeps.
    - ``max_batches``: calibration batches to use at most (default: all).
    - ``seed``: for ``random`` and the sample-based estimators' reservoirs.
    - ``distributed``: under ``torch.distributed`` (auto-detected when None), each rank folds
      in its share of the calibration data and the statistics are all-reduced; every rank
      returns the same plan (see :mod:`surgery.stats.distributed`).
    - ``compensate``: refit every conv/linear that reads a cut group by least squares from
      its kept inputs (uses the calibration statistics; skipped without them).
    - ``sequential``: with ``compensate``, refit the readers bottom-up, each on the
      activations of the model as cut below it rather than the dense model's (about one
      more calibration pass, holding every calibration batch's live activations at one
      point; hidden dims keep the dense refit; see :mod:`surgery.cut.sequential`).
    - ``recalibrate``: re-estimate BatchNorm running statistics on the calibration data after
      the cut (no labels, one pass; skipped when there is no BatchNorm or no data).
    - ``uniform_widths``: every layer keeps the same width per kind (every group of a kind
      with the same number of atoms keeps as many: the heads of every layer, the FFN neurons
      of every layer), and only kinds the model's own config can express are cut (plugins say
      which through ``surgery_config_limits``; the others become unprunable with the reason),
      so a Hugging Face model saves as a plain folder that ``from_pretrained`` loads without
      surgery. A BERT's config derives the head size from ``hidden_size``, so only its FFN
      neurons are cut; HF ViT reads ``head_dim``, so heads and hidden dims are cut too. Needs
      ``allocation="uniform"`` (a global threshold gives each group its own width).
    - ``calibration_memory``: bytes of calibration statistics held at once (default 4 GiB).
      Above it, groups are calibrated, decided and freed in stages, one pass over the
      calibration data each (:mod:`surgery.stats.stages`): what lets an 8B-parameter layout be
      pruned on one GPU. Needs ``allocation="uniform"`` and no kind-weight search.
    """

    sparsity: float = 0.5
    budget: str = "macs"
    budget_scope: tuple[str, ...] = ()
    kinds: frozenset[str] | None = None
    exclude: tuple[str, ...] = ()
    kind_weights: Mapping[str, float] | str | None = None
    depth_schedule: str = "flat"
    criterion: str = "mi"
    target: str = "output"
    allocation: str = "uniform"
    estimator: str = "gaussian"
    target_noise: float = TARGET_NOISE
    round_to: int | str = 1
    min_keep: int = 1
    max_batches: int | None = None
    seed: int = 0
    distributed: bool | None = None
    compensate: bool = True
    sequential: bool = False
    recalibrate: bool = True
    uniform_widths: bool = False
    calibration_memory: int = 4 * 2**30
    target_speedup: float | None = None
    latency: LatencySpec | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if isinstance(self.budget_scope, str):
            set_(self, "budget_scope", (self.budget_scope,) if self.budget_scope else ())
        else:
            set_(self, "budget_scope", tuple(self.budget_scope))
        if isinstance(self.exclude, str):
            set_(self, "exclude", (self.exclude,))
        else:
            set_(self, "exclude", tuple(self.exclude))
        if self.kinds is not None:
            set_(self, "kinds", frozenset([self.kinds] if isinstance(self.kinds, str)
                                          else self.kinds))
        if isinstance(self.kind_weights, Mapping):
            set_(self, "kind_weights", dict(self.kind_weights))
        self._check()

    def _check(self) -> None:
        if self.budget not in BUDGETS:
            raise BudgetError(f"budget must be one of {BUDGETS}, got {self.budget!r}.")
        if self.latency is not None and not isinstance(self.latency, LatencySpec):
            raise OptionsError(f"latency must be a surgery.LatencySpec, got "
                               f"{type(self.latency).__name__}.")
        if self.budget == "latency":
            check_speedup(self.target_speedup, self.latency)
        elif self.target_speedup is not None:
            raise BudgetError(f"target_speedup is for budget='latency'; with "
                              f"budget={self.budget!r} say how much to remove with sparsity.")
        if (not isinstance(self.sparsity, numbers.Real) or isinstance(self.sparsity, bool)
                or not 0.0 <= self.sparsity < 1.0):
            raise BudgetError(
                f"sparsity must be a fraction in [0, 1) of {self.budget} to remove, got "
                f"{self.sparsity!r}; e.g. 0.5 removes half."
            )
        if self.target not in TARGETS:
            raise CalibrationError(f"target must be one of {TARGETS}, got {self.target!r}.")
        if self.allocation not in ALLOCATIONS:
            raise BudgetError(f"allocation must be one of {ALLOCATIONS}, got "
                              f"{self.allocation!r}.")
        round_to = 1 if self.round_to == "auto" else self.round_to
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                   for v in (round_to, self.min_keep)):
            raise BudgetError(f"round_to and min_keep must be whole numbers >= 1, round_to may "
                              f"also be 'auto' (got {self.round_to!r}, {self.min_keep!r}).")
        if (not isinstance(self.calibration_memory, numbers.Integral)
                or self.calibration_memory < 1):
            raise BudgetError(f"calibration_memory must be a positive number of bytes, got "
                              f"{self.calibration_memory!r}.")
        if self.uniform_widths and self.allocation != "uniform":
            raise BudgetError(
                f"uniform_widths=True keeps one width per kind across layers, but "
                f"allocation={self.allocation!r} gives each group its own width by score; use "
                "allocation='uniform' with uniform_widths (or drop uniform_widths).")
        if (not isinstance(self.target_noise, numbers.Real) or isinstance(self.target_noise, bool)
                or not 0 < self.target_noise < float("inf")):
            raise OptionsError(f"target_noise must be a positive number (times the target's "
                               f"mean variance; default {TARGET_NOISE:g}), got "
                               f"{self.target_noise!r}.")
        if self.depth_schedule not in DEPTH_SCHEDULES:
            raise BudgetError(f"depth_schedule must be one of {DEPTH_SCHEDULES}, got "
                              f"{self.depth_schedule!r}.")
        if self.depth_schedule != "flat" and (self.allocation != "uniform"
                                               or self.uniform_widths):
            raise BudgetError(
                f"depth_schedule={self.depth_schedule!r} sets each layer's rate by its depth, "
                "which needs allocation='uniform' and no uniform_widths (a global threshold "
                "sets the rates by score, uniform_widths keeps one width in every layer).")
        if self.sequential and not self.compensate:
            raise OptionsError("sequential=True refits the readers of cut groups one after "
                               "another, which is compensation: it needs compensate=True.")
        if isinstance(self.kind_weights, str) and self.kind_weights not in KIND_WEIGHT_MODES:
            raise BudgetError(f"kind_weights must be a dict {{kind: weight}}, 'search', "
                              f"'uniform' or None, got {self.kind_weights!r}.")

    @classmethod
    def of(cls, options: "PruneOptions | None" = None, **settings: Any) -> "PruneOptions":
        """``options`` (default: all defaults) with ``settings`` replaced; an unknown name is an
        :class:`OptionsError` listing the valid ones."""
        unknown = sorted(set(settings) - set(cls.names()))
        if unknown:
            raise OptionsError(f"unknown pruning option(s) {unknown}; the options are "
                            f"{cls.names()} (see surgery.PruneOptions).")
        return dataclasses.replace(options or cls(), **settings)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def budget_record(self) -> dict[str, Any]:
        """The settings a plan records under ``plan.budget``."""
        return {"kind": self.budget, "scope": list(self.budget_scope),
                "sparsity": self.sparsity, "allocation": self.allocation,
                "round_to": self.round_to, "min_keep": self.min_keep,
                "depth_schedule": self.depth_schedule,
                "estimator": self.estimator, "target_noise": self.target_noise,
                "uniform_widths": self.uniform_widths,
                **({"target_speedup": self.target_speedup} if self.budget == "latency" else {})}


__all__ = ["PruneOptions", "TARGETS", "ALLOCATIONS", "BUDGETS", "LatencySpec"]
