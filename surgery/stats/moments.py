"""Moment sums: what calibration keeps of the activations (count, sum, outer product).

Scoring and compensation need only second moments of ``z = [x, t]`` per relation (a layer's
input and what it writes), and sums add across batches and across processes exactly, so each
batch is folded in and dropped. :class:`LinearTargetSums` derives the target's blocks from the
input's when the target is a linear function of it, at no sampling cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MomentSums:
    """Running sums over samples of z = [x, t]: count, sum and outer product (float64).

    Each batch is centred on its own mean before its outer product, which then runs in
    float32 (the bulk of calibration time; twice float64's speed on CPUs) without losing the
    small variations of channels with large means, and only its upper block triangle is
    computed (``outer``'s upper triangle is exact, the lower one is not kept: :meth:`gram`
    mirrors it). The exact identity ``sum z z^T = sum zc zc^T + n m m^T`` folds the batch
    means back in, ``FOLD`` batches at a time in one product."""

    dx: int
    dt: int
    n: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    pending: list[torch.Tensor] = field(default_factory=list, repr=False)
    """Sums of the batches whose ``n m m^T`` term is not yet in ``outer``."""
    whole: bool = False
    """Whether ``outer``'s lower triangle is filled in (see :meth:`gram`)."""
    reservoir: torch.Tensor | None = field(default=None, repr=False)
    """Up to ``limit`` rows of z kept uniformly at random (reservoir sampling), for the
    estimators that need samples, not moments (binned, k-NN); None when not asked for."""

    def keep(self, z: torch.Tensor, limit: int, generator: torch.Generator) -> None:
        """Reservoir sampling (algorithm R) of ``z``'s rows; call before :meth:`add`."""
        z = z.float()
        if self.reservoir is None:
            self.reservoir = z.new_empty(0, z.shape[1])
        room = max(0, limit - len(self.reservoir))
        if room:
            self.reservoir = torch.cat([self.reservoir, z[:room]])
        rest = z[room:]
        if len(rest):
            index = self.n + room + torch.arange(len(rest))  # each row's rank among all rows
            slot = (torch.rand(len(rest), generator=generator) * (index + 1)).long()
            hit = slot < limit
            self.reservoir[slot[hit].to(z.device)] = rest[hit.to(z.device)]

    def rows(self) -> torch.Tensor:
        """The kept samples of z = [x, t] (see ``reservoir``)."""
        if self.reservoir is None:
            raise ValueError("no samples were kept: calibrate with samples > 0 (estimators "
                             "that need samples ask for them through surgery.prune).")
        return self.reservoir

    def allocate(self, device: torch.device) -> None:
        """Zero sums for ``dx + dt`` columns (done for every relation before the first batch's
        temporaries, so the long-lived buffers do not fragment the heap between them)."""
        d = self.dx + self.dt
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=device)

    FOLD = 64

    def add(self, z: torch.Tensor) -> None:
        if self.total is None:
            self.allocate(z.device)
        if not len(z):
            return
        total = z.sum(0, dtype=torch.float64)
        self.n += z.shape[0]
        self.total += total
        self.whole = False
        _add_upper_gram(self.outer, z.float() - (total / z.shape[0]).float())
        self.pending.append(total / math.sqrt(z.shape[0]))  # n m m^T = (s/sqrt n)(s/sqrt n)^T
        if len(self.pending) >= self.FOLD:
            self.settle()

    def settle(self) -> None:
        """Fold the pending batch means into ``outer`` (before it is read or reduced)."""
        if self.pending:
            m = torch.stack(self.pending)
            self.outer += m.T @ m
            self.pending.clear()

    def gram(self) -> torch.Tensor:
        """sum z z^T, whole: ``outer``'s upper triangle is mirrored in place once the batches
        are in (until the next :meth:`add`)."""
        self.settle()
        if not self.whole:
            upper = self.outer.triu(1)
            self.outer.triu_()
            self.outer += upper.T
            self.whole = True
        return self.outer

    def with_linear_target(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "MomentSums":
        """The statistics of z = [x, t] when t = weight @ x + bias exactly (a linear layer or
        1x1 conv reading all of x, observed at its own output), from the sums of x alone:
        the t blocks need no samples, which saves most of calibration's work on wide
        layers, and are derived when asked for, so they take no memory meanwhile."""
        self.gram()
        return LinearTargetSums(self.dx, weight.shape[0], self.n, self.total, self.outer,
                                whole=True, reservoir=self.reservoir,
                                weight=weight.detach().clone(),
                                bias=None if bias is None else bias.detach().clone())

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.n
        return torch.addr(self.gram(), mean, mean, beta=1.0 / self.n, alpha=-1.0)

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def blocks(self, t_cols: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(Cov(x), Cov(x, t_S), Cov(t_S)) for the t columns ``t_cols``; None, None when
        ``t_cols`` is None (x alone, as compensation needs)."""
        cov = self.covariance()
        dx = self.dx
        if t_cols is None:
            return cov[:dx, :dx], None, None
        t = torch.as_tensor(dx + np.asarray(t_cols, dtype=np.int64), device=cov.device)
        return (cov[:dx, :dx], cov[:dx].index_select(1, t),
                cov.index_select(0, t).index_select(1, t))


def _add_upper_gram(out: torch.Tensor, z: torch.Tensor, block: int = 192) -> None:
    """``out += z^T z`` on and above the diagonal blocks only (float32 products added to
    float64): wide layers' products cost about 60% of the whole one."""
    d = z.shape[1]
    if d < 2 * block:
        out += z.T @ z
        return
    for lo in range(0, d, block):
        out[lo:lo + block, lo:] += z[:, lo:lo + block].T @ z[:, lo:]


@dataclass
class LinearTargetSums(MomentSums):
    """Sums of x only (``total``, ``outer`` are x's) with t = ``weight`` @ x + ``bias``; the
    covariance and mean of [x, t] are computed on request (exact, no sampling noise)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def _map(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.to(self.outer.device, torch.float64).reshape(self.dt, self.dx)
        b = (torch.zeros(self.dt, dtype=torch.float64, device=w.device) if self.bias is None
             else self.bias.to(w.device, torch.float64))
        return w, b

    def blocks(self, t_cols: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As :meth:`MomentSums.blocks`, from the selected rows of the weight only."""
        c_xx = super().covariance()
        if t_cols is None:
            return c_xx, None, None
        w, _ = self._map()
        w = w.index_select(0, torch.as_tensor(np.asarray(t_cols, dtype=np.int64), device=w.device))
        c_xt = c_xx @ w.T
        c_tt = w @ c_xt
        return c_xx, c_xt, (c_tt + c_tt.T) / 2

    def covariance(self) -> torch.Tensor:
        c_xx, c_xt, c_tt = self.blocks(np.arange(self.dt))
        return torch.cat([torch.cat([c_xx, c_xt], 1), torch.cat([c_xt.T, c_tt], 1)], 0)

    def mean(self) -> torch.Tensor:
        w, b = self._map()
        m = super().mean()
        return torch.cat([m, w @ m + b])

    def rows(self) -> torch.Tensor:
        x = super().rows()
        w, b = self._map()
        return torch.cat([x, (x.double() @ w.T + b).float()], 1)
