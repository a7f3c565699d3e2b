"""Internals shared by every stage: batch shapes, train/eval modes, heap release."""
