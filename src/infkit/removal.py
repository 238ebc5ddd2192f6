"""The predicted effect of removing a group of training examples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from infkit.parameters import ParameterSpace

#: what a removal changes on some data
Quantity = Literal["outputs", "loss", "measurement"]
#: (data, quantity) -> the predicted change on that data
Predictor = Callable[[Any, Quantity], Tensor]


class RemovalEffect:
    """What removing the training examples ``indices`` (jointly) is predicted to change.

    Args:
        indices: the removed training indices.
        params: Delta theta [P], trainable parameters flattened in ``model.parameters()`` order.
        estimator: the estimator that predicted it.
        predict: ``(data, quantity) -> change``: how the fitted method predicts the change of the
            outputs, the loss or the measurement on ``data``.
        model: the trained model (``model()`` returns an edited copy of it).
    """

    def __init__(
        self,
        indices: Tensor,
        params: Tensor,
        estimator: str,
        predict: Predictor,
        model: nn.Module,
    ) -> None:
        self.indices = indices
        self.params = params
        self.estimator = estimator
        self._predict = predict
        self._model = model

    def outputs(self, data: Any) -> Tensor:
        """Predicted change of the model outputs, [n, C]: J(x) Delta theta."""
        return self._predict(data, "outputs")

    def loss(self, data: Any) -> Tensor:
        """Predicted change of the per-example loss (no regulariser), [n]: grad l^T Delta theta."""
        return self._predict(data, "loss")

    def measurement(self, data: Any) -> Tensor:
        """Predicted change of the task's measurement, [n]; ``scores`` columns sum to this for IF."""
        return self._predict(data, "measurement")

    def model(self) -> nn.Module:
        """A copy of the model with theta + Delta theta: the predicted retrained (unlearned) model."""
        clone = copy.deepcopy(self._model)
        with torch.no_grad():
            ParameterSpace(clone).add_(self.params)
        return clone

    def __repr__(self) -> str:
        return (
            f"RemovalEffect(n_removed={len(self.indices)}, estimator={self.estimator!r}, "
            f"|Delta theta|={float(self.params.norm()):.3e})"
        )
