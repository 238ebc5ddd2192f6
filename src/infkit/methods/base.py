"""The interface every primal (parameter-space) method implements.

A method's life is ``fit(context)`` once, then ``solve(V, shift)``: apply the inverse of the
damped mean-form curvature to a batch of vectors,

    (H + (l2 + damping + shift) I)^{-1} V,     H = (1/N) sum_i C_i,

where C_i is example i's curvature (GGN J_i^T Lambda_i J_i, or the true Hessian of l_i) and
``shift`` lets estimators remove a share of the regulariser (the Newton step on the retained
objective uses shift = -(N_F/N) l2). Estimators (IF, RIF, Newton, RelatIF) are built on ``solve``
alone, so a new method is one file with one class and one registry line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.gradients import PerExample
from infkit.parameters import ParameterSpace
from infkit.task import Task


@dataclass
class FitContext:
    """Everything a method may use while fitting: the task, the data and the objective."""

    task: Task
    space: ParameterSpace
    per_example: PerExample
    train: ExampleSet
    l2: float
    damping: float
    batch_size: int
    progress: bool
    memory_limit: int
    #: the facade's cached training-loss gradients [N, P] (None when not cached), float64 for
    #: float64 models and float32 otherwise (:func:`infkit.estimators.cache_dtype`)
    train_gradients: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.train)

    def retained_ridge(self, n_removed: int) -> float:
        """(N_R/N) l2 + damping: the ridge of the retained objective's curvature H_R."""
        return (self.n - n_removed) / self.n * self.l2 + self.damping


class InverseCurvature(ABC):
    """A way of applying the inverse damped curvature to vectors in R^P."""

    #: registry name, e.g. ``"exact"``
    name: ClassVar[str]
    #: estimators this method can supply
    estimators: ClassVar[tuple[str, ...]]
    #: one line for ``infkit.methods()``
    summary: ClassVar[str]
    #: whether the method stays usable when P is large (used in error messages and ``auto``)
    scales: ClassVar[bool] = False
    #: whether the answers assume theta is a trained optimum (the facade warns when it is not);
    #: False for trajectory/surrogate methods (TracInCP, TRAK)
    assumes_optimum: bool = True
    #: the facade questions the method answers, for ``infkit.methods()``
    quantities: ClassVar[tuple[str, ...]] = ("scores", "self_scores", "remove")
    #: ``"ggn"`` or ``"hessian"``: which per-example curvature C_i the method represents
    curvature: str = "ggn"

    def __init__(self) -> None:
        self.context: FitContext | None = None

    @abstractmethod
    def fit(self, context: FitContext) -> None:
        """Build whatever the method needs from the training data."""

    @abstractmethod
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """(H + (l2 + damping + shift) I)^{-1} V for V of shape [k, P], in float64."""

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor | None:
        """(H_R)^{-1} V with H_R the curvature of the retained objective, if the method has it.

        ``H_R = (1/N) sum_{i not in F} C_i + ((N_R/N) l2 + damping) I``. Methods that return None
        get the generic low-rank (Woodbury) treatment of the GGN, which needs ``solve`` only.
        """
        return None

    def regulariser_anchor(self) -> Tensor | None:
        """theta' of the objective's (l2/2)||theta - theta'||^2 after ``fit`` (None means 0)."""
        return None

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        """Bytes the method's dense objects need (0 when it forms none)."""
        return 0

    def describe(self) -> dict[str, object]:
        """Settings worth recording next to results."""
        return {"method": self.name, "curvature": self.curvature}


class DirectMethod(InverseCurvature):
    """A method that answers the facade's questions itself instead of through ``solve``.

    The dual (kernel) method works in N*C space: it computes scores, self-scores and group
    removals from the empirical NTK without ever applying an inverse in R^P. ``Influence``
    delegates to these three hooks when the fitted method is a ``DirectMethod``; everything
    else (input checks, ``top_k``, ``RemovalEffect.outputs/loss``) stays shared.
    ``state`` is the facade's :class:`infkit.estimators.FittedState`.
    """

    @abstractmethod
    def scores(self, state, test: ExampleSet, estimator: str, relatif: str) -> Tensor:
        """[n_test, N] removal effects on the test measurements, float64."""

    @abstractmethod
    def self_scores(self, state, estimator: str, relatif: str) -> Tensor:
        """[N] removal effect of each example on its own loss, float64."""

    @abstractmethod
    def group_delta(self, state, indices: Tensor, estimator: str) -> Tensor:
        """[P] parameter change for removing ``indices`` jointly, float64."""

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: str, which: str
    ) -> Tensor | None:
        """Optional: the change of ``which`` ("outputs", "loss", "measurement") on ``data`` when
        ``indices`` are removed, if the method computes it its own way; None to let the facade
        use J(theta*) Delta theta."""
        return None


def as_float64(V: Tensor) -> Tensor:
    return V.to(torch.float64)
