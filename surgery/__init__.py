"""surgery: make trained PyTorch models physically smaller by removing whole channels,
neurons and attention heads, chosen by mutual information propagated top-down.

The public API is small::

    pruned, plan = surgery.prune(model, example_inputs, calib_data, sparsity=0.5)
    surgery.trace(model, example_inputs)      # fx graph + networkx view
    surgery.groups(model, example_inputs)     # coupled channel groups
    surgery.apply_plan(model, plan)           # re-apply a saved plan
"""

from surgery._core import moved as _moved

_moved.install()  # old module paths (surgery.propagate, surgery.loading ...) keep working

from surgery import io
from surgery.api import couple, groups, make_plan, prune
from surgery.counting import count_macs, count_params, measure_latency
from surgery.cut.apply import apply_plan
from surgery.cut.plan import PruningPlan
from surgery.options import PruneOptions
from surgery.errors import (
    BudgetError,
    CalibrationError,
    CaptureError,
    PlanError,
    PluginError,
    SurgeryError,
    VerificationError,
)
from surgery.graph.capture import trace
from surgery.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "prune", "make_plan", "PruneOptions", "groups", "couple", "trace", "apply_plan", "PruningPlan", "io",
    "count_params", "count_macs", "measure_latency", "hookimpl",
    "SurgeryError", "CaptureError", "BudgetError", "CalibrationError", "PlanError",
    "VerificationError", "PluginError",
]
