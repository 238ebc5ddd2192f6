"""method="astra": EK-FAC as the preconditioner of an iteration that converges to the exact
damped inverse-curvature-vector product (Wang et al., NeurIPS 2025; docs/methods/astra.md).

With ``P`` the EK-FAC approximation of ``A = H + r I`` (``H`` the mean-form GGN, or the Hessian
with ``curvature="hessian"``, applied matrix-free by :class:`infkit.curvature.CurvatureOperator`;
``r = l2 + damping + shift``), two iterations are offered:

* ``solver="neumann"``: ASTRA's preconditioned Neumann (Richardson) series. Its first iterate
  is the EK-FAC answer ``x_1 = P^{-1} v`` (a unit first step from 0); then
  ``x_{k+1} = x_k + step P^{-1} (v - A x_k)``, which converges when the spectral radius of
  ``I - step P^{-1} A`` is below 1. ``step="auto"`` (default) takes ``1 / lambda_max(P^{-1} A)``
  from a few power iterations; a growing residual triggers a warning (lower ``step``).
* ``solver="cg"`` (default): the same first iterate ``x_1 = P^{-1} v``, then preconditioned
  conjugate gradients on the correction (block CG for several right-hand sides, which then
  share one block Krylov space). Same fixed point, but it needs no step size and converges in
  far fewer products on ill-conditioned curvature.

The iteration converges to ``A^{-1} v`` whatever the preconditioner: ``damping_scale`` (the
per-module heuristic damping) only changes ``P``, never the answer. Each iteration costs one pass
over the training data (JVP + VJP per example, for all right-hand sides at once) and one EK-FAC
application.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from infkit.curvature import Curvature, CurvatureOperator, product_work_bytes
from infkit.data import ExampleSet
from infkit.errors import NotFittedError, warn
from infkit.estimators import Estimator, RelatifNorm
from infkit.fingerprint import tensor_digest
from infkit.fitted import Fitted
from infkit.kfac.curvature import (
    KRONECKER_FIELDS,
    KroneckerCurvature,
    KroneckerOptions,
    attributed_parameters,
    kronecker_layers,
)
from infkit.layers.tracked import TrackedLayers
from infkit.linalg import (
    attainable_tolerance,
    block_conjugate_gradients,
    conjugate_gradients,
    imprecise_solve_warning,
    tolerance_note,
)
from infkit.methods.base import KRONECKER, PRODUCT_PASSES, Fidelity, PrimalMethod, register
from infkit.options import option
from infkit.parameters import ParameterSpace
from infkit.plan import RunShape
from infkit.task import Task


@dataclasses.dataclass(frozen=True)
class AstraOptions(KroneckerOptions):
    """Options of ``method="astra"``: the iteration's, then those of its EK-FAC preconditioner."""

    aliases: ClassVar[Mapping[str, str]] = {
        "target": "curvature",
        "hvp_batch_size": "product_batch_size",
    }

    curvature: Curvature = option(
        "ggn", "the curvature whose damped inverse the iteration converges to: 'ggn' or 'hessian'"
    )
    solver: Literal["cg", "neumann"] = option(
        "cg", "preconditioned (block) CG, or ASTRA's preconditioned Neumann series"
    )
    tol: float = option(
        1e-8, "stop a right-hand side when ||v - A x|| <= tol ||v|| (below 1)", above=0, below=1
    )
    maxiter: int = option(
        200, "iterations after the first (EK-FAC) one; 0 returns EK-FAC's answer", minimum=0
    )
    step: float | Literal["auto"] = option(
        "auto",
        "step of solver='neumann' after the first iterate; 'auto': 1/lambda_max(P^-1 A)",
        above=0,
    )
    power_iterations: int = option(12, "power iterations estimating the automatic step", minimum=1)
    product_batch_size: int | None = option(
        None,
        "examples per curvature-product batch (default: 4 x the facade's batch_size)",
        minimum=1,
    )

    def unread(self, given: frozenset[str]) -> dict[str, str]:
        """The Neumann series' ``step`` and ``power_iterations`` with ``solver='cg'``, and
        ``power_iterations`` beside a ``step`` of one's own."""
        found = super().unread(given)
        if self.solver == "cg":
            found |= {
                name: f"option {name!r} is read by solver='neumann' only, not by solver='cg'"
                for name in ("step", "power_iterations")
                if name in given
            }
        elif self.step != "auto" and "power_iterations" in given:
            found["power_iterations"] = (
                f"option 'power_iterations' estimates step='auto', not step={self.step!r}"
            )
        return found

    def preconditioner(self) -> KroneckerOptions:
        """The options of the EK-FAC preconditioner."""
        return KroneckerOptions(**{name: getattr(self, name) for name in KRONECKER_FIELDS})


