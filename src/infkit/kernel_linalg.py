"""Linear algebra in N*C space: the dual system ``B_R K_RR + mu I`` of the kernel method.

With the empirical NTK ``K = J J^T`` (N*C x N*C) and ``B = blockdiag(Lambda_i) / N``, every
GGN-based influence quantity reduces to solves with ``A = B_R K_RR + mu I`` on the retained
examples R (docs/methods/dual.md §3-§4). :class:`KernelSystem` factorises A once and applies
``A^{-1}`` and ``A^{-T}`` to blocks of vectors, and gives the C x C leverage blocks
``M_j = [K_RR A^{-1}]_jj``. Two forms:

* ``"push-through"``: an LU factorisation of the (non-symmetric) ``B K + mu I``;
* ``"woodbury"``: the symmetric positive definite ``S = mu I + L^T K L`` (``Lambda = L L^T``
  blockwise), by Cholesky (``solver="direct"``) or by conjugate gradients (``solver="cg"``, the
  shared block CG of :mod:`infkit.linalg`, no cubic factorisation).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from infkit.errors import CurvatureError, warn
from infkit.linalg import block_conjugate_gradients, conjugate_gradients

Form = Literal["push-through", "woodbury"]
Solver = Literal["direct", "cg"]


def _blocks_apply(blocks: Tensor, Y: Tensor, transpose: bool = False) -> Tensor:
    """blockdiag(blocks) @ Y for blocks [n, C, C] and Y [n*C, k]."""
    n, c, _ = blocks.shape
    b = blocks.transpose(1, 2) if transpose else blocks
    return (b @ Y.reshape(n, c, -1)).reshape(n * c, -1)


def _diag_blocks(X: Tensor, c: int) -> Tensor:
    """The C x C diagonal blocks [k, C, C] of a [k*C, k*C] matrix."""
    k = X.shape[0] // c
    return torch.diagonal(X.reshape(k, c, k, c), dim1=0, dim2=2).permute(2, 0, 1)


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
        form: Form = "push-through",
        solver: Solver = "direct",
        tol: float = 1e-12,
        maxiter: int | None = None,
    ) -> None:
        self.K = K
        self.c = lam.shape[1]
        self.n = lam.shape[0] if retained is None else len(retained)
        self.m = self.n * self.c
        self.n_total = n_total
        self.mu = float(mu)
        if solver == "cg" and form == "push-through":
            raise CurvatureError("solver='cg' works on the symmetric (woodbury) form only")
        self.form = form
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

        solve = block_conjugate_gradients if Y.shape[1] >= 2 else conjugate_gradients
        result = solve(matvec, Y, tol=self.tol, maxiter=self.maxiter)
        if not bool(result.converged.all()):
            warn(
                f"conjugate gradients on the dual system stopped after {result.iterations} "
                f"iterations with a relative residual of {float(result.residuals.max()):.1e} "
                f"(asked {self.tol:.0e}); raise maxiter or use solver='direct'",
                UserWarning,
            )
        return result.X

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
