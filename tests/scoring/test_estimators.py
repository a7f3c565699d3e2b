"""MI estimators behind one interface: Gaussian (moments), binned and KSG (samples)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

import surgery
from surgery.scoring.estimators import binned, gaussian, get_estimator, ksg
from surgery.stats.moments import MomentSums


def _sums(x: torch.Tensor, t: torch.Tensor, limit: int = 2048) -> MomentSums:
    z = torch.cat([x, t], 1)
    sums = MomentSums(x.shape[1], t.shape[1])
    gen = torch.Generator().manual_seed(0)
    for part in z.split(500):
        sums.keep(part, limit, gen)
        sums.add(part)
    return sums


def _gaussian_channels(n: int = 2000):
    """Channel j = t + noise of std s_j: true MI = 1/2 log(1 + 1/s_j^2)."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(n, 1, generator=g)
    noise = torch.tensor([0.3, 1.0, 3.0])
    x = t + noise * torch.randn(n, 3, generator=g)
    return x, t, 0.5 * np.log(1 + 1 / noise.numpy() ** 2)


@pytest.mark.parametrize("estimator, tol", [(partial(gaussian, noise=1e-3), 0.03),
                                            (binned, 0.15), (ksg, 0.12)])
def test_estimators_recover_known_gaussian_mi(estimator, tol):
    x, t, truth = _gaussian_channels()
    mi = estimator(_sums(x, t), np.arange(3), np.arange(1), 3)
    assert np.all(np.diff(mi) < 0), mi  # less noise, more information
    assert np.abs(mi - truth).max() < tol, (mi, truth)


def test_gaussian_sees_the_target_through_noise_of_its_own_variance():
    """With noise=1, T is observed as T + N, var N = var T (= 1 here): channel t + s e then
    shares -1/2 log(1 - 1 / (2 (1 + s^2))) nats with it."""
    x, t, _ = _gaussian_channels()
    s = np.array([0.3, 1.0, 3.0])
    truth = -0.5 * np.log(1 - 1 / (2 * (1 + s ** 2)))
    mi = gaussian(_sums(x, t), np.arange(3), np.arange(1), 3, noise=1.0)
    assert np.abs(mi - truth).max() < 0.02, (mi, truth)


def test_sample_estimators_see_dependence_without_correlation():
    """x = t^2 with t symmetric: uncorrelated, so the Gaussian estimator sees nothing, but x
    carries about log(2) nats less than t's entropy; binned and KSG must see it."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2000, 1, generator=g)
    x = torch.cat([t ** 2, torch.randn(2000, 1, generator=g)], 1)  # dependent, independent
    sums = _sums(x, t)
    assert gaussian(sums, np.arange(2), np.arange(1), 2)[0] < 0.02
    for estimator in (binned, ksg):
        mi = estimator(sums, np.arange(2), np.arange(1), 2)
        assert mi[0] > 0.5 and mi[1] < 0.1, (estimator.__name__, mi)


def test_reservoir_keeps_a_uniform_sample_of_every_batch():
    sums = MomentSums(1, 0)
    gen = torch.Generator().manual_seed(0)
    for b in range(20):  # 20 batches of 100 rows holding their batch number
        z = torch.full((100, 1), float(b))
        sums.keep(z, 400, gen)
        sums.add(z)
    rows = sums.rows()[:, 0]
    assert len(rows) == 400 and sums.n == 2000
    per_batch = torch.bincount(rows.long(), minlength=20)
    assert per_batch.min() >= 8 and per_batch.max() <= 35  # about 20 each


def test_without_samples_the_sample_estimators_say_what_to_do():
    sums = MomentSums(1, 1)
    sums.add(torch.randn(10, 2))
    with pytest.raises(ValueError, match="samples > 0"):
        binned(sums, np.arange(1), np.arange(1), 1)


@pytest.mark.parametrize("name", ["binned", "ksg"])
def test_prune_with_a_sample_estimator(name):
    assert get_estimator(name).needs_samples
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    calib = [torch.randn(64, 6) for _ in range(4)]
    pruned, plan = surgery.prune(model, calib[0], calib, sparsity=0.5, budget="params",
                                 criterion="mi_topk", estimator=name)
    assert plan.budget["estimator"] == name
    assert pruned[0].out_features < 16 and pruned(calib[0]).shape == (64, 3)
