"""Calibration statistics: moment sums streamed from real batches, on one process or many."""
