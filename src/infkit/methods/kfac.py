"""method="kfac": the layerwise Kronecker-factored GGN, inverted in its eigenbasis.

The curvature itself, its factors, damping and storage are
:class:`infkit.kfac.curvature.KroneckerCurvature` (docs/methods/kfac.md); this method applies its
inverse and gets the estimators from :class:`~infkit.methods.base.PrimalMethod`. Damping:
``damping`` (the facade's) is absolute and shared by all blocks; ``damping_scale=0.1`` (or the
facade's ``damping="auto"``) adds kronfluence's per-module heuristic ``0.1 x mean(Lambda_l)``.
Trainable parameters outside tracked layers (LayerNorm, embeddings, ...): ``unsupported="error"``
(default) refuses with their names; ``unsupported="identity"`` gives them only the
``l2 + damping`` ridge. Freezing them (``requires_grad=False``) restricts the attribution to the
tracked layers, as kronfluence does.

RIF and the Newton step downdate each example's exact curvature block from K-FAC's approximate
one: an approximation on top of an approximation (docs/estimators.md §10).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from infkit.errors import NotFittedError, ProblemTooLargeError
from infkit.fitted import Fitted
from infkit.kfac.curvature import KroneckerCurvature, KroneckerOptions, kronecker_layers
from infkit.layers.tracked import TrackedLayers, find_modules
from infkit.memory import FLOAT64_BYTES, human_bytes
from infkit.methods.base import KRONECKER, Fidelity, PrimalMethod, Problem, register
from infkit.parameters import ParameterSpace
from infkit.task import Task


@register
class KFAC(PrimalMethod):
    """K-FAC: layerwise Kronecker-factored GGN ``S (x) A``, inverted in its eigenbasis."""

    name = "kfac"
    summary = "layerwise Kronecker-factored GGN (K-FAC), Linear/Conv2d/Conv1D; scales to LLMs"
    Options = KroneckerOptions
    questions = KRONECKER
    scales = True
    supports_auto_damping = True
    checks_scale = True  # describe() reports energy_ratio
    fidelity = Fidelity(
        rtol=None, min_correlation=0.75, removal_correlation=0.5, scale=(0.8, 4.0), damping=0.1
    )
    #: whether the eigenvalues are EK-FAC's corrected ones
    corrected: ClassVar[bool] = False
    options: KroneckerOptions

    def __init__(self, options: KroneckerOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature_: KroneckerCurvature | None = None

    def check(self, task: Task, space: ParameterSpace) -> None:
        kronecker_layers(task.model, space, self.options, self.name)

    def check_memory(self, problem: Problem) -> None:
        # per layer: A, S and their eigenbases in float64 (EK-FAC: + corrected eigenvalues)
        modules = None if self.options.modules is None else list(self.options.modules)
        tracked, _ = find_modules(problem.model, problem.space, modules)
        if not tracked:
            return
        need = sum(
            2 * (t.cols**2 + t.d_out**2) * FLOAT64_BYTES
            + (t.cols * t.d_out * FLOAT64_BYTES if self.corrected else 0)
            for t in tracked
        )
        if need > problem.memory_limit:
            raise ProblemTooLargeError(
                f"method {self.name!r} keeps two Kronecker factors and their eigenbases per layer, "
                f"{human_bytes(need)} for the {len(tracked)} tracked layers (the largest: "
                f"{max(tracked, key=lambda t: t.cols**2 + t.d_out**2).name!r}), above the memory "
                f"limit of {human_bytes(problem.memory_limit)}: track fewer layers (modules=...), "
                "freeze the largest (requires_grad=False), or raise memory_limit"
            )

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        self.curvature_ = KroneckerCurvature(
            fitted, self.options, corrected=self.corrected, owner=self.name
        )

    def kronecker(self) -> KroneckerCurvature:
        if self.curvature_ is None:
            raise NotFittedError(f"method {self.name!r} is not fitted")
        return self.curvature_

    def tracked_layers(self) -> TrackedLayers:
        return self.kronecker().layers

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return self.kronecker().solve(V, shift)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        if self.curvature_ is not None:
            out.update(self.curvature_.describe())
        return out


def factorable(problem: Problem) -> bool:
    """Whether every trainable parameter sits in a layer the Kronecker methods can factor."""
    tracked, others = find_modules(problem.model, problem.space)
    return bool(tracked) and not others
