"""Joint selection: greedy forward maximisation of I(X_S; T) under a Gaussian model.

For jointly Gaussian variables, adding channel j to the kept set S raises the joint MI by

    1/2 log var(x_j | X_S) - 1/2 log var(x_j | X_S, T)

(relevance of x_j to the target, minus what the already-kept channels explain: redundancy).
Both conditional variances come from incremental (pivoted) Cholesky factors of Cov(X) and of
Cov(X | T) = Cov(X) - Cov(X,T) Cov(T)^-1 Cov(T,X), with no refactorisation: each pick updates
the diagonals, and the trailing matrices take one BLAS-3 update per block of picks, so
3,072-wide layers are cheap. Gains add over the layers that read a group.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.scoring.estimators import TARGET_NOISE
from surgery.stats.moments import MomentSums


def _conditional(sums: MomentSums, t_cols: np.ndarray, ridge: float, noise: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cov(X) with a ridge of ``ridge`` times its mean variance, and Cov(X | T) with T observed
    through noise of ``noise`` times T's mean variance (:data:`TARGET_NOISE`)."""
    s_xx, s_xt, s_tt = sums.blocks(t_cols if len(t_cols) else None)
    a = s_xx.clone()
    a.diagonal().add_(ridge * torch.diagonal(s_xx).mean().clamp_min(1e-12))
    if s_xt is None:
        return a, a
    s_tt = s_tt.clone()
    s_tt.diagonal().add_(noise * torch.diagonal(s_tt).mean().clamp_min(1e-12))
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(s_tt), s_xt.T, upper=False)
    return a, torch.addmm(a, w.T, w, alpha=-1.0)


Relations = list[tuple[MomentSums, np.ndarray]]

MEMORY = 256 * 2**20
"""Bytes of trailing matrices that :func:`greedy_gaussian_many` works on at once."""


