"""Top-down selection: decide the groups nearest the output first, then walk down.

Groups are visited in reverse topological order of the layers that write them. Each group is
scored by the criterion with the already-decided groups above it in the context (for MI, the
target of a group is the *kept* channels of the groups its readers write), then its
top-scoring atoms are kept. In a residual network the stream's readers include blocks both
above and below it; undecided ones count with all their channels. Consecutive groups none
of which writes another's target are decided in one call (the same context either way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from surgery.scoring.criteria import Criterion, ScoreContext

if TYPE_CHECKING:  # stages import compensation, which imports scoring
    from surgery.stats.stages import Stages


def top_down(
    criterion: Criterion,
    ctx: ScoreContext,
    counts: dict[int, int],
    progress: Callable[[int], None] | None = None,
    stages: Stages | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Return ``(kept, scores)`` per prunable group id. With ``stages`` (a
    :class:`surgery.stats.stages.Stages`), each run is decided in stages whose statistics are
    collected when the stage starts and dropped when it ends."""
    scores: dict[int, np.ndarray] = {}
    groups = sorted(ctx.coupling.prunable, key=lambda g: (-g.order, g.id))
    targets: dict[int, set[int]] = {}
    for rel in ctx.coupling.relations:
        targets.setdefault(rel.group, set()).add(rel.target)
    step = 0
    while step < len(groups):
        # The next groups in order none of which reads into an earlier one of them see the
        # same decided groups above: they are decided together (the criterion may batch).
        run = [groups[step]]
        while (step + len(run) < len(groups)
               and not targets.get(groups[step + len(run)].id, set()) & {g.id for g in run}):
            run.append(groups[step + len(run)])
        for chunk in stages.chunks(run) if stages is not None else [run]:
            if stages is not None:
                stages.enter(chunk, ctx)
            chosen = criterion.select_many(chunk, ctx, [counts[g.id] for g in chunk])
            for group, (kept, s) in zip(chunk, chosen):
                scores[group.id] = s
                ctx.kept[group.id] = kept
                if progress is not None:
                    progress(step)
                step += 1
            if stages is not None:
                stages.leave(chunk, ctx)
    return dict(ctx.kept), scores