@register
class ASTRA(PrimalMethod):
    """EK-FAC-preconditioned iteration for the exact damped GGN (or Hessian) inverse.

    The preconditioner is the EK-FAC curvature (:class:`~infkit.kfac.curvature.KroneckerCurvature`
    with the eigenvalue correction), fitted with the Kronecker options; the iteration converges
    to ``(H + (l2 + damping) I)^{-1} v`` whatever the preconditioner (docs/methods/astra.md).
    """

    name = "astra"
    summary = "EK-FAC-preconditioned iteration converging to the exact damped GGN/Hessian inverse"
    Options = AstraOptions
    questions = KRONECKER
    scales = True
    cheap_solve = False
    solves_together = True
    exact_example_curvature = True
    fidelity = Fidelity(reference="ggn", rtol=1e-6, test_options={"tol": 1e-11})
    #: the Neumann steps and iteration counts; :meth:`state` adds the EK-FAC preconditioner
    #: (the curvature operator is rebuilt on restore: it holds no data)
    fitted_state = ("steps", "iterations", "residuals")
    options: AstraOptions
    plan_remedy = (
        "track fewer layers (modules=, the EK-FAC preconditioner's factors) or use a smaller "
        "batch_size"
    )

    def __init__(self, options: AstraOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature = self.options.curvature
        self.preconditioner: KroneckerCurvature | None = None
        self.operator: CurvatureOperator | None = None
        self.steps: dict[float, float] = {}
        self.iterations: list[int] = []
        #: the largest relative residual ||v - (H + ridge) x|| / ||v|| of each solve (NaN when
        #: maxiter=0 skips the iteration; saved beside ``iterations``, entry for entry)
        self.residuals: list[float] = []
        #: right-hand sides (digest, shift, ridge) whose short solve was warned about: the
        #: same queries solved again (module or token scores after the scores) warn once
        self._warned: set[tuple[str, float, float]] = set()
        #: within a question (:meth:`_one_warning`), whether one of its solves stopped short
        self._batched: bool | None = None

    def check(self, task: Task, space: ParameterSpace) -> None:
        kronecker_layers(task.model, space, self.options.preconditioner(), self.name)

    def attributed_parameters(self, task: Task, space: ParameterSpace) -> list[str] | None:
        return attributed_parameters(task.model, space, self.options.preconditioner(), self.name)

    def solve_passes_at_most(self, shape: RunShape, chunks: list[int]) -> float:
        """A chunk's k vectors through ``maxiter`` products (CG: and the first and last
        residuals'), and the power iterations of an automatic Neumann step at the first solve;
        nothing with ``maxiter=0`` (EK-FAC's answer)."""
        options = self.options
        if options.maxiter == 0:
            return 0.0
        extra = 2 if options.solver == "cg" else 0
        power = (
            options.power_iterations
            if options.solver == "neumann" and options.step == "auto"
            else 0
        )
        return (sum((options.maxiter + extra) * k for k in chunks) + power) * PRODUCT_PASSES

    def solve_note(self, shape: RunShape) -> str:
        return (
            f"{self.options.solver} to {tolerance_note(self.options.tol, shape.parameter_dtype)}, at most "
            f"maxiter={self.options.maxiter} iterations after EK-FAC's"
        )

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        self._warned.clear()  # another fit: its solves warn afresh
        imprecise_solve_warning(self.name, self.options.tol, fitted.engine.dtype)
        self.preconditioner = KroneckerCurvature(
            fitted, self.options.preconditioner(), corrected=True, owner=self.name
        )
        self.operator = self._curvature_operator(fitted)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "preconditioner": self.kronecker().state()}

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        self.preconditioner = KroneckerCurvature.restored(
            fitted,
            self.options.preconditioner(),
            state["preconditioner"],
            corrected=True,
            owner=self.name,
        )
        self.operator = self._curvature_operator(fitted)

    def _curvature_operator(self, fitted: Fitted) -> CurvatureOperator:
        return CurvatureOperator(
            fitted.engine,
            fitted.train,
            self.options.curvature,
            batch_size=self.options.product_batch_size or 4 * fitted.batch_size,
            work_bytes=product_work_bytes(fitted.memory_limit),
        )

    def kronecker(self) -> KroneckerCurvature:
        if self.preconditioner is None:
            raise NotFittedError("method 'astra' is not fitted")
        return self.preconditioner

    def tracked_layers(self) -> TrackedLayers:
        return self.kronecker().layers

    def _operator(self) -> CurvatureOperator:
        if self.operator is None:
            raise NotFittedError("method 'astra' is not fitted")
        return self.operator

    def _precondition(self, R: Tensor, shift: float = 0.0) -> Tensor:
        """EK-FAC's ``(G + r I)^{-1} R`` for rows R [k, P]."""
        return self.kronecker().solve(R, shift)

    def _iterate(
        self, operator: CurvatureOperator, ridge: float, V: Tensor, shift: float
    ) -> Tensor:
        V = V.to(torch.float64)

        def apply(X: Tensor) -> Tensor:  # rows in, rows out
            return operator.matmat(X) + ridge * X

        tol = attainable_tolerance(self.options.tol, self.fitted.engine.dtype)
        x = self._precondition(V, shift)  # the first iterate: EK-FAC's answer
        if self.options.maxiter == 0:
            self.iterations.append(1)
            self.residuals.append(float("nan"))
            return x
        v_norm = V.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        diverged = False  # the Neumann series' own warning says so
        if self.options.solver == "cg":
            R = V - apply(x)
            # many right-hand sides share one block Krylov space (far fewer iterations)
            solve = block_conjugate_gradients if len(V) >= 2 else conjugate_gradients
            result = solve(
                lambda X: apply(X.T).T,
                R.T,
                tol=tol * float(v_norm.min()) / max(float(R.norm(dim=1).max()), 1e-300),
                maxiter=self.options.maxiter,
                precondition=lambda Z: self._precondition(Z.T, shift).T,
                curvature=self.curvature,
            )
            x = x + result.X.T
            iterations = result.iterations
            residual = (V - apply(x)).norm(dim=1) / v_norm
        else:
            step = self._step(apply, ridge, shift, V)
            history = []
            iterations = 0
            residual = torch.full_like(v_norm, float("inf"))
            while iterations < self.options.maxiter:
                R = V - apply(x)
                residual = R.norm(dim=1) / v_norm
                history.append(float(residual.max()))
                if bool((residual <= tol).all()):
                    break
                if len(history) > 3 and history[-1] > history[-4] * 1.5:
                    warn(
                        f"ASTRA's Neumann iteration diverges (relative residual {history[-1]:.1e}"
                        f" after {iterations} iterations): the step {step:g} is too large "
                        "for this curvature; lower step=, or use solver='cg'",
                        UserWarning,
                    )
                    diverged = True
                    break
                x = x + step * self._precondition(R, shift)
                iterations += 1
        self.iterations.append(iterations + 1)
        self.residuals.append(float(residual.max()))
        if bool((residual > tol).any()) and not diverged and self._first_warning(V, shift, ridge):
            limit = self.options.maxiter
            remedy = (
                "raise maxiter or add damping"
                if limit is not None and iterations >= limit
                else "it stopped before maxiter, when the residual it tracks met tol while the "
                "true one had not: the curvature products are less precise than this tol asks "
                "(a model that computes in float32 inside, as Hugging Face's rotary embeddings "
                "do, limits a float64 one); loosen tol or add damping"
            )
            asked = (
                ""
                if tol == self.options.tol
                else f", what {self.fitted.engine.dtype} products certify, above the "
                f"{self.options.tol:.0e} asked"
            )
            which = (
                ""
                if self._batched is None
                else " (this question solves batch by batch: the first of its solves to stop "
                "short; describe()['residuals'] lists every solve)"
            )
            warn(
                f"ASTRA stopped after {iterations + 1} iterations with a relative residual of "
                f"{float(residual.max()):.1e} (tol {tol:.1e}{asked}){which}; {remedy}",
                UserWarning,
            )
        return x

    # one warning per question, not one per batch of training examples its loop solves (the
    # self-scores, RelatIF, RIF and Newton estimators, group removal, leverages)
    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        with self._one_warning():
            return super().scores(queries, estimator)

    def self_scores(self, estimator: Estimator) -> Tensor:
        with self._one_warning():
            return super().self_scores(estimator)

    def relatif_and_self_scores(
        self, queries: ExampleSet, norm: RelatifNorm
    ) -> tuple[Tensor, Tensor]:
        with self._one_warning():
            return super().relatif_and_self_scores(queries, norm)

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        with self._one_warning():
            return super().removal(indices, estimator)

    def leverages(self) -> Tensor:
        with self._one_warning():
            return super().leverages()

    @contextmanager
    def _one_warning(self) -> Iterator[None]:
        """Within: at most one short-solve warning (a call nested in another shares it)."""
        outer = self._batched is not None
        if not outer:
            self._batched = False
        try:
            yield
        finally:
            if not outer:
                self._batched = None

    def _first_warning(self, V: Tensor, shift: float, ridge: float) -> bool:
        """Whether a short solve of ``V`` is to be warned about: not yet warned about (by its
        digest), and within a question (:meth:`_one_warning`) the first to stop short."""
        if self._batched:
            return False
        key = (tensor_digest(V), shift, ridge)
        first = key not in self._warned
        self._warned.add(key)
        if self._batched is not None:
            self._batched = True
        return first

    def _step(
        self, apply: Callable[[Tensor], Tensor], ridge: float, shift: float, V: Tensor
    ) -> float:
        """The Neumann step: given, or 1 / lambda_max(P^{-1} A) by power iteration (cached)."""
        if self.options.step != "auto":
            return float(self.options.step)
        if ridge not in self.steps:
            gen = torch.Generator(device=V.device).manual_seed(0)
            z = torch.randn(1, V.shape[1], generator=gen, dtype=torch.float64, device=V.device)
            estimate = 1.0
            for _ in range(self.options.power_iterations):
                Az = apply(z)
                w = self._precondition(Az, shift)
                # Rayleigh quotient of P^{-1} A in the A inner product
                estimate = float((w * Az).sum() / (z * Az).sum().clamp_min(1e-300))
                z = w / w.norm().clamp_min(1e-300)
            self.steps[ridge] = 1.0 / max(estimate, 1e-12)
        return self.steps[ridge]

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return self._iterate(self._operator(), self.fitted.ridge + shift, V, shift)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        fitted = self.fitted
        ridge = fitted.retained_ridge(len(group))
        shift = ridge - fitted.ridge
        return self._iterate(self._operator().retained(group), ridge, V, shift)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        if self.preconditioner is not None:
            out["preconditioner"] = self.preconditioner.describe()
        out["iterations"] = list(self.iterations)
        out["residuals"] = list(self.residuals)
        if self._fitted is not None:
            out["effective_tol"] = attainable_tolerance(self.options.tol, self.fitted.engine.dtype)
        return out
