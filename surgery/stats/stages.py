"""Staged calibration: hold the statistics of a few groups at a time, decide them, free them.

Calibration keeps, per layer reading a group, the second moments of its input and of what it
writes: on a Llama-3-8B layout one decoder layer's FFN relation alone is a 14336-wide
covariance (1.6 GB in float64), and all 32 layers would not fit next to the model. Top-down
scoring decides groups in runs (:func:`surgery.scoring.top_down`); when the statistics of every
relation would exceed ``PruneOptions.calibration_memory``, each run is cut into stages that
fit, and each stage is one pass over the calibration data that collects only its groups'
relations. Once a stage's groups are decided, compensation's refits for them are computed
(they need only those statistics) and the statistics are dropped. Memory stays bounded by one
stage; time grows by one calibration pass per stage.
"""

from __future__ import annotations

from typing import Any, Iterable

from surgery.cut.compensation import Refit, refits
from surgery.graph.groups import ChannelGroup, Coupling
from surgery.stats.calibration import calibrate, calibration_bytes


class Stages:
    """Cuts runs of groups into stages within ``budget`` bytes of statistics, calibrates each
    stage when it is entered and computes its refits when it is left."""

    def __init__(self, coupling: Coupling, calib_data: Iterable[Any], budget: int, *,
                 compensate: bool, calibrate_options: dict[str, Any]) -> None:
        self.coupling, self.calib_data, self.budget = coupling, calib_data, budget
        self.compensate, self.options = compensate, calibrate_options
        self.bytes = calibration_bytes(coupling)
        self.refits: list[Refit] = []
        self.passes = 0
        self.peak = 0

    def relations(self, groups: list[ChannelGroup]) -> list[int]:
        ids = {g.id for g in groups}
        return [i for i, rel in enumerate(self.coupling.relations) if rel.group in ids]

    def chunks(self, run: list[ChannelGroup]) -> list[list[ChannelGroup]]:
        """``run`` in consecutive stages whose statistics fit the budget (a group that alone
        exceeds it is a stage of its own)."""
        out: list[list[ChannelGroup]] = []
        size = 0
        for group in run:
            need = sum(self.bytes[i] for i in self.relations([group]))
            if out and size + need <= self.budget:
                out[-1].append(group)
                size += need
            else:
                out.append([group])
                size = need
        return out

    def enter(self, groups: list[ChannelGroup], ctx: Any) -> None:
        relations = self.relations(groups)
        self.peak = max(self.peak, sum(self.bytes[i] for i in relations))
        ctx.calibration = calibrate(self.coupling, self.calib_data, relations=relations,
                                    **self.options) if relations else None
        self.passes += bool(relations)

    def leave(self, groups: list[ChannelGroup], ctx: Any) -> None:
        if self.compensate and ctx.calibration is not None:
            kept = {g.id: ctx.kept[g.id] for g in groups}
            self.refits += refits(self.coupling.capture.model, self.coupling, ctx.calibration,
                                  kept)
        ctx.calibration = None
