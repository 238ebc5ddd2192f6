"""method="exact": the dense P x P curvature, factorised.

The mean-form data curvature ``H = (1/N) sum_i C_i`` is formed in float64, with C_i the
generalised Gauss-Newton block ``J_i^T Lambda_i J_i`` (``curvature="ggn"``, the default: positive
semidefinite, equal to the Hessian for models linear in theta) or the true Hessian of l_i
(``curvature="hessian"``). Solves use a Cholesky factorisation of ``H + (l2 + damping + shift) I``,
falling back to the eigendecomposition, which explains a singular or indefinite curvature.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from infkit.errors import ProblemTooLargeError, UnsupportedError
from infkit.linalg import SymmetricSolver
from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature
from infkit.parameters import human_bytes

CURVATURES = ("ggn", "hessian")


@register
class Exact(InverseCurvature):
    """Dense curvature with a Cholesky (or eigendecomposition) solve.

    Args:
        curvature: ``"ggn"`` (default) or ``"hessian"``.
    """

    name = "exact"
    estimators = ("if", "rif", "newton", "relatif")
    summary = "dense P x P GGN or Hessian, Cholesky solve; the reference for small models"

    def __init__(self, curvature: str = "ggn") -> None:
        super().__init__()
        if curvature not in CURVATURES:
            raise UnsupportedError(
                f"unknown curvature {curvature!r}; valid curvatures: {', '.join(CURVATURES)}"
            )
        self.curvature = curvature
        self.data_curvature: Tensor | None = None
        self._solvers: dict[float, SymmetricSolver] = {}

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        # the curvature, its factor and one working copy, in float64
        return 3 * p * p * 8

    def fit(self, context: FitContext) -> None:
        from infkit.methods import scalable_methods

        self.context = context
        p = context.space.size
        need = self.memory_estimate(context.n, p, 0)
        if need > context.memory_limit:
            raise ProblemTooLargeError(
                f"method='exact' forms a dense {p:,} x {p:,} curvature (P = {p:,} parameters), "
                f"which needs {human_bytes(need)}, above the memory limit of "
                f"{human_bytes(context.memory_limit)}. Use a method that scales: "
                f"{', '.join(repr(m) for m in scalable_methods())}; or restrict the parameters "
                "to attribute (requires_grad=False on the rest), or raise memory_limit."
            )
        H = torch.zeros(p, p, dtype=torch.float64, device=context.space.device)
        batches = context.train.batches(context.batch_size)
        total = -(-context.n // context.batch_size)
        for batch in tqdm(
            batches, total=total, desc=f"exact {self.curvature}", disable=not context.progress
        ):
            H += self.batch_curvature(batch)
        self.data_curvature = H / context.n
        self._solvers.clear()
        self._solver(0.0)  # factorise now: a singular or indefinite curvature fails at fit

    def batch_curvature(self, batch) -> Tensor:
        """sum over the batch of C_i, dense [P, P] float64."""
        engine = self.context.per_example
        if self.curvature == "hessian":
            return engine.hessian_sum(batch).to(torch.float64)
        J = engine.jacobians(batch).to(torch.float64)  # [B, C, P]
        _, _, lam = engine.output_derivatives(batch)
        LJ = lam.to(torch.float64) @ J  # [B, C, P]
        b, c, p = J.shape
        return J.reshape(b * c, p).T @ LJ.reshape(b * c, p)

    def _solver(self, shift: float) -> SymmetricSolver:
        key = float(shift)
        if key not in self._solvers:
            ctx = self.context
            ridge = ctx.l2 + ctx.damping + key
            A = self.data_curvature + ridge * torch.eye(
                self.data_curvature.shape[0], dtype=torch.float64, device=self.data_curvature.device
            )
            hint = (
                ""
                if key == 0
                else " (this is the curvature with the removed group's l2 share taken out)"
            )
            self._solvers[key] = SymmetricSolver(
                A,
                what=f"damped {self.curvature.upper()} (l2={ctx.l2:g}, damping={ctx.damping:g})",
                hint=hint,
            )
        return self._solvers[key]

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return self._solver(shift).solve(V.to(torch.float64).T).T

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        ctx = self.context
        n, n_f = ctx.n, len(group)
        C_F = torch.zeros_like(self.data_curvature)
        for batch in ctx.train.batches(ctx.batch_size, group):
            C_F += self.batch_curvature(batch)
        ridge = (n - n_f) / n * ctx.l2 + ctx.damping
        A = self.data_curvature - C_F / n
        A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        solver = SymmetricSolver(
            A,
            what=f"retained {self.curvature.upper()} after removing {n_f} example(s)",
        )
        return solver.solve(V.to(torch.float64).T).T

    def describe(self) -> dict[str, object]:
        out = super().describe()
        if self._solvers:
            out["factorisation"] = next(iter(self._solvers.values())).method
        return out
