"""Mutual-information estimators: ``I(atom; target)`` for every atom of a group at once.

An estimator takes the statistics of one relation (columns ``[x..., t...]``), the atom of
each x column, and which t columns are the *kept* channels of the layer above, and returns one
value per atom. Three are built in:

* ``gaussian`` (default): closed form from the streamed covariances, exact for jointly
  Gaussian activations; the only one joint (greedy) selection uses;
* ``binned``: histogram MI on equal-frequency bins, no distributional assumption;
* ``ksg``: the Kraskov-Stoegbauer-Grassberger k-nearest-neighbour estimator (their
  estimator 1, k = 3, max-norm), consistent for continuous variables.

The last two need samples, not moments: they set ``needs_samples`` and calibration then keeps
a uniform reservoir of rows per relation (``MomentSums.rows()``). Both measure MI with a
low-dimensional summary of the target: its top principal components (at most ``components``,
from the kept columns' covariance), because histograms and neighbour counts degrade quickly
with dimension. ``binned`` sums the MI with each component (independent for Gaussian
targets, an approximation otherwise); ``ksg`` uses them jointly. An atom with several
columns (a head) scores the sum over its columns.

The Gaussian estimator:

    I(X_a; T) = 1/2 [log det S_aa - log det (S_aa - S_aT S_TT^-1 S_Ta)]

which for a single channel is -1/2 log(1 - R^2), R^2 the multiple correlation of the channel
on T. T is observed through noise of :data:`TARGET_NOISE` times its mean variance (why: see
there), which also keeps S_TT invertible when T has more channels than samples or constant
channels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from surgery.errors import OptionsError
from surgery.stats.moments import MomentSums

Estimator = Callable[..., np.ndarray]
ESTIMATORS: dict[str, Estimator] = {}
"""Built-in estimators by name, filled by :func:`register`; plugins add theirs through the
``surgery_estimators`` hook. ``estimate(sums, x_atoms, t_columns, n_atoms)`` returns one MI
value per atom."""


def register(name: str, *, needs_samples: bool = False) -> Callable[[Estimator], Estimator]:
    """Decorator: make ``estimate`` the built-in estimator ``name``; ``needs_samples`` asks
    calibration for a reservoir of rows (``MomentSums.rows()``) besides the moments."""

    def add(estimate: Estimator) -> Estimator:
        estimate.needs_samples = needs_samples  # type: ignore[attr-defined]
        ESTIMATORS[name] = estimate
        return estimate

    return add


TARGET_NOISE = 10.0
"""The target is observed through Gaussian noise of this many times its mean variance.