def greedy_gaussian(relations: Relations, k: int, ridge: float = 1e-3, block: int = 128,
                    noise: float = TARGET_NOISE) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` atoms maximising the summed joint Gaussian MI with each relation's targets.

    Returns (kept atoms sorted, per-atom score). An atom's score is its gain when selected;
    atoms never selected score below every selected one (their last gain, shifted down)."""
    return greedy_gaussian_many([(relations, k)], ridge, block, noise)[0]


def greedy_gaussian_many(problems: list[tuple[Relations, int]], ridge: float = 1e-3,
                         block: int = 128, noise: float = TARGET_NOISE
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`greedy_gaussian` for independent groups (no group's target among the others),
    solved side by side, as many at a time as fit in ``MEMORY``: each pick is a dozen small
    operations, so the six FFN layers of a MiniLM take the time of about one."""
    results: list[tuple[np.ndarray, np.ndarray]] = []
    batch: list[tuple[list[torch.Tensor], int]] = []
    size = 0
    for relations, k in problems:
        mats = [m for pair in (_conditional(s, t, ridge, noise) for s, t in relations)
                for m in pair]
        need = sum(m.numel() * m.element_size() for m in mats)  # as padded: about the same
        if batch and size + need > MEMORY:
            results += _greedy_batch(batch, block)
            batch, size = [], 0
        batch.append((mats, k))
        size += need
    return results + (_greedy_batch(batch, block) if batch else [])


def _greedy_batch(problems: list[tuple[list[torch.Tensor], int]], block: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blocked pivoted Cholesky (as LAPACK's ``pstrf``) of every problem's matrices at once.

    Within a block of ``block`` picks, each new column is the trailing matrix's row minus the
    block's own factor (a small product); after the block, the trailing matrices take one
    rank-``block`` update (BLAS-3), and shrink to the atoms still available whenever a
    quarter of them are picked. A step reads O(n block) numbers, not O(n |S|).

    Problems are padded to a common width and matrix count with identity blocks (a gain of
    exactly 0, never preferred to a real atom); every problem picks once per step, so all
    keep the same number of rows, and one that needs fewer picks ignores the rest."""
    first = problems[0][0][0]
    widths = [mats[0].shape[0] for mats, _ in problems]
    ks = [min(k, w) for (_, k), w in zip(problems, widths)]
    n, steps, count = max(widths), max(ks), len(problems)
    depth = max(len(mats) for mats, _ in problems)
    dtype, device = first.dtype, first.device
    del first
    # (problem, matrix, n, n); even matrices: Cov(X) (relevance), odd: Cov(X | T)
    # (redundancy given the target); both shrink to the free atoms' Schur complements.
    trail = torch.eye(n, dtype=dtype, device=device).repeat(count, depth, 1, 1)
    real = torch.zeros(count, n, dtype=torch.bool, device=device)
    for p, (mats, _) in enumerate(problems):
        for q in reversed(range(len(mats))):  # moved: only one copy of each is held
            trail[p, q, :widths[p], :widths[p]] = mats.pop()
        real[p, :widths[p]] = True
    diag = torch.diagonal(trail, dim1=2, dim2=3).clone()
    alive = torch.arange(n, device=device).repeat(count, 1)  # original atom per row
    free = torch.ones(count, n, dtype=torch.bool, device=device)
    rows = torch.arange(count, device=device)
    picks = torch.zeros(count, steps, dtype=torch.long, device=device)
    gained = torch.zeros(count, steps, dtype=dtype, device=device)
    last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # gains of the not picked
    floor = 1e-12

    def gains() -> torch.Tensor:
        d = diag.clamp_min(floor)
        gain = 0.5 * torch.log(d[:, 0::2] / d[:, 1::2]).sum(1)
        return gain.masked_fill(~(free & real), -torch.inf).masked_fill_(free & ~real, -1e300)

    def remember(p: int, gain: torch.Tensor) -> None:
        left = free[p] & real[p]  # problem p's atoms not picked after its k picks
        last[p] = (alive[p][left], gain[p][left])

    for start in range(0, steps, block):
        width = min(block, steps - start)
        panel = trail.new_zeros(count, depth, width, alive.shape[1])  # rows: factor columns
        for i in range(width):
            gain = gains()
            j = torch.argmax(gain, 1)
            for p in range(count):
                if start + i == ks[p]:
                    remember(p, gain)
            free[rows, j] = False
            picks[:, start + i] = alive[rows, j]
            gained[:, start + i] = gain[rows, j]
            col = trail[rows, :, j] - (panel[rows, :, None, :i, j] @ panel[:, :, :i]).squeeze(2)
            col /= torch.sqrt(diag[rows, :, j].clamp_min(floor)).unsqueeze(2)
            panel[:, :, i] = col
            diag -= col * col
        if start + width >= steps:
            break
        flat = panel.flatten(0, 1)
        trail.flatten(0, 1).baddbmm_(flat.transpose(1, 2), flat, alpha=-1.0)
        if free[0].float().mean() < 0.75:  # drop the picked rows once they are a quarter
            keep = free.nonzero()[:, 1].view(count, -1)
            idx = keep[:, None, :]
            mats = torch.arange(depth, device=device)
            trail = trail[rows[:, None, None, None], mats[None, :, None, None],
                          keep[:, None, :, None], keep[:, None, None, :]]
            diag = diag.gather(2, idx.expand(-1, depth, -1))
            alive, free, real = alive.gather(1, keep), free.gather(1, keep), real.gather(1, keep)
    gain = gains()
    for p in range(count):
        if ks[p] == steps:
            remember(p, gain)
    out = []
    for p, k in enumerate(ks):
        chosen = picks[p, :k].cpu().numpy()
        rest, tail = (t.cpu().numpy() for t in last[p])
        out.append(_ranked(widths[p], chosen, gained[p, :k].cpu().numpy(), rest, tail))
    return out


def _ranked(atoms: int, chosen: np.ndarray, picked: np.ndarray, rest: np.ndarray,
            tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept atoms sorted, scores): each pick scores its gain when picked; the atoms never
    picked (``rest``) rank by their last gain (``tail``), all below the weakest pick."""
    scores = np.full(atoms, -np.inf)
    scores[chosen] = picked
    if len(rest):
        top = picked.min() if len(picked) else 0.0
        scores[rest] = tail - tail.max() + top - 1.0
    return np.sort(np.asarray(chosen, dtype=np.int64)), scores


BLOCK_COLUMNS = 2048
"""Widest relation (columns) that :func:`greedy_gaussian_blocks` takes on."""


def _logdet(blocks: torch.Tensor) -> torch.Tensor:
    """log det of a batch of covariance blocks: by Cholesky (half the work of an LU, and
    MKL's batched LU printed thousands of spurious "Parameter 6 was incorrect on entry to
    DLASWP" lines for the 192-column KV groups of a SmolLM-shaped Llama, with correct
    values); blocks that are not positive definite (an atom already kept, or a copy of one)
    get ``log |det|`` from their eigenvalues, what ``slogdet`` gave them (the blocks are
    symmetric)."""
    chol, info = torch.linalg.cholesky_ex(blocks)
    out = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    bad = info != 0
    if bool(bad.any()):
        out[bad] = torch.linalg.eigvalsh(blocks[bad]).abs().log().sum(-1)
    return out


def greedy_gaussian_blocks(relations: list[tuple[MomentSums, np.ndarray, np.ndarray]], k: int,
                           atoms: int, ridge: float = 1e-3, noise: float = TARGET_NOISE
                           ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`greedy_gaussian` for atoms of several columns (an attention head's 32 or 64):
    relations are (sums, atom of each x column, t columns), and adding atom a to the kept set
    raises the joint MI by 1/2 log det Cov(X_a | X_S) - 1/2 log det Cov(X_a | X_S, T), summed
    over relations. Each pick takes a block Schur complement of every relation's matrices;
    the atoms' determinants are taken in one batch per run of equally wide atoms."""
    state = []
    for sums, x_atoms, t_cols in relations:
        mats = torch.stack(_conditional(sums, t_cols, ridge, noise))
        cols = [np.nonzero(x_atoms == i)[0] for i in range(atoms)]
        by_width: dict[int, list[int]] = {}
        for i, c in enumerate(cols):
            if len(c):
                by_width.setdefault(len(c), []).append(i)
        runs = [(np.asarray(ids), torch.as_tensor(np.stack([cols[i] for i in ids]),
                                                  device=mats.device))
                for ids in by_width.values()]
        state.append([mats, cols, runs])
    free = np.ones(atoms, dtype=bool)
    chosen: list[int] = []
    picked: list[float] = []
    steps = min(k, atoms)
    gain = np.zeros(atoms)
    for step in range(steps + 1):
        gain = np.zeros(atoms)
        for mats, _, runs in state:
            for ids, idx in runs:
                blocks = mats[:, idx[:, :, None], idx[:, None, :]]  # (2, atoms, c, c)
                logdet = _logdet(blocks)
                gain[ids] += 0.5 * (logdet[0] - logdet[1]).cpu().numpy()
        if step == steps:
            break  # ``gain`` now scores the atoms left out
        j = int(np.argmax(np.where(free, gain, -np.inf)))
        free[j] = False
        chosen.append(j)
        picked.append(gain[j])
        for entry in state:
            mats, cols, _ = entry
            if len(cols[j]):
                c = torch.as_tensor(cols[j], device=mats.device)
                col = mats[:, :, c]  # (2, d, |c|)
                piv = torch.linalg.cholesky(col[:, c])
                w = torch.linalg.solve_triangular(piv, col.transpose(1, 2), upper=False)
                entry[0] = mats - w.transpose(1, 2) @ w
    return _ranked(atoms, np.asarray(chosen, dtype=np.int64), np.asarray(picked),
                   np.nonzero(free)[0], gain[free])
