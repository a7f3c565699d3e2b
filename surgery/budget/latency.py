"""The latency model: seconds per batch of a keep decision, from a measured table.

:class:`LatencyModel` prices a keep mask the way :class:`~surgery.budget.cost.CostModel`
prices params and MACs (same ``mask``/``removed`` interface, so the uniform allocation and
its per-group refinement work unchanged with ``kind="latency"``), but from what the device
measured: each varying node's piecewise-linear, non-decreasing time in its work, a penalty
for widths off the measured preferred multiple, a constant for the untouched nodes, and the
monotone piecewise-linear map of their sum onto the measured whole-model times
(:mod:`surgery.budget.latency_table`).

:func:`latency_kept` is the allocation that uses scores (``allocation="global"``): a greedy
knapsack that removes, step by step, the rounding step of atoms that loses the least
normalised score per modelled second saved, until the modelled time meets the target.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from surgery.budget.allocate import atom_step, percents
from surgery.budget.latency_table import LatencyTable, WorkMap, keep_mask
from surgery.errors import BudgetError
from surgery.graph.groups import Coupling


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the closest non-decreasing sequence (equal weights)."""
    blocks: list[list[float]] = []
    for v in y.tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, n2 = blocks.pop()
            v1, n1 = blocks.pop()
            blocks.append([(v1 * n1 + v2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), v) for v, n in blocks])


