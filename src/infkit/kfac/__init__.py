"""Kronecker-factored curvature: the factors, and the fitted curvature built on them.

* :mod:`~infkit.kfac.factors`: covariances, eigendecompositions, EK-FAC eigenvalues, storage;
* :mod:`~infkit.kfac.curvature`: the fitted curvature of the methods ``kfac``, ``ekfac`` and
  (as preconditioner) ``astra``, with its options (import it from there: it sits a layer above
  the factors, docs/architecture.md §1).

The layers it factors are :mod:`infkit.layers`; scores split by layer and by token, and query
batching, work for every method and live in :mod:`infkit.decompositions`.
"""

from infkit.kfac.factors import KroneckerFactors, ModuleFactors

__all__ = ["KroneckerFactors", "ModuleFactors"]
