"""Cutting: plans, slicing into smaller dense tensors, compensation and recovery."""
