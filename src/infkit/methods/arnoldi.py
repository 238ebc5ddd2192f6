"""method="arnoldi": top-p Ritz subspace of the curvature (Schioppa et al. 2022; methods.md §6.2).

A block Lanczos iteration (the symmetric form of Arnoldi; ``block=1`` is the paper's single-vector
iteration) builds an orthonormal Krylov basis
Q (n vectors, fully re-orthogonalised) from curvature-vector products over the training data,
forms the projected curvature ``T = Q^T H Q`` exactly (every basis vector's product is computed)
and keeps the p Ritz pairs ``(lambda_k, u_k)`` of largest eigenvalue ("distillation"). Then

    solve(V) = U diag(1 / (lambda_k + ridge)) U^T V,     ridge = l2 + damping + shift,

the paper's *projected* inverse: the complement of the top-p subspace is dropped
(``complement="drop"``, default), so influence is measured only through the p highest-curvature
directions. This is a strongly truncated IF and can disagree with the full damped inverse, which
is dominated by low-curvature directions. ``complement="ridge"`` instead treats the complement as
curvature-free, adding ``(I - U U^T) V / ridge``; with p = P (the full Krylov space) either choice
equals ``method="exact"``.

Each example becomes a p-dimensional embedding ``Gamma v`` with
``Gamma = diag(lambda + ridge)^{-1/2} U^T``, so that (with the complement dropped) influence is a
dot product of embeddings: ``scores[t, j] = (1/N) <Gamma grad m_t, Gamma v_j>``.
:meth:`Arnoldi.embed` maps gradients, :meth:`Arnoldi.embeddings` returns (and keeps) the training
embeddings of ``v_j = grad l_j + l2 theta``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infkit.blocks import block_diagonal, layer_slices
from infkit.curvature import KINDS, CurvatureOperator
from infkit.data import ExampleSet
from infkit.errors import CurvatureError, InvalidInputError, ProblemTooLargeError, UnsupportedError
from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature
from infkit.parameters import human_bytes

COMPLEMENTS = ("drop", "ridge")
BLOCKS = (None, "layer")


def lanczos(matmat, size: int, steps: int, *, block: int = 1, seed: int = 0, tol: float = 1e-10):
    """Block Lanczos with full re-orthogonalisation: a Krylov basis and the projected operator.

    Args:
        matmat: X [k, size] -> A X [k, size] for a symmetric A.
        size: dimension of the space.
        steps: basis size n (capped at ``size``).
        block: vectors per product (1: plain Lanczos).
        tol: a new direction whose norm falls below ``tol`` times the operator scale is an
            invariant subspace (breakdown); the basis is continued with a fresh random direction.

    Returns:
        Q [n, size] with orthonormal rows and T = Q A Q^T [n, n] (symmetric), in float64.
    """
    steps = min(steps, size)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.empty(0, size, dtype=torch.float64)
    T = torch.zeros(steps, steps, dtype=torch.float64)
    scale = 0.0

    def fresh(count: int) -> Tensor:
        return torch.randn(count, size, generator=gen, dtype=torch.float64)

    def orthonormal_rows(W: Tensor, count: int) -> Tensor:
        """Up to ``count`` orthonormal rows spanning W's part orthogonal to the basis."""
        rows = []
        for w in W:
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                if len(basis):
                    w = w - (basis @ w) @ basis
                if rows:
                    R = torch.stack(rows)
                    w = w - (R @ w) @ R
            norm = float(w.norm())
            if norm > tol * max(scale, 1.0):
                rows.append(w / norm)
            if len(rows) == count:
                break
        return torch.stack(rows) if rows else torch.empty(0, size, dtype=torch.float64)

    current = orthonormal_rows(fresh(block), block)
    while len(basis) < steps:
        need = min(block, steps - len(basis))
        current = current[:need]
        while len(current) < need:  # breakdown: continue in a random direction
            extra = orthonormal_rows(fresh(need - len(current)), need - len(current))
            if len(current):
                extra = extra - (extra @ current.T) @ current
            current = torch.cat([current, extra])
        start = len(basis)
        basis = torch.cat([basis, current])
        W = matmat(current).to(torch.float64)  # [b, size]
        scale = max(scale, float(W.norm(dim=1).max()))
        coeffs = basis @ W.T  # [start + b, b]
        end = start + len(current)
        T[:end, start:end] = coeffs
        T[start:end, :end] = coeffs.T
        if end < steps:
            current = orthonormal_rows(W - coeffs.T @ basis, need)
    return basis, 0.5 * (T + T.T)


