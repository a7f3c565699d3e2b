"""Top-down selection: decide the groups nearest the output first, then walk down.

Groups are visited in reverse topological order of the layers that write them. Each group is
scored by the criterion with the already-decided groups above it in the context (for MI, the
target of a group is the *kept* channels of the groups its readers write), then its
top-scoring atoms are kept. In a residual network the stream's readers include blocks both
above and below it; undecided ones count with all their channels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from surgery.criteria import Criterion, ScoreContext


def top_down(
    criterion: Criterion,
    ctx: ScoreContext,
    counts: dict[int, int],
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Return ``(kept, scores)`` per prunable group id."""
    scores: dict[int, np.ndarray] = {}
    groups = sorted(ctx.coupling.prunable, key=lambda g: (-g.order, g.id))
    for step, group in enumerate(groups):
        kept, s = criterion.select(group, ctx, counts[group.id])
        scores[group.id] = s
        ctx.kept[group.id] = kept
        if progress is not None:
            progress(step)
    return dict(ctx.kept), scores
