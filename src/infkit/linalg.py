"""Dense symmetric solves with honest failure: Cholesky first, eigendecomposition as fallback.

A curvature that is singular or indefinite raises :class:`CurvatureError` with the offending
eigenvalues and the damping that would fix it, instead of returning a silently wrong answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infkit.errors import CurvatureError

#: A matrix whose condition number exceeds 1/(RCOND_FLOOR * P * eps) is treated as singular.
RCOND_FLOOR = 10.0


def _singular_threshold(size: int, dtype: torch.dtype) -> float:
    return RCOND_FLOOR * size * torch.finfo(dtype).eps


class SymmetricSolver:
    """Solves A X = B for a symmetric positive definite A given densely.

    Cholesky is tried first; when it fails (A not numerically positive definite) the symmetric
    eigendecomposition decides between "indefinite" and "singular" and raises with a remedy.
    After a successful Cholesky, the extreme eigenvalues are estimated by (inverse) power
    iteration so that a numerically singular A is still caught.

    Args:
        matrix: A, [P, P]; symmetrised and solved in float64.
        what: a short description of A for error messages.
        hint: what the user can change, appended to error messages.
    """

    def __init__(self, matrix: Tensor, *, what: str = "curvature", hint: str = "") -> None:
        A = matrix.to(torch.float64)
        A = 0.5 * (A + A.T)
        self.size = A.shape[0]
        self.what = what
        self.hint = hint
        self._chol: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            self._chol = L
            lo, hi = self._extreme_eigenvalues(A, L)
            if lo <= _singular_threshold(self.size, torch.float64) * hi:
                self._use_eigh(A)
        else:
            self._use_eigh(A)

    def _use_eigh(self, A: Tensor) -> None:
        evals, evecs = torch.linalg.eigh(A)
        lo, hi = float(evals[0]), float(evals[-1].abs())
        scale = max(hi, float(evals.abs().max()))
        tol = _singular_threshold(self.size, torch.float64) * scale
        if lo < -tol:
            raise CurvatureError(
                f"the {self.what} is indefinite: smallest eigenvalue {lo:.3e}, largest "
                f"{scale:.3e}; influence needs a positive definite curvature. Add damping "
                f"greater than {-lo:.3e} (e.g. damping={_round_up(-lo * 1.5)}), or use the "
                f"Gauss-Newton curvature (curvature='ggn'), which is positive semidefinite"
                f"{self.hint}"
            )
        if lo <= tol:
            suggestion = _round_up(max(scale, 1e-12) * 1e-3)
            raise CurvatureError(
                f"the {self.what} is singular: smallest eigenvalue {lo:.3e}, largest "
                f"{scale:.3e} (condition number > {1 / max(lo / scale, 1e-300):.1e}); "
                f"influence is undefined along its flat directions. Pass damping > 0 "
                f"(e.g. damping={suggestion}, 1e-3 x the largest eigenvalue) or the l2 the model "
                f"was trained with{self.hint}"
            )
        self._chol = None
        self._eig = (evals, evecs)

    @staticmethod
    def _extreme_eigenvalues(A: Tensor, L: Tensor, iters: int = 30) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(A.shape[0], 1, dtype=A.dtype, generator=gen)
        w = v.clone()
        hi = lo_inv = 0.0
        for _ in range(iters):
            v = A @ v
            hi = float(v.norm())
            v = v / hi
            w = torch.cholesky_solve(w, L)
            lo_inv = float(w.norm())
            w = w / lo_inv
        return 1.0 / lo_inv, hi

    @property
    def method(self) -> str:
        return "cholesky" if self._chol is not None else "eigh"

    def solve(self, B: Tensor) -> Tensor:
        """A^{-1} B for B of shape [P] or [P, k] (float64)."""
        vec = B.dim() == 1
        B64 = B.to(torch.float64).reshape(self.size, -1)
        if self._chol is not None:
            X = torch.cholesky_solve(B64, self._chol)
        else:
            evals, evecs = self._eig
            X = evecs @ ((evecs.T @ B64) / evals.unsqueeze(1))
        return X.reshape(-1) if vec else X


def _round_up(x: float) -> str:
    """A friendly value >= x with one significant digit, as text."""
    if x <= 0:
        return "1e-6"
    mantissa, exponent = f"{x:.0e}".split("e")
    value = float(f"{int(mantissa) + 1}e{exponent}") if float(f"{x:.0e}") < x else float(f"{x:.0e}")
    return f"{value:.0e}"


def solve_small(A: Tensor, B: Tensor, *, what: str) -> Tensor:
    """Batched solve of small systems A X = B ([..., k, k]), raising on near-singular A."""
    X, info = torch.linalg.solve_ex(A, B)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0, 0]) if info.dim() else 0
        raise CurvatureError(f"{what} is singular (batch entry {bad})")
    return X
