"""Calibration statistics: moment sums streamed from real batches, on one process or many."""

from surgery.stats.calibration import Calibration, calibrate, top_signal
from surgery.stats.moments import LinearTargetSums, MomentSums

__all__ = ["Calibration", "calibrate", "top_signal", "MomentSums", "LinearTargetSums"]
