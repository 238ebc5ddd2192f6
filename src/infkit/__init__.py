"""infkit: influence functions and training-data attribution for PyTorch models."""

from infkit import evaluate, retrain
from infkit._version import __version__
from infkit.ensemble import Ensemble
from infkit.errors import (
    CurvatureError,
    InfkitError,
    InvalidInputError,
    NonFiniteError,
    NotFittedError,
    ProblemTooLargeError,
    UnsupportedError,
)
from infkit.influence import Influence, TopK
from infkit.linearize import linearizability, linearize
from infkit.ntk import empirical_ntk
from infkit.recipe import Recipe, TrainingRun
from infkit.registry import methods
from infkit.removal import RemovalEffect
from infkit.shards import SavedScores, read_scores
from infkit.task import Task
from infkit.training import train_to_optimum

__all__ = [
    "CurvatureError",
    "Ensemble",
    "InfkitError",
    "Influence",
    "InvalidInputError",
    "NonFiniteError",
    "NotFittedError",
    "ProblemTooLargeError",
    "Recipe",
    "RemovalEffect",
    "SavedScores",
    "Task",
    "TopK",
    "TrainingRun",
    "UnsupportedError",
    "__version__",
    "empirical_ntk",
    "evaluate",
    "linearizability",
    "linearize",
    "methods",
    "read_scores",
    "retrain",
    "train_to_optimum",
]