class LatencyModel:
    """Modelled seconds per batch for keep masks of ``coupling``'s groups (see the module
    docstring). ``seconds(keep)``, ``speedup(keep)``; ``removed(keep, "latency")`` is the
    share of the dense modelled time a keep mask saves, what the allocations bisect."""

    def __init__(self, coupling: Coupling, table: LatencyTable) -> None:
        self.coupling = coupling
        self.table = table
        self.work_map = WorkMap(coupling)
        index = {n: i for i, n in enumerate(table.nodes)}
        self._rows = np.array([index.get(n, -1) for n in self.work_map.nodes], dtype=np.int64)
        self.multiple = table.multiple
        cliffs = [table.cliffs.get(k) for k in self.work_map.kinds]
        self.penalty = np.array([c.penalty if c is not None and c.multiple > 1 else 0.0
                                 for c in cliffs])
        self.node_multiple = np.array([c.multiple if c is not None else 1 for c in cliffs])
        self._fit()
        self.dense_seconds = self.seconds(np.ones(self.work_map.n_labels, dtype=bool))

    # ---- fitting --------------------------------------------------------------------------
    def _fit(self) -> None:
        """Per node, breakpoints (work, seconds): the measured points divided by their cliff
        penalty, made non-decreasing, extended to zero work; then the map of their sum onto the
        measured whole-model times (:meth:`_whole`)."""
        t = self.table
        points = len(t.ratios) + 1
        xs = np.zeros((len(self._rows), points))
        ys = np.zeros((len(self._rows), points))
        known = np.zeros(len(self._rows), dtype=bool)
        from surgery.budget.latency_table import uniform_counts_at

        at = np.stack([self._cliff(keep_mask(self.coupling, uniform_counts_at(
            self.coupling, r, t.multiple, 1))) for r in t.ratios], axis=1)
        for i, row in enumerate(self._rows):
            if row < 0:
                continue
            work = np.asarray(t.work[row])
            seconds = np.asarray(t.seconds[row], dtype=np.float64) / at[i]
            xs[i], ys[i] = _breakpoints(work, seconds, points)
            known[i] = True
        self._xs, self._ys, self._known = xs, ys, known
        node_sums = []
        for j in range(len(t.ratios)):
            sums = 0.0
            for i, row in enumerate(self._rows):
                if row >= 0:
                    sums += self._curve_one(i, t.work[row][j]) * at[i, j]
            node_sums.append(sums + t.constant)
        s = np.asarray(node_sums)
        e = np.asarray(t.end_to_end, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        self._map_s, self._map_e = s[order], _isotonic(e[order])
        self.node_sums = node_sums

    def _whole(self, node_sum: float) -> float:
        """The node-by-node sum mapped onto measured whole-model seconds: piecewise linear
        through the measured points (non-decreasing), proportional beyond them."""
        s, e = self._map_s, self._map_e
        if node_sum <= s[0]:
            return float(e[0] * node_sum / max(s[0], 1e-30))
        if node_sum >= s[-1]:
            return float(e[-1] * node_sum / max(s[-1], 1e-30))
        return float(np.interp(node_sum, s, e))

    def _curve_one(self, i: int, w: float) -> float:
        return float(np.interp(w, self._xs[i], self._ys[i]))

    # ---- pricing ------------------------------------------------------------------------
    def node_seconds(self, keep: np.ndarray) -> np.ndarray:
        """Modelled seconds of every varying node (before the whole-model map)."""
        work = self.work_map.work(keep)
        xs, ys = self._xs, self._ys
        k = np.clip((xs <= work[:, None]).sum(1) - 1, 0, xs.shape[1] - 2)
        rows = np.arange(len(work))
        x0, x1 = xs[rows, k], xs[rows, k + 1]
        y0, y1 = ys[rows, k], ys[rows, k + 1]
        span = np.where(x1 > x0, x1 - x0, 1.0)
        frac = np.clip((work - x0) / span, 0.0, None)
        frac = np.where(work >= xs[:, -1], 1.0, frac)
        seconds = np.where(self._known, y0 + frac * (y1 - y0), 0.0)
        return seconds * self._cliff(keep)

    def _cliff(self, keep: np.ndarray) -> np.ndarray:
        """Per node, ``1 + penalty`` when one of its widths is off its kind's multiple."""
        factor = np.ones(len(self.penalty))
        for m in np.unique(self.node_multiple[self.penalty > 0]).tolist():
            on = (self.node_multiple == m) & (self.penalty > 0)
            off = self.work_map.off_multiple(keep, int(m))
            factor = np.where(on & off, 1 + self.penalty, factor)
        return factor

    def seconds(self, keep: np.ndarray) -> float:
        """Modelled seconds per batch of the model cut to ``keep`` (a label mask)."""
        return self._whole(self.table.constant + float(self.node_seconds(keep).sum()))

    def speedup(self, keep: np.ndarray) -> float:
        return self.dense_seconds / self.seconds(keep)

    def removed(self, keep: np.ndarray, kind: str = "latency") -> float:
        return 1.0 - self.seconds(keep) / self.dense_seconds

    def mask(self, kept: dict[int, np.ndarray]) -> np.ndarray:
        keep = np.ones(self.work_map.n_labels, dtype=bool)
        for g in self.coupling.prunable:
            if g.id in kept:
                drop = np.setdiff1d(np.arange(g.atoms), kept[g.id])
                keep[g.labels[drop]] = False
        return keep

    def counts_mask(self, counts: dict[int, int]) -> np.ndarray:
        return keep_mask(self.coupling, counts)

    # ---- what the report draws ----------------------------------------------------------
    def summary(self, ratios: np.ndarray | None = None) -> dict[str, Any]:
        """Measured points and the fit per layer kind, at uniform keep ratios (first atoms,
        widths on the model's multiple), in milliseconds; and the cliffs."""
        from surgery.budget.latency_table import uniform_counts_at

        t = self.table
        grid = np.linspace(0.1, 1.0, 19) if ratios is None else ratios
        kinds = sorted(set(self.work_map.kinds))
        measured = {k: [0.0] * len(t.ratios) for k in kinds}
        for row, kind in zip(range(len(t.nodes)), t.kinds):
            for j in range(len(t.ratios)):
                measured.setdefault(kind, [0.0] * len(t.ratios))[j] += t.seconds[row][j] * 1e3
        fit = {k: [] for k in kinds}
        total = []
        for r in grid:
            keep = keep_mask(self.coupling, uniform_counts_at(self.coupling, float(r),
                                                              self.multiple, 1))
            per = self.node_seconds(keep)
            for k in kinds:
                fit[k].append(float(per[np.asarray(self.work_map.kinds) == k].sum() * 1e3))
            total.append(self.seconds(keep) * 1e3)
        return {"ratios": list(t.ratios), "measured_ms": measured,
                "end_to_end_ms": [s * 1e3 for s in t.end_to_end],
                "constant_ms": t.constant * 1e3, "grid": [float(r) for r in grid],
                "fit_ms": fit, "total_ms": total, "multiple": self.multiple,
                "cliffs": {k: {"layer": c.layer, "widths": c.widths,
                               "ms": [s * 1e3 for s in c.seconds], "multiple": c.multiple,
                               "penalty": c.penalty} for k, c in t.cliffs.items()},
                "batch": t.batch}


def _breakpoints(work: np.ndarray, seconds: np.ndarray, points: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``points`` breakpoints through the measured (work, seconds): sorted, equal works
    averaged, non-decreasing, and a first point at zero work on the line through the two
    smallest (never below zero, never above the smallest measured)."""
    order = np.argsort(work, kind="stable")
    w, s = work[order], seconds[order]
    uniq, inverse = np.unique(np.round(w, 12), return_inverse=True)
    mean = np.bincount(inverse, weights=s) / np.bincount(inverse)
    y = _isotonic(mean)
    if len(uniq) >= 2 and uniq[1] > uniq[0]:
        slope = (y[1] - y[0]) / (uniq[1] - uniq[0])
        y0 = float(np.clip(y[0] - slope * uniq[0], 0.0, y[0]))
    else:
        y0 = float(y[0])
    x = np.concatenate([[0.0], uniq])
    y = np.concatenate([[y0], y])
    if uniq[0] <= 0:
        x, y = x[1:], y[1:]
    pad = points - len(x)
    if pad > 0:  # equal works (a node on groups min_keep holds): repeat the last point
        x = np.concatenate([x, np.full(pad, x[-1] + 1e-9 * np.arange(1, pad + 1))])
        y = np.concatenate([y, np.full(pad, y[-1])])
    return x[:points], y[:points]


def latency_kept(model: LatencyModel, scores: dict[int, np.ndarray], sparsity: float, *,
                 round_to: int = 1, min_keep: int = 1, rounds: int = 8
                 ) -> dict[int, np.ndarray]:
    """Kept atoms per group maximising the kept normalised score (scores divided by each
    group's best, as ``global_kept`` does) while the modelled time saves ``sparsity`` of the
    dense time.

    A greedy knapsack over rounding steps (each group's lowest-scoring step next), by least
    score lost per second saved, evaluated lazily (a step's price is recomputed when it comes
    to the top and taken if still the best); then steps given back while the target holds;
    then up to ``rounds`` of local search: give one group a step back and let the greedy pay
    for it elsewhere, kept when the score rises. Steps of a small model are coarse (one of 8
    hidden dims can be a tenth of the time), which the last two phases make up for."""
    groups = list(model.coupling.prunable)
    target = model.dense_seconds * (1.0 - sparsity)
    search = _Knapsack(model, groups, scores, round_to, min_keep)
    counts, now = search.remove_until({g.id: g.atoms for g in groups}, target)
    counts, now = search.fill_back(counts, now, target)
    for _ in range(rounds):
        best = None
        for g in groups:
            if counts[g.id] >= g.atoms or now > target:
                continue
            more = {**counts, g.id: min(g.atoms, counts[g.id] + search.steps[g.id])}
            trial, seconds = search.remove_until(more, target, hold=g.id)
            if seconds <= target and search.score(trial) > search.score(
                    counts if best is None else best[0]) + 1e-9:
                best = (trial, seconds)
        if best is None:
            break
        counts, now = search.fill_back(*best, target)
    if now > target * (1 + 1e-6):
        at_most, asked = percents(1 - now / model.dense_seconds, sparsity)
        raise BudgetError(f"the latency model allows at most {at_most} of the dense time to be "
                          f"saved with min_keep={min_keep}; asked for {asked}.")
    return {g.id: np.sort(search.order[g.id][:counts[g.id]]) for g in groups}


class _Knapsack:
    """The moves of :func:`latency_kept` over counts per group (each group keeps its
    best-scoring atoms)."""

    def __init__(self, model: LatencyModel, groups: list, scores: dict[int, np.ndarray],
                 round_to: int, min_keep: int) -> None:
        self.model, self.groups = model, groups
        self.by_id = {g.id: g for g in groups}
        self.order = {g.id: np.argsort(-scores[g.id], kind="stable") for g in groups}
        self.cum = {}
        for g in groups:
            norm = np.asarray(scores[g.id], dtype=np.float64) / max(
                float(np.max(scores[g.id])), 1e-12)
            self.cum[g.id] = np.concatenate([[0.0], np.cumsum(norm[self.order[g.id]])])
        self.steps = {g.id: atom_step(g, round_to) for g in groups}
        self.floor = {g.id: max(min(min_keep, g.atoms), min(self.steps[g.id], g.atoms))
                      for g in groups}

    def seconds(self, counts: dict[int, int]) -> float:
        return self.model.seconds(self.model.mask(
            {g.id: self.order[g.id][:counts[g.id]] for g in self.groups}))

    def score(self, counts: dict[int, int]) -> float:
        return float(sum(self.cum[g][k] for g, k in counts.items()))

    def _down(self, gid: int, k: int) -> int:
        return max(self.floor[gid], k - (k % self.steps[gid] or self.steps[gid]))

    def remove_until(self, counts: dict[int, int], target: float, hold: int | None = None
                     ) -> tuple[dict[int, int], float]:
        """Take the cheapest step (score lost per second saved) until the target is met."""
        counts = dict(counts)
        now = self.seconds(counts)

        def price(gid: int) -> tuple[float, int] | None:
            k = counts[gid]
            if gid == hold or k <= self.floor[gid]:
                return None
            new = self._down(gid, k)
            saved = now - self.seconds({**counts, gid: new})
            lost = self.cum[gid][k] - self.cum[gid][new]
            return (lost / saved if saved > 1e-15 else float("inf")), new

        heap: list[tuple[float, int]] = []
        for g in self.groups:
            p = price(g.id)
            if p is not None:
                heapq.heappush(heap, (p[0], g.id))
        while now > target and heap:
            _, gid = heapq.heappop(heap)
            p = price(gid)
            if p is None:
                continue
            if heap and p[0] > heap[0][0] * (1 + 1e-9):
                heapq.heappush(heap, (p[0], gid))
                continue
            counts[gid] = p[1]
            now = self.seconds(counts)
            nxt = price(gid)
            if nxt is not None:
                heapq.heappush(heap, (nxt[0], gid))
        return counts, now

    def fill_back(self, counts: dict[int, int], now: float, target: float
                  ) -> tuple[dict[int, int], float]:
        """Give back single steps (most score per second first) while the target holds: the
        last step taken may have saved far more than was left to save."""
        while True:
            best = None
            for g in self.groups:
                k = counts[g.id]
                if k >= g.atoms:
                    continue
                trial = {**counts, g.id: min(g.atoms, k + self.steps[g.id])}
                seconds = self.seconds(trial)
                if seconds > target:
                    continue
                value = (self.cum[g.id][trial[g.id]] - self.cum[g.id][k]) / max(seconds - now,
                                                                               1e-15)
                if best is None or value > best[0]:
                    best = (value, trial, seconds)
            if best is None:
                return counts, now
            _, counts, now = best


__all__ = ["LatencyModel", "latency_kept"]
