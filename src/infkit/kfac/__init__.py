"""Kronecker-factored curvature: tracked layers, factors, and the scores built on them.

The methods ``"kfac"``, ``"ekfac"`` and ``"astra"`` live in :mod:`infkit.methods`; this package
holds what they share and what is built on their layerwise structure:

* :mod:`~infkit.kfac.modules`: which layers are tracked and their [W | b] block layout;
* :mod:`~infkit.kfac.capture`: activations and pre-activation gradients through hooks;
* :mod:`~infkit.kfac.factors`: covariances, eigendecompositions, EK-FAC eigenvalues, storage;
* :mod:`~infkit.kfac.scores`: per-module and per-token scores;
* :mod:`~infkit.kfac.queries`: query batching (low-rank preconditioned queries).
"""

from infkit.kfac.factors import KroneckerFactors, ModuleFactors
from infkit.kfac.modules import SUPPORTED, TrackedModule, find_modules
from infkit.kfac.queries import LowRankQueries, batched_scores, low_rank_queries
from infkit.kfac.scores import TokenScores, per_module_scores, per_token_scores

__all__ = [
    "SUPPORTED",
    "KroneckerFactors",
    "LowRankQueries",
    "ModuleFactors",
    "TokenScores",
    "TrackedModule",
    "batched_scores",
    "find_modules",
    "low_rank_queries",
    "per_module_scores",
    "per_token_scores",
]
