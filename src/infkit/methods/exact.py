"""method="exact": the dense P x P curvature, factorised.

The mean-form data curvature ``H = (1/N) sum_i C_i`` is formed in float64, with C_i the
generalised Gauss-Newton block ``J_i^T Lambda_i J_i`` (``curvature="ggn"``, the default: positive
semidefinite, equal to the Hessian for models linear in theta) or the true Hessian of l_i
(``curvature="hessian"``). Solves use a Cholesky factorisation of ``H + (l2 + damping + shift) I``,
falling back to the eigendecomposition, which explains a singular or indefinite curvature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from infkit.data import Batch
from infkit.errors import CurvatureError, NotFittedError, listed
from infkit.fitted import Fitted
from infkit.linalg import SymmetricSolver
from infkit.memory import FLOAT64_BYTES, human_bytes
from infkit.methods.base import Fidelity, PrimalMethod, Problem, register, scalable_methods
from infkit.options import Options, option
from infkit.progress import track

if TYPE_CHECKING:
    from infkit.plan import RunShape

#: ``method="auto"`` picks ``exact`` up to this many parameters (when the memory allows)
AUTO_MAX_PARAMETERS = 20_000


@dataclasses.dataclass(frozen=True)
class ExactOptions(Options):
    """Options of ``method="exact"``."""

    curvature: Literal["ggn", "hessian"] = option(
        "ggn", "per-example curvature: the Gauss-Newton block J^T Lambda J or the true Hessian"
    )


@register
class Exact(PrimalMethod):
    """Dense curvature with a Cholesky (or eigendecomposition) solve (docs/methods/exact.md)."""

    name = "exact"
    summary = "dense P x P GGN or Hessian, Cholesky solve; the reference for small models"
    Options = ExactOptions
    exact_example_curvature = True
    fidelity = Fidelity(reference="ggn", rtol=1e-8)
    auto_priority = 0
    fitted_state = ("data_curvature",)
    options: ExactOptions

    def __init__(self, options: ExactOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature = self.options.curvature
        self.data_curvature: Tensor | None = None
        self._solvers: dict[float, SymmetricSolver] = {}

    #: P x P float64 copies at the factorisation's peak: the curvature, its symmetrised and
    #: damped copy, the Cholesky factor and LAPACK's column-major working copy, and the
    #: allocator's share (measured: 4.4 copies at P = 3,010 and 3,610; a tester's run rose by 6.4
    #: of them before the damped copy was made in one, where 3 were counted)
    PEAK_COPIES = 5
    #: those kept after it: the curvature and its Cholesky factor
    KEPT_COPIES = 2

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        return cls.PEAK_COPIES * p * p * FLOAT64_BYTES

    def fit_objects(self, shape: RunShape) -> tuple[str, int, int]:
        """The dense curvature at the factorisation's peak (:meth:`memory_estimate`), and the
        :data:`KEPT_COPIES` kept after it."""
        p = shape.parameters
        dense = self.memory_estimate(shape.n_train, p, shape.outputs)
        kept = self.KEPT_COPIES * p * p * FLOAT64_BYTES
        return "dense curvature, its damped copy and Cholesky factor", dense, kept

    @classmethod
    def suits(cls, problem: Problem) -> bool:
        fits = cls.memory_estimate(problem.n, problem.p, problem.c) <= problem.memory_limit
        return fits and problem.p <= AUTO_MAX_PARAMETERS

    @classmethod
    def suitability(cls, problem: Problem) -> str:
        need = cls.memory_estimate(problem.n, problem.p, problem.c)
        fits = "fits within" if need <= problem.memory_limit else "exceeds"
        size = "<=" if problem.p <= AUTO_MAX_PARAMETERS else ">"
        return (
            f"the dense P x P curvature ({human_bytes(need)}) {fits} the memory limit "
            f"({human_bytes(problem.memory_limit)}), P = {problem.p:,} {size} "
            f"{AUTO_MAX_PARAMETERS:,}"
        )

    @classmethod
    def memory_message(cls, problem: Problem, need: int) -> str:
        p = problem.p
        return (
            f"method='exact' forms a dense {p:,} x {p:,} curvature (P = {p:,} parameters), "
            f"which needs {human_bytes(need)}, above the memory limit of "
            f"{human_bytes(problem.memory_limit)}. Use a method that scales: "
            f"{', '.join(repr(m) for m in scalable_methods())}; or restrict the parameters "
            "to attribute (requires_grad=False on the rest), or raise memory_limit."
        )

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        p = fitted.space.size
        H = torch.zeros(p, p, dtype=torch.float64, device=fitted.space.device)
        batches = fitted.train.batches(fitted.batch_size)
        total = -(-fitted.n // fitted.batch_size)
        for batch in track(batches, fitted.progress, f"exact {self.curvature}", total):
            H += self.batch_curvature(batch)
        self.data_curvature = H.div_(fitted.n)  # (in place: a P x P copy fewer at the peak)
        self._solvers.clear()
        try:
            self._solver(0.0)  # factorise now: a singular or indefinite curvature fails at fit
        except CurvatureError as error:
            unused = self._flat_parameters()
            if unused:  # (a tester's unused head at l2 = 0: told as a damping to add)
                raise CurvatureError(f"{str(error).rstrip('.')}. {unused}") from error
            raise

    def _flat_parameters(self) -> str:
        """Words naming the parameters along which the data's curvature is exactly 0 on every
        training example (no output the loss reads depends on them: an unused head, a pooler),
        or "" where there are none. Their flat directions make the curvature singular at
        ``l2 = damping = 0`` whatever the rest."""
        H = self._data_curvature()
        space = self.fitted.space
        zero = (H == 0).all(dim=1)
        flat = [
            name
            for name, span in space.module_slices().items()
            if span.stop > span.start and bool(zero[span].all())
        ]
        if not flat:
            return ""
        return (
            f"No output the loss reads depends on {listed([repr(n) for n in flat], 4)} (zero "
            "curvature on every training example): freeze them (requires_grad=False) to "
            "attribute through the rest"
        )

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        self._solvers.clear()
        self._solver(0.0)  # the same factorisation as at fit (describe() reports it)

    def batch_curvature(self, batch: Batch) -> Tensor:
        """sum over the batch of C_i, dense [P, P] float64."""
        engine = self.fitted.engine
        if self.curvature == "hessian":
            return engine.hessian_sum(batch).to(torch.float64)
        J = engine.jacobians(batch).to(torch.float64)  # [B, C, P]
        _, _, lam = engine.output_derivatives(batch)
        LJ = lam.to(torch.float64) @ J  # [B, C, P]
        b, c, p = J.shape
        return J.reshape(b * c, p).T @ LJ.reshape(b * c, p)

    def _data_curvature(self) -> Tensor:
        if self.data_curvature is None:
            raise NotFittedError("method 'exact' has no curvature: call fit first")
        return self.data_curvature

    def _solver(self, shift: float) -> SymmetricSolver:
        key = float(shift)
        if key not in self._solvers:
            ctx = self.fitted
            H = self._data_curvature()
            ridge = ctx.ridge + key
            # symmetrised and damped in one P x P copy, one of the PEAK_COPIES (a tester's run
            # made four for it: the identity, its multiple, their sum and the solver's own
            # symmetrised copy)
            A = H + H.T
            A.mul_(0.5).diagonal().add_(ridge)
            hint = (
                ""
                if key == 0
                else " (this is the curvature with the removed group's l2 share taken out)"
            )
            self._solvers[key] = SymmetricSolver(
                A,
                symmetric=True,
                what=f"damped {self.curvature.upper()} (l2={ctx.l2:g}, damping={ctx.damping:g})",
                hint=hint,
                curvature=self.curvature,
                damping=ctx.damping,
            )
        return self._solvers[key]

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return self._solver(shift).solve(V.to(torch.float64).T).T

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        ctx = self.fitted
        n, n_f = ctx.n, len(group)
        H = self._data_curvature()
        C_F = torch.zeros_like(H)
        for batch in ctx.train.batches(ctx.batch_size, group):
            C_F += self.batch_curvature(batch)
        ridge = ctx.retained_ridge(n_f)
        A = H - C_F / n
        A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        shown = ", ".join(ctx.train.example(int(j)) for j in group[:5])
        more = f" and {n_f - 5} more" if n_f > 5 else ""
        solver = SymmetricSolver(
            A,
            what=f"retained {self.curvature.upper()} after removing {n_f} example(s) "
            f"({shown}{more})",
            curvature=self.curvature,
            damping=ctx.damping,
        )
        return solver.solve(V.to(torch.float64).T).T

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        if self._solvers:
            out["factorisation"] = next(iter(self._solvers.values())).method
        return out
