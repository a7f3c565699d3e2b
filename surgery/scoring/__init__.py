"""Scoring: criteria, MI estimators, joint selection, the top-down walk.

Importing the package registers every built-in criterion (each module registers its own).
"""

from surgery.scoring.criteria import CRITERIA, Criterion, ScoreContext, get_criterion, register
from surgery.scoring.estimators import ESTIMATORS, get_estimator
from surgery.scoring.mi import MutualInformation
from surgery.scoring.topdown import top_down

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "get_criterion", "register",
           "MutualInformation", "ESTIMATORS", "get_estimator", "top_down"]
