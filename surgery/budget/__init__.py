"""Budgets: the cost model, allocation of a budget over groups and kinds."""

from surgery.budget.allocate import atom_step, global_kept, uniform_counts
from surgery.budget.cost import KINDS, Cost, CostModel

__all__ = ["KINDS", "Cost", "CostModel", "atom_step", "global_kept", "uniform_counts"]
