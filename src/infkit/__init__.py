"""infkit: influence functions and training-data attribution for PyTorch models.

The submodules the docs name (``infkit.analyses.poisoning``, ``infkit.valuation.kairos``,
``infkit.plot``, ...) are imported when first read, so ``import infkit`` stays light.
"""

import importlib as _importlib
from types import ModuleType
from typing import TYPE_CHECKING

from infkit import evaluate, retrain
from infkit._version import __version__
from infkit.ensemble import Ensemble
from infkit.errors import (
    ArtifactError,
    ArtifactRemovedError,
    ConfigError,
    CurvatureError,
    InfkitError,
    InvalidInputError,
    NonFiniteError,
    NotConvergedWarning,
    NotFittedError,
    Notice,
    ProblemTooLargeError,
    ProcessesUnreachableError,
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
    "ArtifactError",
    "ArtifactRemovedError",
    "ConfigError",
    "CurvatureError",
    "Ensemble",
    "InfkitError",
    "Influence",
    "InvalidInputError",
    "NonFiniteError",
    "NotConvergedWarning",
    "NotFittedError",
    "Notice",
    "ProblemTooLargeError",
    "ProcessesUnreachableError",
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

#: submodules read as attributes of the package (``infkit.valuation.kairos``): those that
#: ``import infkit`` does not load already are imported on first read
_SUBMODULES = (
    "analyses",
    "decompositions",
    "distributed",
    "language_modeling",
    "plot",
    "report",
    "valuation",
)

if TYPE_CHECKING:  # type checkers and IDEs see the submodules and their signatures
    from infkit import (  # noqa: F401
        analyses,
        decompositions,
        distributed,
        language_modeling,
        plot,
        report,
        valuation,
    )
else:

    def __getattr__(name: str) -> ModuleType:
        """``infkit.analyses``, ``infkit.valuation``, ``infkit.plot``, ... imported when first
        read."""
        if name in _SUBMODULES:
            return _importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
