"""Cutting: plans, slicing into smaller dense tensors, compensation and recovery."""

from surgery.cut.apply import apply_plan, check_plan, slice_model
from surgery.cut.compensation import compensate
from surgery.cut.plan import GroupDecision, PruningPlan, build_plan
from surgery.cut.recovery import distill, recalibrate_batchnorm

__all__ = ["PruningPlan", "GroupDecision", "build_plan", "apply_plan", "check_plan",
           "slice_model", "compensate", "recalibrate_batchnorm", "distill"]
