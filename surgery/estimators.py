"""Mutual-information estimators: ``I(atom; target)`` for every atom of a group at once.

An estimator takes the moment sums of one relation (columns ``[x..., t...]``), the atom of
each x column, and which t columns are the *kept* channels of the layer above, and returns one
value per atom. The Gaussian estimator is closed-form from covariances:

    I(X_a; T) = 1/2 [log det S_aa - log det (S_aa - S_aT S_TT^-1 S_Ta)]

which for a single channel is -1/2 log(1 - R^2), R^2 the multiple correlation of the channel
on T. A ridge proportional to the mean variance keeps S_TT invertible when T has more
channels than samples or constant channels.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from surgery.calibration import MomentSums


class Estimator(Protocol):
    def __call__(self, sums: MomentSums, x_atoms: np.ndarray, t_columns: np.ndarray,
                 n_atoms: int) -> np.ndarray: ...


def gaussian(sums: MomentSums, x_atoms: np.ndarray, t_columns: np.ndarray, n_atoms: int,
             *, ridge: float = 1e-3) -> np.ndarray:
    """Gaussian MI of each atom (its x columns jointly) with the selected t columns."""
    cov = sums.covariance()
    dx = sums.dx
    out = np.zeros(n_atoms)
    if len(t_columns) == 0:
        return out
    t_idx = torch.as_tensor(dx + np.asarray(t_columns), device=cov.device)
    s_tt = cov.index_select(0, t_idx).index_select(1, t_idx)
    s_xt = cov[:dx].index_select(1, t_idx)
    var_x = torch.diagonal(cov)[:dx]
    scale_t = torch.diagonal(s_tt).mean().clamp_min(1e-12)
    s_tt = s_tt + ridge * scale_t * torch.eye(len(t_columns), dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(s_tt)
    w = torch.linalg.solve_triangular(chol, s_xt.T, upper=False)  # (dt, dx)
    floor = ridge * var_x.mean().clamp_min(1e-12)
    atoms = np.asarray(x_atoms)
    counts = np.bincount(atoms, minlength=n_atoms)
    if counts.max() <= 1:
        explained = (w * w).sum(0)
        residual = (var_x - explained).clamp_min(0) + floor
        mi = 0.5 * (torch.log(var_x + floor) - torch.log(residual))
        out[atoms] = mi.cpu().numpy()
        return out
    for a in np.nonzero(counts)[0]:
        cols = torch.as_tensor(np.nonzero(atoms == a)[0], device=cov.device)
        s_aa = cov.index_select(0, cols).index_select(1, cols)
        wa = w.index_select(1, cols)
        eye = floor * torch.eye(len(cols), dtype=cov.dtype, device=cov.device)
        cond = s_aa - wa.T @ wa
        out[a] = 0.5 * float(torch.linalg.slogdet(s_aa + eye)[1] - torch.linalg.slogdet(cond + eye)[1])
    return out


ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {"gaussian": gaussian}


def get_estimator(name: str) -> Callable[..., np.ndarray]:
    from surgery.plugins import call_hook, merged

    available = {**ESTIMATORS, **merged(call_hook("surgery_estimators"))}
    if name not in available:
        raise ValueError(f"unknown MI estimator {name!r}; available: {sorted(available)}.")
    return available[name]
