"""Greedy joint selection: each pick is the atom that raises the summed joint Gaussian MI
most, across block boundaries of the blocked Cholesky, and redundancy is seen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surgery.scoring.estimators import TARGET_NOISE, gaussian
from surgery.scoring.selection import _conditional, greedy_gaussian, greedy_gaussian_many
from surgery.stats.moments import MomentSums


def _sums(x: torch.Tensor, t: torch.Tensor) -> MomentSums:
    sums = MomentSums(x.shape[1], t.shape[1])
    sums.add(torch.cat([x, t], 1))
    return sums


def _joint_mi(relations, subset: list[int]) -> float:
    """sum over relations of 1/2 (log det Cov(X_S) - log det Cov(X_S | T)), from scratch."""
    total = 0.0
    for sums, t_cols in relations:
        a, b = _conditional(sums, t_cols, 1e-3, TARGET_NOISE)
        idx = torch.as_tensor(subset)
        sub = lambda m: m.index_select(0, idx).index_select(1, idx)  # noqa: E731
        total += 0.5 * float(torch.logdet(sub(a)) - torch.logdet(sub(b)))
    return total


def _reference(relations, k: int) -> list[int]:
    chosen: list[int] = []
    n = relations[0][0].dx
    for _ in range(k):
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: _joint_mi(relations, chosen + [j])))
    return chosen


@pytest.mark.parametrize("block", [1, 4, 64])
def test_every_pick_maximises_the_joint_mi(block: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, rows = 14, 400
    mix = torch.randn(n, n, generator=g)
    x = torch.randn(rows, n, generator=g) @ mix  # correlated channels: redundancy matters
    relations = [(_sums(x, x[:, :5] @ torch.randn(5, 3, generator=g)
                        + 0.5 * torch.randn(rows, 3, generator=g)), np.arange(3)),
                 (_sums(x, x[:, 6:] @ torch.randn(n - 6, 2, generator=g)
                        + torch.randn(rows, 2, generator=g)), np.array([1]))]
    kept, scores = greedy_gaussian(relations, 9, block=block)
    expected = _reference(relations, 9)
    assert list(kept) == sorted(expected)
    rest = np.setdiff1d(np.arange(n), kept)
    assert np.isfinite(scores).all()
    assert scores[kept].min() > scores[rest].max()  # the kept rank above the rest


def test_groups_solved_side_by_side_pick_as_alone() -> None:
    """Different widths, relation counts and k in one padded batch (and across a block)."""
    g = torch.Generator().manual_seed(2)
    problems = []
    for n, k, targets in [(12, 7, [3]), (20, 15, [2, 4]), (9, 9, [1]), (16, 3, [5, 1, 2])]:
        x = torch.randn(300, n, generator=g) @ torch.randn(n, n, generator=g)
        rels = [(_sums(x, x @ torch.randn(n, d, generator=g) + torch.randn(300, d, generator=g)),
                 np.arange(d)) for d in targets]
        problems.append((rels, k))
    together = greedy_gaussian_many(problems, block=4)
    for (rels, k), (kept, scores) in zip(problems, together):
        alone, alone_scores = greedy_gaussian(rels, k, block=64)
        assert list(kept) == list(alone)
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-9, atol=1e-9)


def test_a_copy_of_a_kept_channel_is_not_kept_again() -> None:
    g = torch.Generator().manual_seed(1)
    rows = 2000
    a, b = torch.randn(rows, 1, generator=g), torch.randn(rows, 1, generator=g)
    copy = a + 1e-3 * torch.randn(rows, 1, generator=g)
    x = torch.cat([a, copy, b, torch.randn(rows, 3, generator=g)], 1)
    t = 2 * a + b + 0.1 * torch.randn(rows, 1, generator=g)
    kept, _ = greedy_gaussian([(_sums(x, t), np.arange(1))], 2)
    # Independent relevance ranks the copy second (it is as relevant as a); jointly, b adds
    # what a does not already carry.
    assert 2 in kept and len({0, 1} & set(kept.tolist())) == 1


def test_multi_column_atoms_pick_by_joint_mi() -> None:
    """Heads of 3 columns: every pick maximises the joint MI of the kept columns (from
    scratch), summed over a relation that sees all heads and one that sees a subset."""
    from surgery.scoring.selection import greedy_gaussian_blocks

    g = torch.Generator().manual_seed(3)
    atoms, width, rows = 6, 3, 600
    n = atoms * width
    x = torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g)
    all_heads = np.repeat(np.arange(atoms), width)
    some = all_heads[width:]  # the second relation does not see head 0
    rel_a = (_sums(x, x[:, :5] @ torch.randn(5, 2, generator=g)
                   + torch.randn(rows, 2, generator=g)), all_heads, np.arange(2))
    rel_b = (_sums(x[:, width:], x[:, 9:] @ torch.randn(n - 9, 3, generator=g)
                   + torch.randn(rows, 3, generator=g)), some, np.array([0, 2]))
    kept, scores = greedy_gaussian_blocks([rel_a, rel_b], 4, atoms)

    def joint(heads: list[int]) -> float:
        total = 0.0
        for sums, x_atoms, t_cols in (rel_a, rel_b):
            cols = np.nonzero(np.isin(x_atoms, heads))[0].tolist()
            if cols:
                total += _joint_mi([(sums, t_cols)], cols)
        return total

    expected: list[int] = []
    for _ in range(4):
        rest = [h for h in range(atoms) if h not in expected]
        expected.append(max(rest, key=lambda h: joint(expected + [h])))
    assert list(kept) == sorted(expected)
    out = np.setdiff1d(np.arange(atoms), kept)
    assert np.isfinite(scores).all() and scores[kept].min() > scores[out].max()


def test_block_log_determinants_match_slogdet() -> None:
    """Wide atoms (a KV group of three query heads of 64 columns) take their log determinants
    by Cholesky; blocks that are not positive definite (an atom already kept: zero after the
    Schur complement; a copy of one) get log |det| from their eigenvalues, as slogdet did."""
    from surgery.scoring.selection import _logdet

    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 192, 400, generator=g, dtype=torch.float64)
    blocks = a @ a.transpose(-1, -2) / 400
    blocks[0, 1] = 0.0  # kept already
    low = torch.randn(192, 100, generator=g, dtype=torch.float64)
    blocks[1, 2] = low @ low.T  # rank 100 of 192
    got, want = _logdet(blocks), torch.linalg.slogdet(blocks)[1]
    finite = torch.isfinite(want) & (want > -1e3)
    assert torch.allclose(got[finite], want[finite], rtol=1e-10)
    assert got[0, 1] == -math.inf and got[1, 2] < -1e3  # singular either way


def test_target_noise_weighs_a_direction_by_its_variance() -> None:
    """Channel 0 explains 80% of a loud target direction, channel 1 all of a faint one. Seen
    almost without noise (log-determinants: every direction alike) the faint, perfectly
    explained direction wins; through noise of the target's own scale the loud one does, as
    the error a next layer would see says it should. Both estimators agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g)
    t = torch.stack([10 * x[:, 0] + 5 * torch.randn(4000, generator=g), 0.1 * x[:, 1]], 1)
    rel = [(_sums(x, t), np.arange(2))]
    assert list(greedy_gaussian(rel, 1, noise=1e-6)[0]) == [1]
    assert list(greedy_gaussian(rel, 1, noise=TARGET_NOISE)[0]) == [0]
    for noise, best in [(1e-6, 1), (TARGET_NOISE, 0)]:
        scores = gaussian(rel[0][0], np.arange(2), np.arange(2), 2, noise=noise)
        assert int(np.argmax(scores)) == best, (noise, scores)
