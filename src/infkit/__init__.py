"""infkit: influence functions and training-data attribution for PyTorch models."""

from infkit import evaluate, retrain
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
from infkit.methods import methods
from infkit.ntk import empirical_ntk
from infkit.removal import RemovalEffect
from infkit.task import Task
from infkit.training import train_to_optimum

__version__ = "0.1.0"

__all__ = [
    "CurvatureError",
    "InfkitError",
    "Influence",
    "InvalidInputError",
    "NonFiniteError",
    "NotFittedError",
    "ProblemTooLargeError",
    "RemovalEffect",
    "Task",
    "TopK",
    "UnsupportedError",
    "empirical_ntk",
    "evaluate",
    "linearizability",
    "linearize",
    "methods",
    "retrain",
    "train_to_optimum",
]
