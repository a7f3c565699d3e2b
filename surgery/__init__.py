"""surgery: make trained PyTorch models physically smaller by removing whole channels,
neurons and attention heads, chosen by mutual information propagated top-down.

The public API is small::

    pruned, plan = surgery.prune(model, example_inputs, calib_data, sparsity=0.5)
    pruned, plan = surgery.prune(model, x, calib_data, budget="latency", target_speedup=2,
                                 latency=surgery.LatencySpec(batch=32))  # measured, this device
    plan = surgery.make_plan(model, example_inputs, calib_data, options=surgery.PruneOptions())
    surgery.groups(model, example_inputs)     # the coupled channel groups
    surgery.apply_plan(fresh_model, plan)     # re-apply a saved plan
    surgery.io.save(pruned, "folder", plan, architecture=model); surgery.io.load("folder")

Plugins import what they use from :mod:`surgery.plugins`; each pipeline stage is a
subpackage (``graph``, ``stats``, ``scoring``, ``budget``, ``cut``, ``io``, ``cli``).
"""

from surgery._core import moved as _moved

_moved.install()  # old module paths (surgery.propagate, surgery.loading ...) keep working

from surgery import io  # noqa: E402
from surgery.api import couple, groups, make_plan, prune  # noqa: E402
from surgery.counting import count_macs, count_params  # noqa: E402
from surgery.cut.apply import apply_plan  # noqa: E402
from surgery.cut.plan import PruningPlan  # noqa: E402
from surgery.errors import (  # noqa: E402
                            AssetMissing,
                            BudgetError,
                            CalibrationError,
                            CaptureError,
                            ExportError,
                            LoadError,
                            PlanError,
                            PluginError,
                            StorageError,
                            SurgeryError,
                            VerificationError,
)
from surgery.graph.capture import trace  # noqa: E402
from surgery.hookspecs import hookimpl  # noqa: E402
from surgery.options import LatencySpec, PruneOptions  # noqa: E402
from surgery.timing import measure_latency  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "prune", "make_plan", "PruneOptions", "LatencySpec", "groups", "couple", "trace", "apply_plan",
    "PruningPlan", "io", "count_params", "count_macs", "measure_latency", "hookimpl",
    "SurgeryError", "CaptureError", "BudgetError", "CalibrationError", "PlanError",
    "VerificationError", "PluginError", "StorageError", "OptionsError", "LoadError", "ExportError",
    "AssetMissing",
]