@register
class Arnoldi(InverseCurvature):
    """Projected inverse on the top-p Ritz subspace of the GGN (or Hessian).

    Args:
        rank: p, the number of Ritz pairs kept (captum's ``projection_dim``, default 50).
        krylov_dim: n >= p, the Krylov basis size (captum's ``arnoldi_dim``, default 200); capped
            at P. With n = p = P the method is exact.
        complement: ``"drop"`` (default, as in the paper) or ``"ridge"`` (the complement of the
            top-p subspace is inverted as 1 / ridge).
        curvature: ``"ggn"`` (default) or ``"hessian"`` (Ritz values are then ranked by
            magnitude, and a kept value with lambda + ridge <= 0 raises CurvatureError).
        block: curvature-vector products per pass over the data (block Lanczos). 1 is the
            plain Lanczos of the paper; the default 8 makes krylov_dim / 8 passes over the data
            instead of krylov_dim, several times faster, with top Ritz pairs of the same quality
            in our benchmarks (benchmarks/results/matrix_free.md).
        blocks: ``None`` or ``"layer"`` (block-diagonal curvature, one block per tensor).
        seed: seeds the starting vectors.
    """

    name = "arnoldi"
    estimators = ("if", "relatif")
    summary = "top-p Ritz subspace of the GGN by Lanczos; projected inverse and p-dim embeddings"
    scales = True

    def __init__(
        self,
        rank: int = 50,
        krylov_dim: int = 200,
        complement: str = "drop",
        curvature: str = "ggn",
        block: int = 8,
        blocks: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if curvature not in KINDS:
            raise UnsupportedError(f"unknown curvature {curvature!r}; valid curvatures: {KINDS}")
        if complement not in COMPLEMENTS:
            raise UnsupportedError(f"unknown complement {complement!r}; use one of {COMPLEMENTS}")
        if blocks not in BLOCKS:
            raise UnsupportedError(f"unknown blocks {blocks!r}; use None or 'layer'")
        if rank < 1 or krylov_dim < rank or block < 1:
            raise InvalidInputError(
                f"need 1 <= rank <= krylov_dim and block >= 1; got rank={rank}, "
                f"krylov_dim={krylov_dim}, block={block}"
            )
        self.curvature = curvature
        self.rank = rank
        self.krylov_dim = krylov_dim
        self.complement = complement
        self.block = block
        self.blocks = blocks
        self.seed = seed
        self.eigenvalues: Tensor | None = None  # [p], data curvature (no ridge), descending
        self.vectors: Tensor | None = None  # U^T: [p, P]
        self.products = 0
        self._train_embeddings: Tensor | None = None

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        return 0  # the basis (krylov_dim x P) is checked in fit, where its size is known

    def fit(self, context: FitContext) -> None:
        self.context = context
        p = context.space.size
        n = min(self.krylov_dim, p)
        need = 2 * n * p * 8
        if need > context.memory_limit:
            raise ProblemTooLargeError(
                f"method='arnoldi' keeps a Krylov basis of {n} x {p:,} floats ({human_bytes(need)} "
                f"with working copies), above the memory limit of "
                f"{human_bytes(context.memory_limit)}; lower krylov_dim"
            )
        operator = CurvatureOperator(
            context.per_example, context.train, self.curvature, batch_size=4 * context.batch_size
        )
        matmat = operator.matmat
        if self.blocks == "layer":
            matmat = block_diagonal(matmat, [sl for _, sl in layer_slices(context.space)])
        Q, T = lanczos(matmat, p, n, block=self.block, seed=self.seed)
        self.products = operator.products
        evals, evecs = torch.linalg.eigh(T)
        key = evals.abs() if self.curvature == "hessian" else evals
        top = key.argsort(descending=True)[: min(self.rank, len(evals))]
        self.eigenvalues = evals[top]
        self.vectors = (evecs[:, top].T @ Q).to(context.space.device)  # [p, P]
        ridge = context.l2 + context.damping
        if bool((self.eigenvalues + ridge <= 0).any()):
            worst = float(self.eigenvalues.min())
            raise CurvatureError(
                f"a kept Ritz value of the {self.curvature.upper()} is {worst:.3e} and the ridge "
                f"l2 + damping is {ridge:.3e}: the projected curvature is not positive definite. "
                f"Add damping greater than {-worst:.3e}, or use curvature='ggn'"
            )
        self._train_embeddings = None

    def _ridge(self, shift: float) -> float:
        return self.context.l2 + self.context.damping + shift

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        V = V.to(torch.float64)
        ridge = self._ridge(shift)
        denom = self.eigenvalues + ridge
        if bool((denom <= 0).any()):
            raise CurvatureError(
                f"the projected curvature plus ridge {ridge:.3e} has a non-positive eigenvalue "
                f"{float(denom.min()):.3e}; add damping"
            )
        coords = V @ self.vectors.T  # [k, p]
        out = (coords / denom) @ self.vectors
        if self.complement == "ridge":
            if ridge <= 0:
                raise CurvatureError(
                    "complement='ridge' inverts the complement as 1 / (l2 + damping), which is 0; "
                    "pass damping > 0 or use complement='drop'"
                )
            out = out + (V - coords @ self.vectors) / ridge
        return out

    def embed(self, V: Tensor) -> Tensor:
        """Gamma V = diag(lambda + ridge)^{-1/2} U^T V for gradients V [k, P]; returns [k, p]."""
        denom = self.eigenvalues + self._ridge(0.0)
        return (V.to(torch.float64) @ self.vectors.T) / denom.sqrt()

    def embeddings(self, data=None, which: str = "measurement") -> Tensor:
        """Per-example embeddings [n, p].

        Without ``data``: the training set's ``Gamma (grad l_j + l2 theta)``, computed once and
        kept. With ``data``: ``Gamma grad m`` (``which="measurement"``) or ``Gamma grad l``
        (``which="loss"``) of those examples.
        """
        ctx = self.context
        if data is None:
            if self._train_embeddings is None:
                theta = ctx.space.flat().to(torch.float64)
                parts = [
                    self.embed(ctx.per_example.grads(b, "loss").to(torch.float64) + ctx.l2 * theta)
                    for b in ctx.train.batches(ctx.batch_size)
                ]
                self._train_embeddings = torch.cat(parts)
            return self._train_embeddings
        examples = ExampleSet(data, name="data")
        return torch.cat(
            [
                self.embed(ctx.per_example.grads(b, which).to(torch.float64))
                for b in examples.batches(ctx.batch_size)
            ]
        )

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(
            rank=self.rank,
            krylov_dim=self.krylov_dim,
            complement=self.complement,
            block=self.block,
            blocks=self.blocks,
            curvature_products=self.products,
            top_eigenvalue=None if self.eigenvalues is None else float(self.eigenvalues[0]),
            smallest_kept_eigenvalue=(
                None if self.eigenvalues is None else float(self.eigenvalues[-1])
            ),
        )
        return out
