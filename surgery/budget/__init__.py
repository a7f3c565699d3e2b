"""Budgets: the cost model, allocation of a budget over groups and kinds."""

from surgery.budget.allocate import (KINDS, Cost, CostModel, atom_step, check_sparsity,
                                     global_kept, uniform_counts)

__all__ = ["KINDS", "Cost", "CostModel", "atom_step", "check_sparsity", "global_kept",
           "uniform_counts"]
