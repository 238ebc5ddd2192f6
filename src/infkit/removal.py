"""The predicted effect of removing a group of training examples."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from infkit.errors import InvalidInputError, warn
from infkit.parameters import ParameterSpace, dtype_name
from infkit.serial import one_at_a_time

#: the least part of Delta theta (1 - relative error) an edited copy must hold without a warning
HELD_FRACTION = 0.9
#: what a removal changes on some data
Quantity = Literal["outputs", "loss", "measurement"]
#: (data, quantity) -> the predicted change on that data
Predictor = Callable[[Any, Quantity], Tensor]


class RemovalEffect:
    """What removing the training examples ``indices`` (jointly) is predicted to change.

    With ``steps=1`` (one estimator step, :meth:`infkit.Influence.remove`'s default) the changes
    of outputs, losses and measurements are first order in Delta theta: ``J(x) Delta theta`` and
    the like (or the method's own prediction). With ``steps > 1`` theta* + Delta theta is the
    K-th Newton iterate on the retained objective, an approximation of the retrained model
    itself, and they are the actual changes of the model at theta* + Delta theta against the
    model at theta* (docs/estimators.md §12).

    Args:
        indices: the removed training indices.
        params: Delta theta [P], the attributed parameters (``names``) flattened in
            ``model.parameters()`` order.
        estimator: the estimator that predicted it (of the first step when ``steps > 1``).
        predict: ``(data, quantity) -> change``: how the fitted method predicts the change of the
            outputs, the loss or the measurement on ``data``.
        model: the trained model (``model()`` returns an edited copy of it).
        steps: the number of Newton steps taken, the estimator's own step first.
        gradient_norms: with ``steps > 1``, ``||grad L_R(theta_k)||`` at the iterates
            theta_1 ... theta_K (L_R the retained objective, mean form): how close each is to
            the retained optimum; None for ``steps=1`` (not computed).
        names: the parameters ``params`` covers (None: every trainable parameter), e.g. the
            tracked layers of a Kronecker method; ``model()`` leaves the others as they are.
        unchanged: raises where the model changed since the fit Delta theta was computed from
            (:meth:`infkit.fitted.Fitted.require_unchanged`); called before every answer, as the
            Influence's own are (a tester's ``model()`` after a fine-tuning step returned the
            new weights plus the old step, 1.13 from theta* + Delta theta). None: not checked.
    """

    def __init__(
        self,
        indices: Tensor,
        params: Tensor,
        estimator: str,
        predict: Predictor,
        model: nn.Module,
        *,
        steps: int = 1,
        gradient_norms: list[float] | None = None,
        names: list[str] | None = None,
        unchanged: Callable[[], None] | None = None,
    ) -> None:
        self.indices = indices
        self.params = params
        self.estimator = estimator
        self.steps = steps
        self.gradient_norms = gradient_norms
        self._predict = predict
        self._model = model
        self._names = names
        self._unchanged = unchanged

    def _require_unchanged(self) -> None:
        if self._unchanged is not None:
            self._unchanged()

    @one_at_a_time
    def outputs(self, data: Any) -> Tensor:
        """Predicted change of the model outputs, [n, C]: J(x) Delta theta (``steps=1``), the
        actual change at theta* + Delta theta (``steps > 1``)."""
        self._require_unchanged()
        return self._predict(data, "outputs")

    @one_at_a_time
    def loss(self, data: Any) -> Tensor:
        """Predicted change of the per-example loss (no regulariser), [n]: grad l^T Delta theta
        (``steps=1``), the actual change at theta* + Delta theta (``steps > 1``)."""
        self._require_unchanged()
        return self._predict(data, "loss")

    @one_at_a_time
    def measurement(self, data: Any) -> Tensor:
        """Predicted change of the task's measurement, [n]; ``scores`` columns sum to this for IF
        (``steps=1``); the actual change at theta* + Delta theta for ``steps > 1``."""
        self._require_unchanged()
        return self._predict(data, "measurement")

    @one_at_a_time
    def model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A copy of the model with theta + Delta theta: the predicted retrained (unlearned) model
        (the parameters left out of the attribution unchanged).

        Args:
            dtype: the copy's dtype (None: the model's). A step smaller than the parameters'
                resolution rounds away (in bfloat16 one part in 256 of each weight): when the
                copy holds less than :data:`HELD_FRACTION` of Delta theta a warning says how
                much, and names the wider dtype that keeps it.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InvalidInputError(
                f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) "
                f"or None for the model's own, got {dtype!r}"
            )
        self._require_unchanged()
        clone = copy.deepcopy(self._model)
        if dtype is not None:
            clone.to(dtype)
        space = ParameterSpace(clone, self._names)
        current = dict(clone.named_parameters())
        missed = wanted = 0.0  # squared norms of the step lost to rounding, and of the step
        still = 0  # entries with a step that did not move
        with torch.no_grad():  # a tensor at a time: no [P] float64 copies
            for name, step in space.unflatten(self.params).items():
                parameter = current[name]
                before = parameter.to(torch.float64, copy=True)
                parameter.add_(step.to(parameter.device, parameter.dtype))
                step = step.to(parameter.device, torch.float64)
                held = parameter.to(torch.float64) - before
                missed += float((held - step).square().sum())
                wanted += float(step.square().sum())
                still += int(((held == 0) & (step != 0)).sum())
        lost = (missed / wanted) ** 0.5 if wanted > 0 else 0.0
        if lost > 1 - HELD_FRACTION:
            precision = dtype_name(space.dtype)
            wider = "float64" if space.dtype.itemsize >= 4 else "float32"
            remedy = (
                f"model(dtype=torch.{wider}) keeps the step; "
                if space.dtype != torch.float64
                else ""
            )
            warn(
                f"the edited model holds Delta theta to a relative error of {lost:.2g} in "
                f"{precision}: {still / max(space.size, 1):.0%} of its parameters did not move, "
                "the step being below their resolution, so its outputs differ from the "
                f"prediction by rounding. {remedy}outputs() and loss() predict the change "
                "without a copy",
                UserWarning,
            )
        return clone

    def __repr__(self) -> str:
        return (
            f"RemovalEffect(n_removed={len(self.indices)}, estimator={self.estimator!r}, "
            f"steps={self.steps}, |Delta theta|={float(self.params.norm()):.3e})"
        )