A reader's output is added to a stream it does not own (the residual stream of a transformer
or ResNet, the next layer's other inputs), so what the layer above receives is the target
plus much else. With almost no noise, joint Gaussian MI is a log-determinant that weighs
every direction of the target alike, its faintest included (explaining 90% of a direction
holding 0.01% of the variance counts as much as 90% of the dominant one); with noise well above
the target's own scale, a direction counts by its variance, as the error the next layer sees
does. Measured (no retraining; noise 0.001 / 1 / 10): SmolLM2-135M perplexity at 20% of
decoder parameters 39.4 / 32.8 / 32.9, at 50% - / 263 / 197; ResNet-18 / Fashion-MNIST at
50% / 75% of MACs 0.801 / 0.820 / 0.808 and 0.749 / 0.750 / 0.776; MiniLM at 50% 0.779 /
0.788 / 0.783; a small timm ViT at 30 / 50 / 75% 0.788 / 0.776 / 0.779, 0.753 / 0.734 / 0.768,
0.735 / 0.719 / 0.748 (standard errors about 0.01 accuracy). ``PruneOptions.target_noise``
sets it per call."""


@register("gaussian")
def gaussian(sums: MomentSums, x_atoms: np.ndarray, t_columns: np.ndarray, n_atoms: int,
             *, ridge: float = 1e-3, noise: float = TARGET_NOISE) -> np.ndarray:
    """Gaussian MI of each atom (its x columns jointly) with the selected t columns, T
    observed through noise of ``noise`` times its mean variance (:data:`TARGET_NOISE`)."""
    out = np.zeros(n_atoms)
    if len(t_columns) == 0:
        return out
    cov, s_xt, s_tt = sums.blocks(t_columns)  # cov: Cov(x)
    var_x = torch.diagonal(cov)
    scale_t = torch.diagonal(s_tt).mean().clamp_min(1e-12)
    s_tt = s_tt + noise * scale_t * torch.eye(len(t_columns), dtype=cov.dtype, device=cov.device)
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
        out[a] = 0.5 * float(torch.linalg.slogdet(s_aa + eye)[1]
                             - torch.linalg.slogdet(cond + eye)[1])
    return out


SAMPLES = 2048
"""Rows kept per relation for the sample-based estimators."""


def _target_components(rows: torch.Tensor, dx: int, t_columns: np.ndarray,
                       components: int) -> torch.Tensor:
    """The kept target columns of ``rows`` projected on their top principal components,
    standardised: (samples, <= components)."""
    t = rows[:, dx + np.asarray(t_columns)].double()
    t = t - t.mean(0)
    cov = t.T @ t / max(1, len(t) - 1)
    vals, vecs = torch.linalg.eigh(cov)
    keep = vals.flip(0)[:components] > 1e-9 * vals.abs().max().clamp_min(1e-30)
    proj = t @ vecs.flip(1)[:, :components][:, keep]
    return proj / proj.std(0).clamp_min(1e-12)


def _per_atom(values: torch.Tensor, x_atoms: np.ndarray, n_atoms: int) -> np.ndarray:
    out = np.zeros(n_atoms)
    np.add.at(out, np.asarray(x_atoms), values.cpu().numpy())
    return out


def _ranks(v: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-frequency bin of every sample, per column of ``v`` (samples, columns)."""
    order = v.argsort(0).argsort(0)
    return (order * bins // len(v)).clamp_max(bins - 1)


@register("binned", needs_samples=True)
def binned(sums: MomentSums, x_atoms: np.ndarray, t_columns: np.ndarray, n_atoms: int,
           *, bins: int | None = None, components: int = 4) -> np.ndarray:
    """Histogram MI (nats) of each x column with each target component on equal-frequency
    bins (about sqrt(samples / 5) per axis), summed over components and over an atom's
    columns. The plug-in bias (bins - 1)^2 / 2N per pair (Miller-Madow) is subtracted."""
    if len(t_columns) == 0:
        return np.zeros(n_atoms)
    rows = sums.rows()
    n = len(rows)
    b = bins or int(np.clip(np.sqrt(n / 5), 2, 32))
    t = _ranks(_target_components(rows, sums.dx, t_columns, components), b)  # (n, m)
    x = _ranks(rows[:, :sums.dx].double(), b)  # (n, dx)
    total = torch.zeros(sums.dx, dtype=torch.float64)
    for j in range(t.shape[1]):
        joint = torch.zeros(sums.dx, b * b, dtype=torch.float64)
        joint.scatter_add_(1, (x * b + t[:, j:j + 1]).T,
                           torch.ones(sums.dx, n, dtype=torch.float64))
        p = joint.view(sums.dx, b, b) / n
        px, pt = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
        ratio = torch.where(p > 0, p / (px * pt).clamp_min(1e-300), torch.ones_like(p))
        total += (p * ratio.log()).sum((1, 2)) - (b - 1) ** 2 / (2 * n)
    return _per_atom(total.clamp_min(0), x_atoms, n_atoms)


@register("ksg", needs_samples=True)
def ksg(sums: MomentSums, x_atoms: np.ndarray, t_columns: np.ndarray, n_atoms: int,
        *, k: int = 3, components: int = 4, samples: int = 1024, chunk: int = 16) -> np.ndarray:
    """KSG estimator 1 (nats) of each x column with the target's top components jointly:
    psi(k) + psi(N) - < psi(n_x + 1) + psi(n_t + 1) >, neighbours in the max-norm."""
    if len(t_columns) == 0:
        return np.zeros(n_atoms)
    rows = sums.rows()[:samples]
    n = len(rows)
    t = _target_components(rows, sums.dx, t_columns, components).float()
    d_t = torch.cdist(t, t, p=float("inf"))
    d_t.fill_diagonal_(float("inf"))
    x = rows[:, :sums.dx].float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    x = x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # ties
    const = float(torch.special.digamma(torch.tensor([k, n], dtype=torch.float64)).sum())
    out = torch.zeros(sums.dx, dtype=torch.float64)
    for start in range(0, sums.dx, chunk):
        xc = x[:, start:start + chunk].T  # (c, n)
        d_x = (xc[:, :, None] - xc[:, None, :]).abs()  # (c, n, n)
        d_x.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        eps = torch.maximum(d_x, d_t).kthvalue(k, dim=2).values  # (c, n)
        n_x = (d_x < eps[:, :, None]).sum(2)
        n_t = (d_t[None] < eps[:, :, None]).sum(2)
        psi = torch.special.digamma((n_x + 1).double()) + torch.special.digamma((n_t + 1).double())
        out[start:start + chunk] = const - psi.mean(1)
    return _per_atom(out.clamp_min(0), x_atoms, n_atoms)




def get_estimator(name: str) -> Callable[..., np.ndarray]:
    from surgery.plugins._manager import call_hook, merged

    available = {**ESTIMATORS, **merged(call_hook("surgery_estimators"))}
    if name not in available:
        raise OptionsError(f"unknown MI estimator {name!r}; available: {sorted(available)}.")
    return available[name]
