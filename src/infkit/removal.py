"""The predicted effect of removing a group of training examples."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from infkit.influence import Influence


class RemovalEffect:
    """What removing the training examples ``indices`` (jointly) is predicted to change.

    Attributes:
        indices: the removed training indices.
        params: Delta theta [P], trainable parameters flattened in ``model.parameters()`` order.
    """

    def __init__(self, influence: Influence, indices: Tensor, params: Tensor) -> None:
        self._influence = influence
        self.indices = indices
        self.params = params
        self.estimator = influence.estimator

    def outputs(self, data: Any) -> Tensor:
        """Predicted change of the model outputs, [n, C]: J(x) Delta theta."""
        return self._influence.predicted_change(data, self.params, "outputs", self.indices)

    def loss(self, data: Any) -> Tensor:
        """Predicted change of the per-example loss (no regulariser), [n]: grad l^T Delta theta."""
        return self._influence.predicted_change(data, self.params, "loss", self.indices)

    def measurement(self, data: Any) -> Tensor:
        """Predicted change of the task's measurement, [n]; ``scores`` columns sum to this for IF."""
        return self._influence.predicted_change(data, self.params, "measurement", self.indices)

    def model(self) -> nn.Module:
        """A copy of the model with theta + Delta theta: the predicted retrained (unlearned) model."""
        clone = copy.deepcopy(self._influence.task.model)
        from infkit.parameters import ParameterSpace

        with torch.no_grad():
            ParameterSpace(clone).add_(self.params)
        return clone

    def __repr__(self) -> str:
        return (
            f"RemovalEffect(n_removed={len(self.indices)}, estimator={self.estimator!r}, "
            f"|Delta theta|={float(self.params.norm()):.3e})"
        )
