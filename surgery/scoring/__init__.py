"""Scoring: criteria, MI estimators, joint selection, the top-down walk.

Importing the package registers every built-in criterion (each module registers its own).
"""

from surgery.scoring import criteria, mi  # noqa: F401  (registers the built-in criteria)
from surgery.scoring.topdown import top_down

__all__ = ["top_down"]
