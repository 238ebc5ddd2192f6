"""method="astra": EK-FAC as the preconditioner of an iteration that converges to the exact
damped inverse-curvature-vector product (Wang et al., NeurIPS 2025; methods.md §6.7).

With ``P`` the EK-FAC approximation of ``A = H + r I`` (``H`` the mean-form GGN, or the Hessian
with ``target="hessian"``, applied matrix-free by :class:`infkit.curvature.CurvatureOperator`;
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

import warnings
from typing import Any

import torch
from torch import Tensor

from infkit.curvature import KINDS, CurvatureOperator
from infkit.errors import UnsupportedError
from infkit.linalg import block_conjugate_gradients, conjugate_gradients
from infkit.methods import register
from infkit.methods.base import FitContext
from infkit.methods.ekfac import EKFAC

SOLVERS = ("cg", "neumann")


@register
class ASTRA(EKFAC):
    """EK-FAC-preconditioned iteration for the exact damped GGN (or Hessian) inverse.

    Args:
        target: ``"ggn"`` (default) or ``"hessian"``: the curvature whose damped inverse the
            iteration converges to (EK-FAC, the preconditioner, always approximates the GGN).
        solver: ``"cg"`` (default) or ``"neumann"`` (see the module docstring).
        tol: stop a right-hand side when ``||v - A x|| <= tol ||v||``.
        maxiter: iterations after the first (EK-FAC) one; ``maxiter=0`` returns EK-FAC's answer.
        step: step size of ``solver="neumann"`` after the first iterate, or ``"auto"``.
        power_iterations: power iterations estimating ``lambda_max(P^{-1} A)`` for
            ``step="auto"``.
        hvp_batch_size: examples per curvature-product pass (default: 4 x the facade's batch).
        **options: the options of method ``"ekfac"`` (fisher, damping_scale, factors_dir, ...).
    """

    name = "astra"
    summary = "EK-FAC-preconditioned iteration converging to the exact damped GGN/Hessian inverse"
    #: the per-module heuristic only shapes the preconditioner here, never the answer, so the
    #: facade's damping="auto" (which promises a damped answer) is refused
    supports_auto_damping = False

    def __init__(
        self,
        target: str = "ggn",
        solver: str = "cg",
        tol: float = 1e-8,
        maxiter: int = 200,
        step: float | str = "auto",
        power_iterations: int = 12,
        hvp_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if target not in KINDS:
            raise UnsupportedError(f"unknown target {target!r}; valid targets: {KINDS}")
        if solver not in SOLVERS:
            raise UnsupportedError(f"unknown solver {solver!r}; valid solvers: {SOLVERS}")
        self.curvature = target
        self.solver = solver
        self.tol = tol
        self.maxiter = maxiter
        if not (step == "auto" or (isinstance(step, (int, float)) and step > 0)):
            raise UnsupportedError(f"step must be a number > 0 or 'auto', got {step!r}")
        self.step = step
        self.power_iterations = power_iterations
        self.steps: dict[float, float] = {}
        self.hvp_batch_size = hvp_batch_size
        self.operator: CurvatureOperator | None = None
        self.iterations: list[int] = []

    def fit(self, context: FitContext) -> None:
        super().fit(context)
        self.operator = CurvatureOperator(
            context.per_example,
            context.train,
            self.curvature,
            batch_size=self.hvp_batch_size or 4 * context.batch_size,
        )

    def precondition(self, R: Tensor, shift: float = 0.0) -> Tensor:
        """EK-FAC's (G + r I)^{-1} R for rows R [k, P]."""
        return super().solve(R, shift)

    def _iterate(
        self, operator: CurvatureOperator, ridge: float, V: Tensor, shift: float
    ) -> Tensor:
        V = V.to(torch.float64)

        def apply(X: Tensor) -> Tensor:  # rows in, rows out
            return operator.matmat(X) + ridge * X

        x = self.precondition(V, shift)  # the first iterate: EK-FAC's answer
        if self.maxiter == 0:
            self.iterations.append(1)
            return x
        v_norm = V.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        if self.solver == "cg":
            R = V - apply(x)
            # many right-hand sides share one block Krylov space (far fewer iterations)
            solve = block_conjugate_gradients if len(V) >= 2 else conjugate_gradients
            result = solve(
                lambda X: apply(X.T).T,
                R.T,
                tol=self.tol * float(v_norm.min()) / max(float(R.norm(dim=1).max()), 1e-300),
                maxiter=self.maxiter,
                precondition=lambda Z: self.precondition(Z.T, shift).T,
            )
            x = x + result.X.T
            iterations = result.iterations
            residual = (V - apply(x)).norm(dim=1) / v_norm
        else:
            step = self._step(apply, ridge, shift, V)
            history = []
            iterations = 0
            residual = torch.full_like(v_norm, float("inf"))
            while iterations < self.maxiter:
                R = V - apply(x)
                residual = R.norm(dim=1) / v_norm
                history.append(float(residual.max()))
                if bool((residual <= self.tol).all()):
                    break
                if len(history) > 3 and history[-1] > history[-4] * 1.5:
                    warnings.warn(
                        f"ASTRA's Neumann iteration diverges (relative residual {history[-1]:.1e}"
                        f" after {iterations} iterations): the step {step:g} is too large "
                        "for this curvature; lower step=, or use solver='cg'",
                        UserWarning,
                        stacklevel=4,
                    )
                    break
                x = x + step * self.precondition(R, shift)
                iterations += 1
        self.iterations.append(iterations + 1)
        if bool((residual > self.tol).any()):
            warnings.warn(
                f"ASTRA stopped after {iterations + 1} iterations with a relative residual of "
                f"{float(residual.max()):.1e} (tol {self.tol:.0e}); raise maxiter or add damping",
                UserWarning,
                stacklevel=4,
            )
        return x

    def _step(self, apply, ridge: float, shift: float, V: Tensor) -> float:
        """The Neumann step: given, or 1 / lambda_max(P^{-1} A) by power iteration (cached)."""
        if self.step != "auto":
            return float(self.step)
        if ridge not in self.steps:
            gen = torch.Generator(device=V.device).manual_seed(0)
            z = torch.randn(1, V.shape[1], generator=gen, dtype=torch.float64, device=V.device)
            estimate = 1.0
            for _ in range(self.power_iterations):
                Az = apply(z)
                w = self.precondition(Az, shift)
                # Rayleigh quotient of P^{-1} A in the A inner product
                estimate = float((w * Az).sum() / (z * Az).sum().clamp_min(1e-300))
                z = w / w.norm().clamp_min(1e-300)
            self.steps[ridge] = 1.0 / max(estimate, 1e-12)
        return self.steps[ridge]

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        ctx = self.context
        return self._iterate(self.operator, ctx.l2 + ctx.damping + shift, V, shift)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        ctx = self.context
        ridge = ctx.retained_ridge(len(group))
        shift = ridge - ctx.l2 - ctx.damping
        return self._iterate(self.operator.retained(group), ridge, V, shift)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(
            target=self.curvature,
            solver=self.solver,
            tol=self.tol,
            maxiter=self.maxiter,
            iterations=list(self.iterations),
        )
        return out
