"""method="dual": influence in N*C space through the empirical NTK (methods.md §1, §2.3, §5).

Every GGN-based influence quantity has a kernel form (the push-through identity
``(J^T B J + mu I)^{-1} J^T = J^T (B K + mu I)^{-1}``, B = Lambda/N, K = J J^T), so the cost grows
with the data (N examples x C outputs), not with the parameter count P. The answers equal the
primal GGN answers of ``method="exact"`` (same objective, same estimator) to rounding whenever J
and Lambda are evaluated at the same point; no P x P or N x P object is ever formed.

Conventions (the core's, methods.md §0): the model was trained on
``L = mean_i l_i + (l2/2)||theta - theta'||^2`` (anchor theta' = 0 by default), the attributed
training gradient is ``v_j = grad l_j + l2 (theta* - theta')`` and every answer is a removal effect
with 1/N included. The regulariser term is carried exactly through the representer split

    theta* - theta' = J^T alpha* + r,     alpha* = -g / (l2 N)   (g stacks g_i = dl_i/df),

where r = grad L(theta*) / l2 vanishes at an exact optimum (methods.md §1.2). r is computed (one
VJP) when J is taken at theta*, so the dual stays equal to the primal at a loose optimum; with
``linearize_at`` the representer is assumed (r = 0), as in the paper. Any vector
``J^T e + s r`` then maps through the inverse retained curvature
``H_R = (1/N) sum_{i in R} J_i^T Lambda_i J_i + mu I`` as

    H_R^{-1}(J^T e + s r) = J^T Delta-alpha + (s/mu) r,
    Delta-alpha_F = e_F / mu,
    (B_R K_RR + mu I) Delta-alpha_R = e_R - B_R (K_RF e_F + s (J r)_R) / mu,

which is the push-through form for the plain IF (R = all, mu = l2 + damping) and the simplified
dual Newton system of §1.4 for group removal (R = retained set, mu = (N_R/N) l2 + damping;
``Delta-alpha_F = -alpha*_F``). RIF and the per-example Newton step downdate one example's own
curvature with its C x C leverage block ``M_j = J_j G^{-1} J_j^T = [K (B K + mu I)^{-1}]_jj``.
Parameters come back by one VJP (``Delta theta = J^T Delta alpha``), outputs as
``K(X_t, X) Delta alpha``.

Solvers: ``form="push-through"`` (default) factorises ``B K + mu I`` (LU); ``form="woodbury"``
uses the symmetric positive definite ``mu I + L^T K L`` (Lambda = L L^T blockwise) with a
Cholesky factorisation, or conjugate gradients with ``solver="cg"`` (no cubic factorisation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import CurvatureError, InvalidInputError, ProblemTooLargeError, UnsupportedError
from infkit.estimators import MAX_LEVERAGE
from infkit.methods import register
from infkit.methods.base import DirectMethod, FitContext
from infkit.ntk import (
    TangentModel,
    column_features,
    kernel_matrix,
    kernel_rows,
    scalable_alternatives,
)
from infkit.parameters import human_bytes

FORMS = ("push-through", "woodbury")
SOLVERS = ("direct", "cg")
#: bytes of one float64 (the working dtype of the kernel algebra)
F64 = 8


def _blocks_apply(blocks: Tensor, Y: Tensor, transpose: bool = False) -> Tensor:
    """blockdiag(blocks) @ Y for blocks [n, C, C] and Y [n*C, k]."""
    n, c, _ = blocks.shape
    b = blocks.transpose(1, 2) if transpose else blocks
    return (b @ Y.reshape(n, c, -1)).reshape(n * c, -1)


def _diag_blocks(X: Tensor, c: int) -> Tensor:
    """The C x C diagonal blocks [k, C, C] of a [k*C, k*C] matrix."""
    k = X.shape[0] // c
    return torch.diagonal(X.reshape(k, c, k, c), dim1=0, dim2=2).permute(2, 0, 1)


def batched_cg(matvec, B: Tensor, *, tol: float, maxiter: int, what: str = "dual system") -> Tensor:
    """Solve A X = B column by column (A symmetric positive definite) by conjugate gradients.

    Stops when every column's residual is below ``tol`` times its right-hand side's norm.
    """
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    target = (tol * B.norm(dim=0)) ** 2
    for _ in range(maxiter):
        if bool((rs <= target).all()):
            return X
        AP = matvec(P)
        denom = (P * AP).sum(0)
        alpha = torch.where(denom > 0, rs / torch.where(denom > 0, denom, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(0)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        P = R + beta * P
        rs = rs_new
    if not bool((rs <= target).all()):
        worst = float((rs / target.clamp_min(1e-300)).max().sqrt()) * tol
        warnings.warn(
            f"conjugate gradients on the {what} stopped after {maxiter} iterations with a "
            f"relative residual of {worst:.1e} (asked {tol:.0e}); raise cg_maxiter or use "
            "solver='direct'",
            UserWarning,
            stacklevel=3,
        )
    return X


class KernelSystem:
    """``A = B_R K_RR + mu I`` on the retained examples R, with B = blockdiag(Lambda_i) / N.

    Applies A^{-1} and A^{-T} to blocks of vectors and gives the leverage blocks
    ``M_j = [K_RR A^{-1}]_jj``. ``K`` is the full N*C Gram matrix; R is given by example indices
    (None: every example).
    """

    def __init__(
        self,
        K: Tensor,
        lam: Tensor,
        n_total: int,
        mu: float,
        retained: Tensor | None = None,
        *,
        form: str = "push-through",
        solver: str = "direct",
        tol: float = 1e-12,
        maxiter: int | None = None,
    ) -> None:
        self.K = K
        self.c = lam.shape[1]
        self.n = lam.shape[0] if retained is None else len(retained)
        self.m = self.n * self.c
        self.n_total = n_total
        self.mu = float(mu)
        self.form = "woodbury" if solver == "cg" else form
        self.solver = solver
        self.tol = tol
        self.maxiter = maxiter or max(10 * self.m, 100)
        if retained is None:
            self.rows = None
            self.lam = lam
        else:
            self.rows = (retained.unsqueeze(1) * self.c + torch.arange(self.c)).reshape(-1)
            self.lam = lam[retained]
        if self.mu <= 0:
            raise CurvatureError(
                f"the dual system has ridge mu = {self.mu:.3e} <= 0, so the curvature is "
                "singular in the directions the data does not reach (P > N*C); pass l2 > 0 "
                "(the model's own) or damping > 0"
            )
        if self.form == "push-through":
            A = self._retained_kernel()
            self._rows_apply(A, self.lam, scale=1.0 / n_total)  # B_R K_RR, in place
            A.diagonal().add_(self.mu)
            self.LU, self.pivots = torch.linalg.lu_factor(A)
            del A
        else:
            evals, evecs = torch.linalg.eigh(0.5 * (self.lam + self.lam.transpose(1, 2)))
            self.L = evecs * evals.clamp_min(0).sqrt().unsqueeze(1) / n_total**0.5
            if solver == "direct":
                S = self._retained_kernel()
                self._rows_apply(S, self.L.transpose(1, 2))  # L^T K, in place
                self._cols_apply(S, self.L)  # (L^T K) L, in place
                S.diagonal().add_(self.mu)
                # Cholesky reads the lower triangle only: no explicit symmetrisation needed
                chol, info = torch.linalg.cholesky_ex(S)
                del S
                if int(info) != 0:
                    raise CurvatureError(
                        "the symmetric dual system mu I + L^T K L is not positive definite "
                        "numerically; use form='push-through' or increase damping"
                    )
                self.chol = chol

    def _chunk(self) -> int:
        return max(1, (1 << 24) // max(self.m * self.c, 1))

    def _rows_apply(self, X: Tensor, blocks: Tensor, scale: float = 1.0) -> None:
        """X <- blockdiag(blocks) X * scale, in place, a few example rows at a time."""
        c, step = self.c, self._chunk()
        for a in range(0, self.n, step):
            b = min(a + step, self.n)
            rows = X[a * c : b * c].reshape(b - a, c, -1)
            X[a * c : b * c] = (blocks[a:b] @ rows).reshape((b - a) * c, -1) * scale

    def _cols_apply(self, X: Tensor, blocks: Tensor) -> None:
        """X <- X blockdiag(blocks), in place, a few example columns at a time."""
        c, step = self.c, self._chunk()
        for a in range(0, self.n, step):
            b = min(a + step, self.n)
            cols = X[:, a * c : b * c].reshape(X.shape[0], b - a, c)
            X[:, a * c : b * c] = torch.einsum("mkc,kcd->mkd", cols, blocks[a:b]).reshape(
                X.shape[0], -1
            )

    # ------------------------------------------------------------------ pieces
    def _retained_kernel(self) -> Tensor:
        if self.rows is None:
            return self.K.clone()
        out = torch.empty(self.m, self.m, dtype=self.K.dtype, device=self.K.device)
        step = max(1, (1 << 24) // max(self.K.shape[0], 1))
        for a in range(0, self.m, step):
            out[a : a + step] = self.K[self.rows[a : a + step]][:, self.rows]
        return out

    def kmul(self, Y: Tensor) -> Tensor:
        """K_RR @ Y for Y [m_R, k]."""
        if self.rows is None:
            return self.K @ Y
        full = torch.zeros(self.K.shape[0], Y.shape[1], dtype=Y.dtype, device=Y.device)
        full[self.rows] = Y
        return (self.K @ full)[self.rows]

    def bmul(self, Y: Tensor) -> Tensor:
        """B_R @ Y."""
        return _blocks_apply(self.lam, Y) / self.n_total

    def _s_inv(self, Y: Tensor) -> Tensor:
        if self.solver == "direct":
            return torch.cholesky_solve(Y, self.chol)

        def matvec(X: Tensor) -> Tensor:
            return self.mu * X + _blocks_apply(
                self.L, self.kmul(_blocks_apply(self.L, X)), transpose=True
            )

        return batched_cg(matvec, Y, tol=self.tol, maxiter=self.maxiter)

    # ------------------------------------------------------------------ solves
    def solve(self, Y: Tensor) -> Tensor:
        """A^{-1} Y for Y [m_R, k] (or [m_R])."""
        vec = Y.dim() == 1
        Y = Y.reshape(self.m, -1)
        if self.form == "push-through":
            X = torch.linalg.lu_solve(self.LU, self.pivots, Y)
        else:
            inner = self._s_inv(_blocks_apply(self.L, self.kmul(Y), transpose=True))
            X = (Y - _blocks_apply(self.L, inner)) / self.mu
        return X.reshape(-1) if vec else X

    def solve_t(self, Y: Tensor) -> Tensor:
        """A^{-T} Y = (K_RR B_R + mu I)^{-1} Y."""
        vec = Y.dim() == 1
        Y = Y.reshape(self.m, -1)
        if self.form == "push-through":
            X = torch.linalg.lu_solve(self.LU, self.pivots, Y, adjoint=True)
        else:
            inner = self._s_inv(_blocks_apply(self.L, Y, transpose=True))
            X = (Y - self.kmul(_blocks_apply(self.L, inner))) / self.mu
        return X.reshape(-1) if vec else X

    def leverage_blocks(self, local: Tensor | None = None, chunk: int | None = None) -> Tensor:
        """M_j = J_j (H_R)^{-1} J_j^T = [K_RR A^{-1}]_jj for local indices (default all), [k, C, C]."""
        local = torch.arange(self.n) if local is None else local
        c = self.c
        chunk = chunk or max(1, min(len(local), (1 << 25) // max(self.m * c, 1)))
        out = []
        for a in range(0, len(local), chunk):
            sel = local[a : a + chunk]
            cols = (sel.unsqueeze(1) * c + torch.arange(c)).reshape(-1)
            Kc = self._columns(cols)  # K_RR[:, cols]
            Kcc = _diag_blocks(Kc[cols], c)
            if self.form == "push-through":
                X = torch.linalg.lu_solve(self.LU, self.pivots, Kc, adjoint=True)  # A^{-T} K e_j
                M = _diag_blocks(X[cols], c)
            else:
                W = _blocks_apply(self.L, Kc, transpose=True)  # L^T K[:, cols]
                if self.solver == "direct":
                    Z = torch.linalg.solve_triangular(self.chol, W, upper=False)
                    quad = torch.einsum("mkc,mkd->kcd", *(Z.reshape(self.m, -1, c),) * 2)
                else:
                    V = self._s_inv(W)
                    quad = torch.einsum(
                        "mkc,mkd->kcd", W.reshape(self.m, -1, c), V.reshape(self.m, -1, c)
                    )
                M = (Kcc - quad) / self.mu
            out.append(0.5 * (M + M.transpose(1, 2)))
        return torch.cat(out)

    def _columns(self, cols: Tensor) -> Tensor:
        if self.rows is None:
            return self.K[:, cols]
        return self.K[:, self.rows[cols]][self.rows]


@dataclass
class DualRemoval:
    """A removal in dual coordinates: ``Delta theta = J^T delta_alpha + residual_coef * r``.

    Attributes:
        indices: the removed training examples; estimator: how the change was estimated.
        delta_alpha: [N, C] change of the dual variables (removed rows: -alpha*_F for newton).
        residual_coef: coefficient of the representer residual r (0 when r is not used).
    """

    indices: Tensor
    estimator: str
    delta_alpha: Tensor
    residual_coef: float


@dataclass
class _PerExample:
    """What scores and self-scores need for one estimator (methods.md §1.6, §2.3)."""

    system: KernelSystem
    z0: Tensor  # [m] common part of Delta alpha_j
    c_r: float  # coefficient of r in Delta theta_j
    gamma: Tensor | None = None  # [N, C] example-specific coefficients
    leverage: Tensor | None = None  # [N, C, C]


@register
class Dual(DirectMethod):
    """Kernel-trick (empirical NTK) influence: exact GGN answers at a cost set by N*C, not P.

    Args:
        linearize_at: evaluate J (and the NTK) at these parameters instead of theta* (flat [P]
            tensor or dict): the linearised setting of methods.md §1.2. For a model made by
            :func:`infkit.linearize` the Jacobian is the same everywhere and this is not needed.
        anchor: the regulariser anchor theta' the model was trained with: None (0, the core
            convention), ``"init"`` (``linearize_at``, or a linearised model's expansion point)
            or a flat [P] tensor. The facade's stationarity check assumes 0.
        form: ``"push-through"`` (LU of B K + mu I) or ``"woodbury"`` (Cholesky of the symmetric
            mu I + L^T K L).
        solver: ``"direct"`` or ``"cg"`` (conjugate gradients on the symmetric form).
        cg_tol, cg_maxiter: CG relative residual and iteration cap.
        ntk: NTK strategy, ``"auto"``, ``"structured"``, ``"jacobian"`` or ``"jvp"``.
        representer_residual: carry r = theta* - theta' - J^T alpha* (None: yes when J is at
            theta*, no with ``linearize_at``, where the paper assumes the representer).
        batch_size: examples per batch for the kernel and the tangent products.
    """

    name = "dual"
    estimators = ("if", "rif", "newton")
    summary = "empirical NTK (kernel trick) in N*C space; equals exact GGN; for P >> N*C"
    scales = True
    curvature = "ggn"

    def __init__(
        self,
        linearize_at: Tensor | dict[str, Tensor] | None = None,
        anchor: str | Tensor | None = None,
        form: str = "push-through",
        solver: str = "direct",
        cg_tol: float = 1e-10,
        cg_maxiter: int | None = None,
        ntk: str = "auto",
        representer_residual: bool | None = None,
        batch_size: int = 256,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise UnsupportedError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
        if solver not in SOLVERS:
            raise UnsupportedError(f"unknown solver {solver!r}; valid solvers: {SOLVERS}")
        if isinstance(anchor, str) and anchor not in ("init", "zero"):
            raise UnsupportedError(
                f"anchor must be None, 'zero', 'init' or a tensor, not {anchor!r}"
            )
        self.linearize_at = linearize_at
        self.anchor = None if anchor == "zero" else anchor
        self.form = form
        self.solver = solver
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter
        self.ntk = ntk
        self.representer_residual = representer_residual
        self.batch_size = batch_size
        self.dtype = dtype
        self._systems: dict[float, KernelSystem] = {}
        self._per_example: dict[str, _PerExample] = {}

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        # K, one factorised system (or a retained one) and a working copy, float64
        m = n * c
        return 3 * m * m * F64

    # ------------------------------------------------------------------ fit
    def fit(self, context: FitContext) -> None:
        self.context = context
        self._systems.clear()
        self._per_example.clear()
        space, train, n = context.space, context.train, context.n
        self.tm = TangentModel(
            context.task, space, at=self.linearize_at, dtype=self.dtype, strategy=self.ntk
        )
        gs, lams = [], []
        for batch in train.batches(self.batch_size):
            _, g, lam = self.tm.output_derivatives(batch)
            gs.append(g)
            lams.append(lam)
        self.g = torch.cat(gs)  # [N, C]
        self.lam = torch.cat(lams)  # [N, C, C]
        self.lam = 0.5 * (self.lam + self.lam.transpose(1, 2))
        c = self.g.shape[1]
        self.c, self.n, self.m = c, n, n * c
        need = self.memory_estimate(n, space.size, c)
        if need > context.memory_limit:
            raise ProblemTooLargeError(
                f"method='dual' works with the {self.m:,} x {self.m:,} empirical NTK (N*C = "
                f"{n:,} x {c}), which with its factorisation needs {human_bytes(need)}, above the "
                f"memory limit of {human_bytes(context.memory_limit)}. Its memory grows as "
                f"(N*C)^2: use a method that scales with N instead: {scalable_alternatives()}; "
                "or attribute a subset of the training data, or raise memory_limit."
            )
        self.l2, self.damping = context.l2, context.damping
        self.ridge = self.l2 + self.damping
        if self.ridge <= 0:
            raise CurvatureError(
                "method='dual' needs l2 + damping > 0: with P > N*C the Gauss-Newton curvature "
                "is singular. Pass the model's l2, or damping > 0"
            )
        theta = space.flat().to(self.tm.device, self.dtype)
        anchor = self._anchor_vector(space)
        self._train_features = column_features(
            self.tm, train, self.batch_size, context.memory_limit // 8
        )
        self.K = kernel_matrix(
            self.tm,
            train,
            batch_size=self.batch_size,
            memory_limit=context.memory_limit,
            col_features=self._train_features,
            progress=context.progress,
        )
        self.alpha = -self.g / (self.l2 * n) if self.l2 > 0 else torch.zeros_like(self.g)  # [N, C]
        use_r = self.representer_residual
        if use_r is None:
            use_r = self.linearize_at is None
        self.r: Tensor | None = None
        self.Jr: Tensor | None = None
        if use_r and self.l2 > 0:
            r = theta - anchor - self.jt(self.alpha)
            if float(r.abs().max()) > 0:
                self.r = r
                self.Jr = self.jmul(r)  # [N, C]
        self.residual_norm = 0.0 if self.r is None else float(self.r.norm())
        self.representer_error = self.residual_norm / max(float((theta - anchor).norm()), 1e-300)

    def regulariser_anchor(self) -> Tensor | None:
        anchor = self._anchor_vector(self.context.space)
        return anchor.to(torch.float64) if bool(anchor.any()) else None

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: str, which: str
    ) -> Tensor | None:
        """With ``linearize_at`` the answer lives at theta_0: K0(X_t, X) Delta alpha."""
        if self.linearize_at is None or which not in ("outputs", "loss"):
            return None  # J(theta*) Delta theta is the same at theta*
        removal = self.removal(indices, estimator)
        if which == "outputs":
            return self.output_change(data, removal)
        return self.loss_change(data, removal)

    def _anchor_vector(self, space) -> Tensor:
        from infkit.linearize import LinearizedModel

        zeros = torch.zeros(space.size, dtype=self.dtype, device=self.tm.device)
        if self.anchor is None:
            return zeros
        if isinstance(self.anchor, str):  # "init"
            model = self.context.task.model
            if isinstance(model, LinearizedModel):
                if model.offset:
                    return zeros  # its parameters are theta - theta_0 already
                return torch.cat([t.reshape(-1) for t in model.params0().values()]).to(zeros)
            if self.linearize_at is None:
                raise InvalidInputError(
                    "anchor='init' needs linearize_at (the initial parameters) or a model made by "
                    "infkit.linearize"
                )
            at = self.linearize_at
            flat = at if isinstance(at, Tensor) else space.flatten({n: at[n] for n in space.names})
            return flat.reshape(-1).to(zeros)
        if isinstance(self.anchor, dict):
            return space.flatten({n: self.anchor[n] for n in space.names}).to(zeros)
        return self.anchor.reshape(-1).to(zeros)

    # ------------------------------------------------------------------ tangent maps
    def jt(self, U: Tensor) -> Tensor:
        """J^T U over the training set: [P] for U [N, C], or [k, P] for U [k, N, C]."""
        single = U.dim() == 2
        U = U.reshape(-1, self.n, self.c)
        out = torch.zeros(U.shape[0], self.tm.size, dtype=self.dtype, device=self.tm.device)
        for batch in self.context.train.batches(self.batch_size):
            out += self.tm.vjp(batch, U[:, batch.indices])
        return out[0] if single else out

    def jmul(self, W: Tensor) -> Tensor:
        """J W for W [P] ([N, C]) or [k, P] ([k, N, C]) over the training set."""
        single = W.dim() == 1
        W = W.reshape(-1, self.tm.size)
        parts = [self.tm.jvp(b, W) for b in self.context.train.batches(self.batch_size)]
        out = torch.cat(parts, dim=1)
        return out[0] if single else out

    # ------------------------------------------------------------------ systems
    def system(self, mu: float, retained: Tensor | None = None) -> KernelSystem:
        """The dual system for ridge mu on the retained examples (None: all).

        One full-set system is kept (with the per-example quantities built on it); asking for
        another ridge replaces it, so that at most K, one kept and one temporary (N*C)^2 factor
        exist at a time (``memory_estimate``).
        """
        if retained is None and mu in self._systems:
            return self._systems[mu]
        if retained is None and self._systems:
            self._systems.clear()
            self._per_example.clear()
        sys_ = KernelSystem(
            self.K,
            self.lam,
            self.n,
            mu,
            retained,
            form=self.form,
            solver=self.solver,
            tol=self.cg_tol,
            maxiter=self.cg_maxiter,
        )
        if retained is None:
            self._systems[mu] = sys_
        return sys_

    def _check_leverage(self, LM: Tensor, indices: Tensor) -> None:
        worst = torch.linalg.eigvals(LM).real.max(dim=1).values
        if bool((worst >= MAX_LEVERAGE).any()):
            k = int(worst.argmax())
            raise CurvatureError(
                f"training example {int(indices[k])} has leverage {float(worst[k]):.6f} >= 1: the "
                "model interpolates it, so removing it is not a small change and rif/newton are "
                "undefined. Increase l2 or damping"
            )

    def _residual_moved(
        self, system: KernelSystem, e: Tensor, s: float, mu: float
    ) -> tuple[Tensor, float]:
        """The flat right-hand side e - c_r B (J r) of a full-set dual solve, and c_r = s / mu.

        The l2 residual r (theta* = J^T alpha* + r) contributes s (J r) to the right-hand side;
        moving it over leaves c_r r in Delta theta (c_r = 0 when there is no residual).
        """
        rhs = e.reshape(-1)
        if self.r is None:
            return rhs, 0.0
        c_r = s / mu
        return rhs - c_r * system.bmul(self.Jr.reshape(-1, 1)).reshape(-1), c_r

    def _per_example_setup(self, estimator: str, leverage: bool) -> _PerExample:
        """The common part z0, the coefficients gamma_j and the leverage blocks of one estimator.

        Delta theta_j = J^T (A^{-1} E_j gamma_j + z0) + c_r r for every example j.
        """
        key = estimator
        setup = self._per_example.get(key)
        ready = setup is not None and setup.gamma is not None
        if ready and (setup.leverage is not None or not leverage):
            return setup
        n, l2 = self.n, self.l2
        if setup is None:
            if estimator in ("if", "rif"):
                mu, s = self.ridge, l2 / n
                e0 = (l2 / n) * self.alpha
            else:  # newton: the retained objective without j (its curvature and l2 share)
                mu, s = self.ridge - l2 / n, l2 / n - l2
                e0 = -self.g / n + (l2 / n - l2) * self.alpha
            system = self.system(mu)
            rhs, c_r = self._residual_moved(system, e0, s, mu)
            setup = _PerExample(system=system, z0=system.solve(rhs), c_r=c_r)
            if estimator == "if":
                setup.gamma = self.g / n
            self._per_example[key] = setup
        if leverage and setup.leverage is None:
            setup.leverage = setup.system.leverage_blocks()
        if setup.gamma is None:
            M = setup.leverage
            gamma0 = self.g / n
            q = (M @ gamma0.unsqueeze(-1)).squeeze(-1) + (self.K @ setup.z0).reshape(n, self.c)
            if self.r is not None:
                q = q + setup.c_r * self.Jr
            setup.gamma = gamma0 + self._downdate(M, q, torch.arange(n))
        return setup

    def _downdate(self, M: Tensor, q: Tensor, indices: Tensor) -> Tensor:
        """(I - Lambda_j M_j / N)^{-1} (Lambda_j / N) q_j for each j: [k, C]."""
        lam = self.lam[indices]
        LM = lam @ M / self.n
        self._check_leverage(LM, indices)
        eye = torch.eye(self.c, dtype=M.dtype, device=M.device).expand_as(LM)
        rhs = (lam @ q.unsqueeze(-1)) / self.n
        return torch.linalg.solve(eye - LM, rhs).squeeze(-1)

    # ------------------------------------------------------------------ facade hooks
    def scores(self, state, test: ExampleSet, estimator: str, relatif: str) -> Tensor:
        self._check(estimator)
        setup = self._per_example_setup(estimator, leverage=estimator != "if")
        n, c, m = self.n, self.c, self.m
        S = torch.empty(len(test), n, dtype=torch.float64)
        per_query = c * m * F64 * 3
        chunk = max(1, min(len(test), self.context.memory_limit // 8 // per_query))
        for batch in test.batches(chunk):
            t = len(batch)
            Ktx = self._kernel_to_train(batch)  # [t*C, m]
            h = self.tm.measurement_gradients(batch)  # [t, C]
            W = torch.einsum("tc,tcm->tm", h, Ktx.reshape(t, c, m))
            del Ktx
            U = setup.system.solve_t(W.T)  # [m, t]
            block = torch.einsum("nct,nc->tn", U.reshape(n, c, t), setup.gamma)
            const = W @ setup.z0
            if self.r is not None:
                const = const + setup.c_r * (h * self.tm.jvp(batch, self.r)).sum(1)
            S[batch.indices] = (block + const.unsqueeze(1)).cpu().to(torch.float64)
        return S

    def self_scores(self, state, estimator: str, relatif: str) -> Tensor:
        self._check(estimator)
        setup = self._per_example_setup(estimator, leverage=True)
        n, c = self.n, self.c
        own = (setup.leverage @ setup.gamma.unsqueeze(-1)).squeeze(-1)
        own = own + (self.K @ setup.z0).reshape(n, c)
        if self.r is not None:
            own = own + setup.c_r * self.Jr
        return (self.g * own).sum(1).cpu().to(torch.float64)

    def group_delta(self, state, indices: Tensor, estimator: str) -> Tensor:
        removal = self.removal(indices, estimator)
        return self.params(removal).cpu().to(torch.float64)

    # ------------------------------------------------------------------ dual answers
    def removal(self, indices: Tensor, estimator: str = "newton") -> DualRemoval:
        """Delta alpha for removing ``indices`` jointly (the dual form of ``remove``)."""
        self._check(estimator)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n, c, l2 = self.n, self.c, self.l2
        n_f = len(idx)
        if estimator == "if":
            mu, s = self.ridge, n_f * l2 / n
            e = (n_f * l2 / n) * self.alpha.clone()
            e[idx] += self.g[idx] / n
            system = self.system(mu)
            rhs, c_r = self._residual_moved(system, e, s, mu)
            delta = system.solve(rhs).reshape(n, c)
            return DualRemoval(idx, estimator, delta, c_r)
        if estimator == "rif":
            setup = self._per_example_setup("if", leverage=False)
            system = setup.system
            M = system.leverage_blocks(idx)
            gamma0 = self.g[idx] / n
            q = (M @ gamma0.unsqueeze(-1)).squeeze(-1)
            q = q + (self.K @ setup.z0).reshape(n, c)[idx]
            if self.r is not None:
                q = q + setup.c_r * self.Jr[idx]
            gamma = gamma0 + self._downdate(M, q, idx)
            E = torch.zeros(n, c, dtype=self.dtype, device=self.K.device)
            E[idx] = gamma
            delta = system.solve(E.reshape(-1)).reshape(n, c) + n_f * setup.z0.reshape(n, c)
            return DualRemoval(idx, estimator, delta, n_f * setup.c_r)
        # newton: one Newton step on the retained objective (methods.md §1.4)
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        retained = keep.nonzero().squeeze(1)
        n_r = len(retained)
        mu = (n_r / n) * l2 + self.damping
        s = -(n_r / n) * l2
        e = -(n_r / n) * l2 * self.alpha.clone()
        e[retained] -= self.g[retained] / n
        c_r = s / mu if self.r is not None else 0.0
        delta = torch.zeros(n, c, dtype=self.dtype, device=self.K.device)
        delta[idx] = e[idx] / mu
        system = self.system(mu, retained)
        # right-hand side: e_R - B_R (K_RF e_F + s (J r)_R) / mu
        e_forget = torch.zeros_like(e)
        e_forget[idx] = e[idx]
        coupling = (self.K @ e_forget.reshape(-1)).reshape(n, c)[retained].reshape(-1)  # K_RF e_F
        if self.r is not None:
            coupling = coupling + s * self.Jr[retained].reshape(-1)
        rhs = e[retained].reshape(-1) - system.bmul(coupling.unsqueeze(1)).reshape(-1) / mu
        delta[retained] = system.solve(rhs).reshape(n_r, c)
        return DualRemoval(idx, estimator, delta, c_r)

    def params(self, removal: DualRemoval) -> Tensor:
        """Delta theta [P] = J^T Delta alpha (+ the residual term): one VJP over the data."""
        out = self.jt(removal.delta_alpha)
        if self.r is not None and removal.residual_coef:
            out = out + removal.residual_coef * self.r
        return out

    def _kernel_to_train(self, batch: Batch) -> Tensor:
        """K(X_batch, X) [B*C, N*C]: the kernel between a batch and the training set."""
        return kernel_rows(
            self.tm,
            batch,
            self.context.train,
            batch_size=self.batch_size,
            col_features=self._train_features,
        )

    def output_change(self, data: Any, removal: DualRemoval) -> Tensor:
        """Delta f = K(X_t, X) Delta alpha (+ residual term), [n, C], at the J point."""
        examples = data if isinstance(data, ExampleSet) else ExampleSet(data, name="data")
        parts = []
        for batch in examples.batches(self.batch_size):
            Ktx = self._kernel_to_train(batch)
            df = (Ktx @ removal.delta_alpha.reshape(-1)).reshape(len(batch), self.c)
            if self.r is not None and removal.residual_coef:
                df = df + removal.residual_coef * self.tm.jvp(batch, self.r)
            parts.append(df)
        return torch.cat(parts)

    def loss_change(self, data: Any, removal: DualRemoval, reg_share: bool = False) -> Tensor:
        """First-order change of the per-example loss g_t^T Delta f_t, [n] (methods.md §1.5).

        With ``reg_share`` the regulariser's share ``l2 (theta* - theta')^T Delta theta`` (the
        same for every point) is added, as the paper's code does.
        """
        examples = data if isinstance(data, ExampleSet) else ExampleSet(data, name="data")
        df = self.output_change(examples, removal)
        g = torch.cat([self.tm.output_derivatives(b)[1] for b in examples.batches(self.batch_size)])
        out = (g * df).sum(1)
        if reg_share and self.l2 > 0:
            da = removal.delta_alpha.reshape(-1)
            a = self.alpha.reshape(-1)
            reg = a @ (self.K @ da)
            if self.r is not None:
                jr = self.Jr.reshape(-1)
                reg = reg + jr @ da + removal.residual_coef * (a @ jr + self.r @ self.r)
            out = out + self.l2 * reg
        return out

    # ------------------------------------------------------------------ generic solves
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """(G + shift I)^{-1} V through the kernel: (1/mu)[V - J^T A^{-1} B J V], V [k, P]."""
        mu = self.ridge + shift
        V = V.to(self.tm.device, self.dtype).reshape(-1, self.tm.size)
        system = self.system(mu)
        JV = self.jmul(V)  # [k, N, C]
        Y = JV.reshape(V.shape[0], -1).T
        X = system.solve(system.bmul(Y))  # [m, k]
        back = self.jt(X.T.reshape(V.shape[0], self.n, self.c))
        return (V - back) / mu

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        """H_R^{-1} V with H_R the retained curvature (drops the group's data and l2 share)."""
        idx = torch.as_tensor(group, dtype=torch.long).reshape(-1)
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[idx] = False
        retained = keep.nonzero().squeeze(1)
        mu = len(retained) / self.n * self.l2 + self.damping
        V = V.to(self.tm.device, self.dtype).reshape(-1, self.tm.size)
        k = V.shape[0]
        system = self.system(mu, retained)
        JV = self.jmul(V)[:, retained]  # [k, N_R, C]
        X = system.solve(system.bmul(JV.reshape(k, -1).T))
        U = torch.zeros(k, self.n, self.c, dtype=self.dtype, device=self.tm.device)
        U[:, retained] = X.T.reshape(k, len(retained), self.c)
        return (V - self.jt(U)) / mu

    # ------------------------------------------------------------------ misc
    def _check(self, estimator: str) -> None:
        if estimator not in self.estimators:
            raise UnsupportedError(
                f"method 'dual' cannot compute estimator {estimator!r}; it supports "
                f"{', '.join(self.estimators)}"
            )

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(
            {
                "form": self.form,
                "solver": self.solver,
                "ntk": self.ntk,
                "linearized": self.linearize_at is not None,
                "anchor": "0" if self.anchor is None else str(self.anchor)[:20],
                "n_c": getattr(self, "m", None),
                "representer_error": getattr(self, "representer_error", None),
            }
        )
        return out
