"""The empirical neural tangent kernel (NTK) with full C x C blocks.

* :mod:`~infkit.ntk.structured`: the per-example Jacobian factors a kernel is contracted from
  (the structured rule for linear layers, explicit Jacobians for the rest);
* :mod:`~infkit.ntk.kernel`: kernel blocks and Gram matrices assembled from those factors, and
  :func:`empirical_ntk`.
"""

from infkit.ntk.kernel import empirical_ntk, kernel_matrix, kernel_rows
from infkit.ntk.structured import STRATEGIES, Features, TangentFeatures

__all__ = [
    "STRATEGIES",
    "Features",
    "TangentFeatures",
    "empirical_ntk",
    "kernel_matrix",
    "kernel_rows",
]
