"""Scoring: criteria, MI estimators, joint selection, the top-down walk."""

from surgery.scoring.topdown import top_down

__all__ = ["top_down"]
