"""Dense symmetric linear algebra: solves with honest failure (Cholesky first, eigendecomposition
as fallback), conjugate gradients, and Gram matrices at half the cost of a general product.

A curvature that is singular or indefinite raises :class:`CurvatureError` with the offending
eigenvalues and the damping that would fix it, instead of returning a silently wrong answer.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from infkit.errors import CurvatureError, warn
from infkit.parameters import dtype_name

#: columns per block of :func:`gram` (fewer, larger products below twice this width)
GRAM_BLOCK = 96
#: most column blocks of :func:`gram`
GRAM_BLOCKS = 4

#: A matrix whose condition number exceeds 1/(RCOND_FLOOR * P * eps) is treated as singular.
RCOND_FLOOR = 10.0


def gram(X: Tensor, weights: Tensor | None = None) -> Tensor:
    """``X^T diag(w) X`` [d, d] of ``X`` [n, d] (``w`` [n] or [n, 1], default ones), symmetric.

    The columns are split into k blocks and only the products on and above the block diagonal
    are computed (k(k+1)/2 of k^2), the rest mirrored: BLAS has no symmetric rank-k update in
    PyTorch, and this is the one that the Kronecker covariances ``sum_t a_t a_t^T`` spend most
    of their time on (about 1.4x faster at d = 384 and 1.8x at d = 1024 with k = 4 on a CPU).
    """
    left = X if weights is None else X * weights.reshape(-1, 1)
    d = X.shape[-1]
    k = max(1, min(GRAM_BLOCKS, d // GRAM_BLOCK))
    if k == 1:
        return left.T @ X
    edges = [d * i // k for i in range(k + 1)]
    out = torch.empty(d, d, dtype=torch.result_type(left, X), device=X.device)
    for lo, hi in itertools.pairwise(edges):
        row = left[:, lo:hi].T @ X[:, lo:]  # [hi - lo, d - lo]: the diagonal block and right
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo :].T
    return out


#: columns per product of :func:`wide_inner`
WIDE_INNER_COLUMNS = 32768


def wide_inner(X: Tensor, Y: Tensor) -> Tensor:
    """``X Y^T`` [m, n] of two short, wide matrices ``X`` [m, d] and ``Y`` [n, d] (a few query
    blocks against a batch's per-example gradients), summed over column chunks.

    One product over all d columns is a matrix-vector-like shape that BLAS runs far below its
    speed: at m = 16, n = 8, d = 393,216 on two CPU cores it took 10 ms, against 4.7 ms summed
    over chunks of :data:`WIDE_INNER_COLUMNS` columns, whose pieces stay in cache.
    """
    d = X.shape[-1]
    if d <= 2 * WIDE_INNER_COLUMNS:
        return X @ Y.T
    out = X[:, :WIDE_INNER_COLUMNS] @ Y[:, :WIDE_INNER_COLUMNS].T
    for start in range(WIDE_INNER_COLUMNS, d, WIDE_INNER_COLUMNS):
        stop = start + WIDE_INNER_COLUMNS
        out.addmm_(X[:, start:stop], Y[:, start:stop].T)
    return out


def singular_threshold(size: int, dtype: torch.dtype) -> float:
    """The smallest eigenvalue, relative to the largest, of a symmetric matrix of ``size`` rows
    computed in ``dtype`` below which it is singular in that precision."""
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
        curvature: what A is built from, "hessian" or "ggn", for the remedy an indefinite A gets.
        damping: the damping A holds already: an indefinite A needs more than it by the
            magnitude of A's smallest eigenvalue.
        symmetric: A is symmetric already, in float64 (it is taken as it is, not copied).
    """

    def __init__(
        self,
        matrix: Tensor,
        *,
        what: str = "curvature",
        hint: str = "",
        curvature: str = "hessian",
        damping: float = 0.0,
        symmetric: bool = False,
    ) -> None:
        A = matrix.to(torch.float64)
        if not symmetric:
            A = 0.5 * (A + A.T)
        self.size = A.shape[0]
        self.what = what
        self.hint = hint
        self.curvature = curvature
        self.damping = damping
        self._chol: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            self._chol = L
            lo, hi = self._extreme_eigenvalues(A, L)
            if lo <= singular_threshold(self.size, torch.float64) * hi:
                self._use_eigh(A)
        else:
            self._use_eigh(A)

    def _use_eigh(self, A: Tensor) -> None:
        evals, evecs = torch.linalg.eigh(A)
        lo, scale = float(evals[0]), float(evals.abs().max())
        tol = singular_threshold(self.size, torch.float64) * scale
        if lo < -tol:
            needed = self.damping - lo  # the damping that lifts the smallest eigenvalue to 0
            raise CurvatureError(
                f"the {self.what} is indefinite: smallest eigenvalue {lo:.3e}, largest "
                f"{float(evals[-1]):.3e}; influence needs a positive definite curvature. "
                + (f"Raise damping from {self.damping:g} to " if self.damping else "Add damping ")
                + f"greater than {needed:.3e} (e.g. damping={_round_up(self.damping - 1.5 * lo)}), "
                f"{indefinite_remedy(self.curvature)}{self.hint}"
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
            assert self._eig is not None  # one of the two factorisations always exists
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


#: a relative residual below this many machine epsilons of the product dtype is not attainable
ATTAINABLE_EPSILONS = 100.0


def attainable_tolerance(tol: float, dtype: torch.dtype) -> float:
    """``tol``, raised to what products in ``dtype`` can certify (100 eps: 1.2e-5 in float32).

    Curvature products of a float32 model carry float32 rounding; asking CG for a relative
    residual of 1e-8 there only makes it iterate to its cap and warn.
    """
    return max(tol, ATTAINABLE_EPSILONS * torch.finfo(dtype).eps)


def tolerance_note(tol: float, dtype: torch.dtype | None) -> str:
    """The tolerance a solve asked for ``tol`` runs to with products in ``dtype``, as the plan
    says it: ``"tol=1e-05 (1e-08 asked: float32 products certify no less)"`` when raised."""
    reached = tol if dtype is None else attainable_tolerance(tol, dtype)
    if dtype is None or reached <= tol:
        return f"tol={tol:g}"
    return f"tol={reached:.2g} ({tol:g} asked: {dtype_name(dtype)} products certify no less)"


#: a tolerance that the products' precision raises above this is warned about: the solve then
#: certifies less than two significant digits (a bfloat16 model's 100 eps is 0.78)
IMPRECISE_TOLERANCE = 1e-2


def imprecise_solve_warning(method: str, tol: float, dtype: torch.dtype) -> None:
    """Warn when curvature products in ``dtype`` leave ``method``'s solve (asked for ``tol``)
    unable to certify two significant digits (:func:`attainable_tolerance`)."""
    reached = attainable_tolerance(tol, dtype)
    if reached > IMPRECISE_TOLERANCE and reached > tol:
        name = dtype_name(dtype)
        warn(
            f"method {method!r} multiplies by the curvature in the model's dtype, {name}, whose "
            f"products certify a relative residual of {reached:.2g} at best (100 x its machine "
            f"epsilon), against tol={tol:g}: its iterations stop almost at once and the answers "
            "are approximate to that order. Fit a float32 copy of the model (with "
            "dtype=torch.bfloat16 the hooked passes still run in bfloat16), or use a Kronecker "
            "method (kfac, ekfac), whose statistics accumulate in float32",
            UserWarning,
        )


NOT_POSITIVE_DEFINITE = (
    "conjugate gradients met a direction of non-positive curvature: the damped curvature is not "
    "positive definite. Increase damping"
)
#: p^T A p / (||p||^2 ||A||) above minus this reads as a curvature zero to rounding (singular):
#: float64 and float32 products (a float32 GGN's null directions read -7e-9) and any Hessian's
ZERO_CURVATURE = 1e-8


def product_rounding(precision: torch.dtype) -> float:
    """The ``rounding`` of :func:`not_positive_definite` for a GGN's products in ``precision``
    (:data:`ZERO_CURVATURE`, or 10 eps of a coarser one: a bfloat16 GGN's null directions read
    -5e-5 of its norm, a reviewer's)."""
    return max(ZERO_CURVATURE, 10 * torch.finfo(precision).eps)


def not_positive_definite(
    matmat: Callable[[Tensor], Tensor],
    P: Tensor,
    pap: Tensor,
    curvature: str,
    rounding: float = ZERO_CURVATURE,
) -> CurvatureError:
    """The refusal of conjugate-gradient directions P (columns) with ``p^T A p <= 0``: singular
    where the lowest ``p^T A p / (||p||^2 ||A||)`` is zero to rounding (a least-squares fit at
    l2 = 0 with P > N was told to check its loss, the built-in squared error), else not
    positive definite with :func:`indefinite_remedy`. ``||A||`` by a few power iterations (a
    refusal's cost only); ``rounding``: the products' (:func:`product_rounding`)."""
    norm = power_iteration(
        lambda X: matmat(X.T).T, P.shape[0], iterations=10, dtype=P.dtype, device=P.device
    )
    ratios = pap / ((P * P).sum(0) * max(norm, torch.finfo(P.dtype).tiny))
    lowest = float(ratios.min())
    if lowest >= -rounding:
        return CurvatureError(
            "conjugate gradients met a direction of zero curvature (p^T A p / (||p||^2 ||A||) = "
            f"{lowest:.1e}, rounding): the damped curvature is singular along it and influence "
            f"is undefined there. Pass a damping well above that rounding (e.g. damping="
            f"{1e-3 * norm:.1e}, 1e-3 of its largest eigenvalue {norm:.2e}) or the l2 the model "
            "was trained with"
        )
    return CurvatureError(f"{NOT_POSITIVE_DEFINITE}, {indefinite_remedy(curvature)}")


def indefinite_remedy(curvature: str = "hessian") -> str:
    """The second remedy for a damped ``curvature`` ("hessian" or "ggn") that is not positive
    definite, after "add damping": the Hessian may be indefinite, the GGN only when the task's
    loss is not convex in the model's outputs."""
    if curvature == "hessian":
        return "or use the Gauss-Newton curvature (curvature='ggn'), which is positive semidefinite"
    return (
        "or check the task's loss: the GGN is positive semidefinite whenever the loss is convex "
        "in the model's outputs, so a custom Task whose loss is not has an indefinite one"
    )


class ConjugateGradientResult:
    """Outcome of :func:`conjugate_gradients` or :func:`block_conjugate_gradients`."""

    def __init__(self, X: Tensor, iterations: int, residuals: Tensor, converged: Tensor) -> None:
        self.X = X
        self.iterations = iterations
        self.residuals = residuals  # relative residual ||b - A x|| / ||b|| per column
        self.converged = converged


def conjugate_gradients(
    matmat,
    B: Tensor,
    *,
    tol: float = 1e-10,
    maxiter: int = 500,
    precondition=None,
    callback: Callable[[int, float], None] | None = None,
    curvature: str = "hessian",
    rounding: float = ZERO_CURVATURE,
) -> ConjugateGradientResult:
    """Solve A X = B for symmetric positive definite A, all columns of B at once.

    Each column runs its own (preconditioned) conjugate-gradient recursion, but all columns share
    one ``matmat`` call per iteration, so k right-hand sides cost one pass over the data per
    iteration. A column stops updating once its relative residual is below ``tol`` (it is never
    iterated past convergence, where the recursion's denominators vanish and produce NaN); a
    column with a non-positive curvature p^T A p raises :class:`CurvatureError`.

    Args:
        matmat: X [n, k] -> A X [n, k].
        B: right-hand sides [n, k].
        precondition: optional R [n, k] -> M^{-1} R, with M symmetric positive definite.
        callback: called after every iteration with (iteration, largest relative residual).
        curvature: what A is built from, "hessian" or "ggn", for the remedy an indefinite A gets.
        rounding: the relative curvature a direction of zero curvature reads in the products'
            precision (:func:`product_rounding`).
    """
    B = B.to(torch.float64)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = precondition(R) if precondition is not None else R
    Pdir = Z.clone()
    rz = (R * Z).sum(0)
    b_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    active = R.norm(dim=0) / b_norm > tol
    iterations = 0
    while bool(active.any()) and iterations < maxiter:
        iterations += 1
        AP = matmat(Pdir)
        pap = (Pdir * AP).sum(0)
        bad = active & (pap <= 0)
        if bool(bad.any()):
            raise not_positive_definite(matmat, Pdir[:, bad], pap[bad], curvature, rounding)
        alpha = torch.where(active, rz / torch.where(active, pap, 1.0), 0.0)
        X += alpha * Pdir
        R -= alpha * AP
        active = active & (R.norm(dim=0) / b_norm > tol)
        Z = precondition(R) if precondition is not None else R
        rz_new = (R * Z).sum(0)
        beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
        Pdir = torch.where(active, Z + beta * Pdir, Pdir)
        rz = torch.where(active, rz_new, rz)
        if callback is not None:
            callback(iterations, float((R.norm(dim=0) / b_norm).max()))
    residuals = R.norm(dim=0) / b_norm
    return ConjugateGradientResult(X, iterations, residuals, residuals <= tol)


#: Block CG drops search directions whose singular value is below this fraction of the largest:
#: they are linearly dependent on the kept ones to working precision (duplicate, zero or
#: eigenvector right-hand sides, converged columns, a filled-up Krylov space).
BLOCK_RANK_TOL = 1e-10
#: A block whose singular values all lie within this factor of the largest is orthonormalised
#: from its Gram matrix (one pass, half the cost); otherwise by a thin QR and an SVD.
_GRAM_SAFE = 1e-4


def orthonormal_basis(W: Tensor, rank_tol: float = BLOCK_RANK_TOL) -> Tensor:
    """An orthonormal basis [n, s] of the numerically significant span of W's columns [n, m].

    Directions whose singular value is at most ``rank_tol`` times the largest are dropped (s < m
    when W is rank deficient; s = 0 when W is zero). A well-conditioned W is orthonormalised
    from the eigendecomposition of W^T W; otherwise a thin QR and the SVD of its triangular
    factor reveal the rank to working precision.
    """
    if W.shape[1] == 0:
        return W.new_zeros(W.shape[0], 0)
    mu, V = torch.linalg.eigh(W.T @ W)
    largest = float(mu[-1])
    if not largest > 0.0:  # W = 0 (or not finite)
        return W.new_zeros(W.shape[0], 0)
    if float(mu[0]) >= _GRAM_SAFE**2 * largest:
        return W @ (V / mu.sqrt())
    Q, T = torch.linalg.qr(W)
    U, sigma, _ = torch.linalg.svd(T)
    rank = int((sigma > rank_tol * sigma[0]).sum())
    return Q @ U[:, :rank]


def block_conjugate_gradients(
    matmat,
    B: Tensor,
    *,
    tol: float = 1e-10,
    maxiter: int = 500,
    precondition=None,
    rank_tol: float = BLOCK_RANK_TOL,
    callback: Callable[[int, float], None] | None = None,
    curvature: str = "hessian",
    rounding: float = ZERO_CURVATURE,
) -> ConjugateGradientResult:
    """Solve A X = B for symmetric positive definite A by breakdown-free block CG.

    All columns of B share one block Krylov space (O'Leary 1980, in the breakdown-free form of
    Ji & Li 2017): the search block P is an orthonormal basis of ``Z + P beta`` (Z = M^{-1} R,
    the preconditioned residuals), truncated to its numerical rank, and

        alpha = (P^T A P)^{-1} P^T R,   X += P alpha,   R -= A P alpha,
        beta = -(P^T A P)^{-1} (A P)^T Z.

    The space grows by up to k directions per iteration, so k right-hand sides need far fewer
    iterations than per-column CG (at most about n / k in exact arithmetic) for the same one
    ``matmat`` per iteration on at most k columns. Columns are scaled to unit norm, so residuals
    are relative residuals; the recursion stops when every column has
    ``||b - A x|| <= tol ||b||``. Converged columns keep their residuals in the block (removing
    them breaks the conjugacy of later blocks and slows the others); their directions, like
    those of duplicate, zero or eigenvector right-hand sides, vanish below ``rank_tol`` and are
    dropped by the rank truncation, never divided by, so the result never turns to NaN. A
    ``P^T A P`` that is not positive definite raises :class:`CurvatureError`.

    Args:
        matmat: X [n, s] -> A X [n, s].
        B: right-hand sides [n, k].
        tol: relative residual every column must reach.
        maxiter: cap on block iterations (one ``matmat`` each).
        precondition: optional R [n, k] -> M^{-1} R, with M symmetric positive definite.
        rank_tol: relative singular-value threshold of the rank truncation.
        callback: called after every iteration with (iteration, largest relative residual).
        curvature: what A is built from, "hessian" or "ggn", for the remedy an indefinite A gets.
        rounding: the relative curvature a direction of zero curvature reads in the products'
            precision (:func:`product_rounding`).
    """
    B = B.to(torch.float64)
    b_norm = B.norm(dim=0)
    scale = torch.where(b_norm > torch.finfo(B.dtype).tiny, b_norm, 1.0)
    R = B / scale  # unit columns (zero columns stay zero)
    X = torch.zeros_like(R)
    residuals = R.norm(dim=0)
    iterations = 0
    P = R.new_zeros(R.shape[0], 0)
    if bool((residuals > tol).any()):
        P = orthonormal_basis(precondition(R) if precondition is not None else R, rank_tol)
    while bool((residuals > tol).any()) and iterations < maxiter and P.shape[1] > 0:
        iterations += 1
        AP = matmat(P)
        PAP = P.T @ AP
        L, info = torch.linalg.cholesky_ex(0.5 * (PAP + PAP.T))
        if int(info) != 0:
            lowest, vectors = torch.linalg.eigh(0.5 * (PAP + PAP.T))
            raise not_positive_definite(matmat, P @ vectors[:, :1], lowest[:1], curvature, rounding)
        alpha = torch.cholesky_solve(P.T @ R, L)
        X += P @ alpha
        R -= AP @ alpha
        residuals = R.norm(dim=0)
        if callback is not None:
            callback(iterations, float(residuals.max()))
        if not bool((residuals > tol).any()):
            break
        Z = precondition(R) if precondition is not None else R
        beta = torch.cholesky_solve(AP.T @ Z, L)
        P = orthonormal_basis(Z - P @ beta, rank_tol)
    return ConjugateGradientResult(X * scale, iterations, residuals, residuals <= tol)


@dataclasses.dataclass(frozen=True)
class Extremes:
    """The smallest and largest Ritz values of a Lanczos run, each with its residual bound:
    an eigenvalue lies within ``low_residual`` of ``low`` (and of ``high`` likewise). A Ritz
    value is an inner bound (``low`` at least the smallest eigenvalue); where it has not
    converged, the smallest eigenvalue may lie further out than the residual says, but a
    residual that is not small says the run has not settled."""

    low: float
    high: float
    low_residual: float
    high_residual: float


def lanczos_extremes(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    *,
    steps: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Extremes:
    """The smallest and largest Ritz values of a symmetric operator after ``steps`` Lanczos
    steps (rows in, rows out) from a seeded random start, with their residual bounds
    ``beta_m |s_m|`` (:class:`Extremes`).

    No reorthogonalisation: three vectors are held whatever the size. Lost orthogonality only
    repeats converged Ritz values; well-separated extremes converge first, but an extreme inside
    a dense spectrum converges slowly, which its residual shows.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(size, generator=gen, dtype=dtype).to(device)
    q = q / q.norm()
    previous = torch.zeros_like(q)
    beta = 0.0
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(steps, size)):
        w = matmat(q[None])[0].to(dtype) - beta * previous
        alpha = float(w @ q)
        w = w - alpha * q
        alphas.append(alpha)
        beta = float(w.norm())
        if not math.isfinite(beta) or beta <= 1e-12 * max(abs(a) for a in alphas):
            beta = 0.0  # an invariant subspace: its Ritz values are eigenvalues
            break
        betas.append(beta)
        previous, q = q, w / beta
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
    tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    last = vectors[-1].abs() * beta  # the residual of each Ritz pair
    return Extremes(float(values[0]), float(values[-1]), float(last[0]), float(last[-1]))


def power_iteration(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    *,
    iterations: int = 30,
    rtol: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> float:
    """Estimate of the largest |eigenvalue| of an operator by power iteration (rows in, rows out).

    For a symmetric operator, or one similar to a symmetric positive definite one (such as a
    preconditioned ``P^{-1} A``), the growth ratio converges to the largest eigenvalue.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, size, generator=gen, dtype=dtype).to(device)
    x = x / x.norm()
    estimate = 0.0
    for _ in range(iterations):
        y = matmat(x)
        new = float(y.norm())
        if new == 0.0 or not math.isfinite(new):
            return new
        x = y / new
        if abs(new - estimate) <= rtol * new:
            return new
        estimate = new
    return estimate
