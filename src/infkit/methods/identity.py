"""method="identity": no curvature (H = I), i.e. the gradient dot product.

Scores are ``(1/N) grad m(z_t)^T grad l~_j``: what influence would be if the curvature were the
identity. With estimator ``"relatif"`` this becomes the gradient cosine (methods.md §6.1).
``l2`` still enters the attributed training gradient (``grad l_j + l2 theta``) but not the
curvature; ``damping`` is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature


@register
class Identity(InverseCurvature):
    """The identity as inverse curvature: gradient similarity without second-order information."""

    name = "identity"
    estimators = ("if", "relatif")
    summary = "gradient dot product (H = I); with relatif, gradient cosine"
    scales = True
    curvature = "identity"

    def fit(self, context: FitContext) -> None:
        self.context = context

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return V.to(torch.float64)
