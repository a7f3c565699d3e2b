"""``uniform_widths``: cut only what the model's own config can express.

A Hugging Face folder is plain (``from_pretrained`` loads it without surgery) only when the
pruned model rebuilds from its config: one width per kind in every layer (the allocation's
part, :func:`surgery.budget.allocate.uniform_counts`), and only widths the config has a field
for. Which those are is architecture knowledge, so plugins say it through the
``surgery_config_limits`` hook; the groups they name stay whole, with their reason, and a
budget that the remaining kinds cannot meet is refused saying why.
"""

from __future__ import annotations

import torch.nn as nn

from surgery.errors import BudgetError
from surgery.graph.groups import Coupling
from surgery.plugins._manager import call_hook


def limit_to_config(coupling: Coupling, model: nn.Module, sparsity: float) -> list[str]:
    """Make the prunable groups ``model``'s config cannot express unprunable (each with the
    plugin's reason) and return the distinct reasons, in group order; nothing when no plugin
    knows the model (no config: every group stays, at one width per kind)."""
    limits = call_hook("surgery_config_limits", model=model, groups=coupling.prunable) or {}
    for g in coupling.prunable:
        if g.id in limits:
            g.prunable, g.reason = False, limits[g.id]
    reasons = list(dict.fromkeys(limits[g.id] for g in coupling.groups if g.id in limits))
    if not coupling.prunable and sparsity > 0:
        raise BudgetError(f"uniform_widths=True leaves nothing to cut in "
                          f"{type(model).__name__}: {'; '.join(reasons)}. Prune without "
                          "uniform_widths (the result then loads with surgery.io.load).")
    return reasons


__all__ = ["limit_to_config"]
