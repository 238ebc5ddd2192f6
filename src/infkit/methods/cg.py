"""method="cg": conjugate gradients on curvature-vector products (methods.md §3.2).

Solves ``(H + (l2 + damping + shift) I) X = V`` for all rows of V at once without forming H: each
iteration is one pass over the training data computing GGN- (or Hessian-) vector products for
every right-hand side together. Converged columns stop updating, so the result never turns to
NaN after convergence (a failure of a peer's CG). Exact to the tolerance; the cost is
``iterations x N`` per-example JVP/VJP pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from infkit.curvature import KINDS, CurvatureOperator
from infkit.errors import UnsupportedError
from infkit.linalg import conjugate_gradients
from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature

PRECONDITIONERS = (None, "diagonal")


@register
class ConjugateGradient(InverseCurvature):
    """Conjugate gradients with a tolerance, an iteration cap and an optional preconditioner.

    Args:
        curvature: ``"ggn"`` (default, positive semidefinite) or ``"hessian"``.
        tol: stop a column when ``||v - A x|| <= tol ||v||``.
        maxiter: iteration cap; a column that has not converged by then triggers a warning.
        preconditioner: ``None``, ``"diagonal"`` (Jacobi, with the exact GGN diagonal), or a
            callable ``R [P, k] -> M^{-1} R`` for a symmetric positive definite M.
        batch_size: examples per curvature pass (default: the facade's batch size x 4).
    """

    name = "cg"
    estimators = ("if", "rif", "newton", "relatif")
    summary = "conjugate gradients on GGN/Hessian-vector products; exact to its tolerance"
    scales = True

    def __init__(
        self,
        curvature: str = "ggn",
        tol: float = 1e-8,
        maxiter: int = 500,
        preconditioner: str | Callable[[Tensor], Tensor] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if curvature not in KINDS:
            raise UnsupportedError(f"unknown curvature {curvature!r}; valid curvatures: {KINDS}")
        if not (callable(preconditioner) or preconditioner in PRECONDITIONERS):
            raise UnsupportedError(
                f"unknown preconditioner {preconditioner!r}; use None, 'diagonal' or a callable"
            )
        self.curvature = curvature
        self.tol = tol
        self.maxiter = maxiter
        self.preconditioner = preconditioner
        self.batch_size = batch_size
        self.operator: CurvatureOperator | None = None
        self._diagonal: Tensor | None = None
        self.iterations: list[int] = []  # iterations of each solve, for reports

    def fit(self, context: FitContext) -> None:
        self.context = context
        self.operator = CurvatureOperator(
            context.per_example,
            context.train,
            self.curvature,
            batch_size=self.batch_size or 4 * context.batch_size,
        )
        if self.preconditioner == "diagonal":
            self._diagonal = self._ggn_diagonal()

    def _ggn_diagonal(self) -> Tensor:
        """diag(H) for the GGN, (1/N) sum_i sum_{c,d} J_icp Lambda_icd J_idp, [P] float64."""
        ctx = self.context
        diag = torch.zeros(ctx.space.size, dtype=torch.float64, device=ctx.space.device)
        for batch in ctx.train.batches(ctx.batch_size):
            J = ctx.per_example.jacobians(batch).to(torch.float64)
            _, _, lam = ctx.per_example.output_derivatives(batch)
            diag += torch.einsum("bcp,bcd,bdp->p", J, lam.to(torch.float64), J)
        return diag / ctx.n

    def _apply(self, operator: CurvatureOperator, ridge: float, V: Tensor) -> Tensor:
        def matmat(X: Tensor) -> Tensor:  # columns in, columns out
            return (operator.matmat(X.T) + ridge * X.T).T

        precondition = None
        if self._diagonal is not None:
            inverse = 1.0 / (self._diagonal + ridge).clamp_min(torch.finfo(torch.float64).tiny)
            precondition = lambda R: inverse.unsqueeze(1) * R  # noqa: E731
        elif callable(self.preconditioner):
            precondition = self.preconditioner
        result = conjugate_gradients(
            matmat,
            V.to(torch.float64).T,
            tol=self.tol,
            maxiter=self.maxiter,
            precondition=precondition,
        )
        self.iterations.append(result.iterations)
        if not bool(result.converged.all()):
            warnings.warn(
                f"CG stopped after {self.maxiter} iterations with a relative residual of "
                f"{float(result.residuals.max()):.1e} (tol {self.tol:.0e}); the curvature is "
                "ill-conditioned: raise maxiter, add damping or use preconditioner='diagonal'",
                UserWarning,
                stacklevel=4,
            )
        return result.X.T

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        ctx = self.context
        return self._apply(self.operator, ctx.l2 + ctx.damping + shift, V)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        ridge = self.context.retained_ridge(len(group))
        return self._apply(self.operator.retained(group), ridge, V)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(tol=self.tol, maxiter=self.maxiter, iterations=list(self.iterations))
        return out
