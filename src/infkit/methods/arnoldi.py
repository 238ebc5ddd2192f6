"""method="arnoldi": top-p Ritz subspace of the curvature (Schioppa et al. 2022; docs/methods/arnoldi.md).

A block Lanczos iteration (the symmetric form of Arnoldi; ``block_size=1`` is the paper's single-vector
iteration) builds an orthonormal Krylov basis
Q (n vectors, fully re-orthogonalised) from curvature-vector products over the training data,
forms the projected curvature ``T = Q^T H Q`` exactly (every basis vector's product is computed)
and keeps the p Ritz pairs ``(lambda_k, u_k)`` of largest eigenvalue ("distillation"). Then

    solve(V) = U diag(1 / (lambda_k + ridge)) U^T V,     ridge = l2 + damping + shift,

the paper's *projected* inverse when the complement of the top-p subspace is dropped
(``complement="drop"``), so influence is measured only through the p highest-curvature
directions. This is a strongly truncated IF and can disagree with the full damped inverse, which
is dominated by low-curvature directions. ``complement="ridge"`` treats the complement as
curvature-free, adding ``(I - U U^T) V / ridge``, which overshoots where the complement still has
curvature. The default, ``complement="scaled"``, adds ``(I - U U^T) V / (mu + ridge)`` with mu the
complement's curvature along training gradients (a Rayleigh quotient over 16 of them, one
curvature product). With p = P (the full Krylov space) every choice equals ``method="exact"``.

Each example becomes a p-dimensional embedding ``Gamma v`` with
``Gamma = diag(lambda + ridge)^{-1/2} U^T``, so that (with the complement dropped) influence is a
dot product of embeddings: ``scores[t, j] = (1/N) <Gamma grad m_t, Gamma v_j>``.
:meth:`Arnoldi.embed` maps gradients, :meth:`Arnoldi.embeddings` returns (and keeps) the training
embeddings of ``v_j = grad l_j + l2 theta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from infkit.blocks import BlockMode, block_diagonal, layer_slices
from infkit.curvature import Curvature, CurvatureOperator, product_work_bytes
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NotFittedError,
    Notice,
    ProblemTooLargeError,
    warn,
)
from infkit.fitted import Fitted
from infkit.gradients import Which
from infkit.linalg import indefinite_remedy, singular_threshold
from infkit.memory import FLOAT64_BYTES, human_bytes
from infkit.methods.base import Fidelity, PrimalMethod, Problem, register
from infkit.options import Options, option
from infkit.plan import RunShape


def lanczos(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    steps: int,
    *,
    block: int = 1,
    seed: int = 0,
    tol: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """Block Lanczos with full re-orthogonalisation: a Krylov basis and the projected operator.

    Args:
        matmat: X [k, size] -> A X [k, size] for a symmetric A.
        size: dimension of the space.
        steps: basis size n (capped at ``size``).
        block: vectors per product (1: plain Lanczos).
        tol: a new direction whose norm falls below ``tol`` times the operator scale (its
            largest product's norm so far: a reviewer's operator of scale 1e-12 broke down at
            every step under an absolute floor of 1e-10) is an invariant subspace (breakdown);
            the basis is continued with a fresh random direction,
            taken where its part orthogonal to the basis keeps ``tol`` of its own norm (not of the
            operator's scale: a GGN of scale 1e15 refused every fresh direction, a tester's
            weight-normed MLP, and the loop never ended).

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

    def orthonormal_rows(
        W: Tensor, count: int, fresh_rows: bool = False, beside: Tensor | None = None
    ) -> Tensor:
        """Up to ``count`` orthonormal rows spanning W's part orthogonal to the basis (and to
        the orthonormal rows ``beside``): of the operator's products, those above ``tol`` of
        its scale; of ``fresh_rows`` (random directions), those above ``tol`` of their own
        norm."""
        rows: list[Tensor] = [] if beside is None else list(beside)
        taken = len(rows)
        for w in W:
            floor = tol * float(w.norm()) if fresh_rows else tol * scale
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                if len(basis):
                    w = w - (basis @ w) @ basis
                if rows:
                    R = torch.stack(rows)
                    w = w - (R @ w) @ R
            norm = float(w.norm())
            if norm > floor:
                rows.append(w / norm)
            if len(rows) - taken == count:
                break
        rows = rows[taken:]
        return torch.stack(rows) if rows else torch.empty(0, size, dtype=torch.float64)

    current = orthonormal_rows(fresh(block), block, fresh_rows=True)
    while len(basis) < steps:
        need = min(block, steps - len(basis))
        current = current[:need]
        while len(current) < need:  # breakdown: continue in a random direction
            # (orthogonal to the block's rows too, and normalised after: projected after
            # normalising, a reviewer's fresh rows fell 0.99 inside the block's span and entered
            # the basis at norms of 1e-9)
            extra = orthonormal_rows(
                fresh(need - len(current)), need - len(current), True, beside=current
            )
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


@dataclasses.dataclass(frozen=True)
class ArnoldiOptions(Options):
    """Options of ``method="arnoldi"``."""

    aliases: ClassVar[Mapping[str, str]] = {"block": "block_size"}
    value_aliases: ClassVar[Mapping[str, Mapping[Any, Any]]] = {"blocks": {"layer": "tensor"}}

    rank: int = option(50, "p, the Ritz pairs kept (captum's projection_dim)", minimum=1)
    krylov_dim: int = option(
        200, "n >= p, the Krylov basis size (captum's arnoldi_dim); capped at P", minimum=1
    )
    complement: Literal["drop", "ridge", "scaled"] = option(
        "scaled",
        "the complement of the top-p subspace: 'drop' (dropped, the paper), 'ridge' (inverted "
        "as 1/ridge) or 'scaled' (as 1/(its curvature along training gradients + ridge))",
    )
    curvature: Curvature = option(
        "ggn", "'ggn' or 'hessian' (Ritz values then ranked by magnitude)"
    )
    block_size: int = option(
        8,
        "curvature-vector products per pass over the data (1: the paper's plain Lanczos)",
        minimum=1,
    )
    blocks: BlockMode | None = option(
        None, "None (full curvature), or block-diagonal: one block per 'tensor' or per 'module'"
    )
    product_batch_size: int | None = option(
        None,
        "examples per curvature-product batch (default: 4 x the facade's batch_size)",
        minimum=1,
    )
    seed: int = option(0, "seeds the starting vectors")

    def __post_init__(self) -> None:
        if self.krylov_dim < self.rank:
            raise InvalidInputError(
                f"method 'arnoldi': krylov_dim ({self.krylov_dim}) must be >= rank ({self.rank})"
            )


@register
class Arnoldi(PrimalMethod):
    """Projected inverse on the top-p Ritz subspace of the GGN or Hessian (docs/methods/arnoldi.md).

    With n = p = P the method is exact. ``block_size=8`` makes krylov_dim / 8 passes over the data
    instead of krylov_dim, several times faster, with top Ritz pairs of the same quality in the
    benchmarks (benchmarks/results/matrix_free.md).
    """

    name = "arnoldi"
    estimators = ("if", "relatif")
    summary = "top-p Ritz subspace of the GGN by Lanczos; projected inverse and p-dim embeddings"
    Options = ArnoldiOptions
    scales = True
    checks_scale = True  # describe() reports energy_ratio
    fidelity = Fidelity(
        rtol=None,
        min_correlation=0.8,
        removal_correlation=0.45,
        scale=(0.2, 2.0),
        test_options={"rank": 20, "krylov_dim": 60},
    )
    #: the Ritz pairs (the training embeddings are recomputed when asked for)
    fitted_state = ("eigenvalues", "vectors", "products", "complement_curvature")
    options: ArnoldiOptions

    def __init__(self, options: ArnoldiOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature = self.options.curvature
        self.eigenvalues: Tensor | None = None  # [p], data curvature (no ridge), descending
        self.complement_curvature = 0.0  # complement="scaled": its curvature along gradients
        self.vectors: Tensor | None = None  # U^T: [p, P]
        self.products = 0
        self._train_embeddings: Tensor | None = None

    def basis_bytes(self, p: int) -> int:
        """The Krylov basis [n, P] in float64 with its working copies, n = min(krylov_dim, P):
        the fit's largest object (:meth:`check_memory`, the plan)."""
        return 2 * min(self.options.krylov_dim, p) * p * FLOAT64_BYTES

    def fit_objects(self, shape: RunShape) -> tuple[str, int, int]:
        n = min(self.options.krylov_dim, shape.parameters)
        kept = min(self.options.rank, n) * shape.parameters * FLOAT64_BYTES
        return (
            f"Krylov basis [{n}, P] and working copies, float64",
            self.basis_bytes(shape.parameters),
            kept,
        )

    def check_memory(self, problem: Problem) -> None:
        n = min(self.options.krylov_dim, problem.p)
        need = self.basis_bytes(problem.p)
        if need > problem.memory_limit:
            raise ProblemTooLargeError(
                f"method='arnoldi' keeps a Krylov basis of {n} x {problem.p:,} floats "
                f"({human_bytes(need)} with working copies), above the memory limit of "
                f"{human_bytes(problem.memory_limit)}; lower krylov_dim"
            )

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        options = self.options
        p = fitted.space.size
        n = min(options.krylov_dim, p)
        operator = CurvatureOperator(
            fitted.engine,
            fitted.train,
            self.options.curvature,
            batch_size=options.product_batch_size or 4 * fitted.batch_size,
            work_bytes=product_work_bytes(fitted.memory_limit),
        )
        matmat: Callable[[Tensor], Tensor] = operator.matmat
        if options.blocks is not None:
            slices = [sl for _, sl in layer_slices(fitted.space, options.blocks)]
            matmat = block_diagonal(matmat, slices)
        Q, T = lanczos(matmat, p, n, block=options.block_size, seed=options.seed)
        self.products = operator.products
        evals, evecs = torch.linalg.eigh(T)
        key = evals.abs() if self.curvature == "hessian" else evals
        if options.rank > len(evals):
            warn(
                f"method 'arnoldi': rank {options.rank} is more Ritz pairs than the Krylov basis "
                f"holds ({len(evals)}: krylov_dim {options.krylov_dim}, capped at P = {p:,}); "
                f"all {len(evals)} are kept (describe()['kept_rank'])",
                Notice,
            )
        top = key.argsort(descending=True)[: min(options.rank, len(evals))]
        self._check_ritz_values(evals, evals[top], fitted)
        self.eigenvalues = evals[top]
        self.vectors = (evecs[:, top].T @ Q).to(fitted.space.device)  # [p, P]
        self.complement_curvature = 0.0
        if options.complement == "scaled":
            self.complement_curvature = self._complement_curvature(fitted, matmat)
        self._train_embeddings = None

    def _check_ritz_values(self, evals: Tensor, kept: Tensor, fitted: Fitted) -> None:
        """Refuse a damped curvature that the Ritz values show to be indefinite or singular.

        Every Ritz value is a Rayleigh quotient of the curvature, so one with ``lambda + ridge
        < 0``, kept or not, proves the damped curvature indefinite (a tester's Hessian away from
        a minimum, its negative values outside the top-p by magnitude: scores 0.99 off, no
        word). A kept one with ``lambda + ridge`` at the rounding of the products (a rank-40
        GGN at l2 = 0 with p = 50) is a direction the curvature does not have: dividing by it
        gave scores 3.8e12 times the pseudo-inverse's.
        """
        ridge = fitted.ridge
        scale = float((evals.abs() + abs(ridge)).max())
        # The rounding of one product in float32 at least (a float16 model's Ritz values are
        # read from float32 outputs, its 1.2% of the largest a real one). A GGN is positive
        # semidefinite for every convex loss, so a negative value of it counts only beyond
        # the rounding of the products' own precision (a bfloat16 GGN's null directions read
        # -5.2e-5 of the largest, a reviewer's); a Hessian's counts beyond float32's (a
        # bfloat16 Hessian at -4.1% is indefinite, another reviewer's).
        tol = singular_threshold(1, torch.promote_types(fitted.engine.precision, torch.float32))
        tol *= scale
        psd = self.curvature == "ggn"
        negative = singular_threshold(1, fitted.engine.precision) * scale if psd else tol
        worst = float(evals.min())
        if worst + ridge < -negative:
            needed = -worst - fitted.l2  # (the ridge holds l2 already)
            raise CurvatureError(
                f"a Ritz value of the {self.curvature.upper()} is {worst:.3e} and the ridge "
                f"l2 + damping is {ridge:.3e}: the damped curvature is not positive definite "
                f"(largest Ritz value {float(evals.max()):.3e}). Pass damping greater than "
                f"{needed:.3e}, at least (it is {fitted.damping:g}; the lowest Ritz value "
                "bounds the lowest eigenvalue from above, so more is needed where the Krylov "
                f"basis has not reached it: e.g. damping={1.5 * needed:.2e}, or a larger "
                f"krylov_dim to read it closer), {indefinite_remedy(self.curvature)}"
            )
        low = float(kept.min()) + ridge
        if low <= tol:
            nonzero = int((evals + ridge > tol).sum())
            raise CurvatureError(
                f"a kept Ritz value of the {self.curvature.upper()} plus the ridge l2 + damping "
                f"({ridge:.3e}) is {low:.3e}, at the rounding of its products against the "
                f"largest {scale:.3e}: the curvature is singular along it and influence is "
                f"undefined there. Pass a damping well above that rounding (e.g. "
                f"damping={1e-3 * scale:.1e}, 1e-3 x the largest; it is {fitted.damping:g}), the "
                f"l2 the model was trained with, or rank <= {nonzero} (the Ritz values above "
                "rounding)"
            )

    def _complement_curvature(self, fitted: Fitted, matmat: Callable[[Tensor], Tensor]) -> float:
        """The curvature of the complement along training gradients: the Rayleigh quotient
        sum_j g_j^T H g_j / sum_j ||g_j||^2 of the complement parts g_j = (I - U U^T) grad l_j
        of 16 evenly spaced training examples (one curvature product of 16 vectors)."""
        assert self.vectors is not None
        idx = torch.linspace(0, fitted.n - 1, min(16, fitted.n)).round().long().unique()
        grads = fitted.loss_grads(fitted.train.take(idx)).to(self.vectors)
        G = grads - (grads @ self.vectors.T) @ self.vectors
        norm = float((G * G).sum())
        # Parts at the projection's rounding (the kept vectors span the gradients, as when they
        # hold the whole range of the GGN) carry no curvature: their quotient is of rounding
        # errors, which once gave mu = 0.4 ridge where the complement has none (0: 1/ridge).
        # In float64 terms: a bound in the parameters' precision (7.8e-2 in bfloat16) zeroed
        # real complements (a reviewer's bfloat16 MLP: 6x off), where a quotient of rounding
        # errors is small or negative (0).
        rounding = 1e3 * torch.finfo(G.dtype).eps
        if norm <= (rounding**2) * float((grads * grads).sum()):
            return 0.0
        return max(0.0, float((G * matmat(G).to(G)).sum()) / norm)

    def _subspace(self) -> tuple[Tensor, Tensor]:
        if self.eigenvalues is None or self.vectors is None:
            raise NotFittedError("method 'arnoldi' is not fitted")
        return self.eigenvalues, self.vectors

    def _ridge(self, shift: float) -> float:
        return self.fitted.ridge + shift

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        V = V.to(torch.float64)
        eigenvalues, vectors = self._subspace()
        ridge = self._ridge(shift)
        denom = eigenvalues + ridge
        if bool((denom <= 0).any()):
            raise CurvatureError(
                f"the projected curvature plus ridge {ridge:.3e} has a non-positive eigenvalue "
                f"{float(denom.min()):.3e}; add damping"
            )
        coords = V @ vectors.T  # [k, p]
        out = (coords / denom) @ vectors
        if self.options.complement == "scaled" and self.complement_curvature + ridge > 0:
            out = out + (V - coords @ vectors) / (self.complement_curvature + ridge)
        elif self.options.complement == "ridge":
            if ridge <= 0:
                raise CurvatureError(
                    "complement='ridge' inverts the complement as 1 / (l2 + damping), which is 0; "
                    "pass damping > 0 or use complement='drop'"
                )
            out = out + (V - coords @ vectors) / ridge
        return out

    def embed(self, V: Tensor) -> Tensor:
        """Gamma V = diag(lambda + ridge)^{-1/2} U^T V for gradients V [k, P]; returns [k, p]."""
        eigenvalues, vectors = self._subspace()
        denom = eigenvalues + self._ridge(0.0)
        return (V.to(torch.float64) @ vectors.T) / denom.sqrt()

    def embeddings(self, data: Any = None, which: Which = "measurement") -> Tensor:
        """Per-example embeddings [n, p].

        Without ``data``: the training set's ``Gamma (grad l_j + l2 theta)``, computed once and
        kept. With ``data``: ``Gamma grad m`` (``which="measurement"``) or ``Gamma grad l``
        (``which="loss"``) of those examples.
        """
        fitted = self.fitted
        if data is None:
            if self._train_embeddings is None:
                parts = [
                    self.embed(fitted.attributed_grads(b))
                    for b in fitted.train.batches(fitted.training_gradient_batch_size)
                ]
                self._train_embeddings = torch.cat(parts)
            return self._train_embeddings
        examples = fitted.examples(data, "data")
        return self.embed(fitted.query_gradients(examples, which))

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        out.update(
            curvature_products=self.products,
            kept_rank=None if self.eigenvalues is None else len(self.eigenvalues),
            top_eigenvalue=None if self.eigenvalues is None else float(self.eigenvalues[0]),
            smallest_kept_eigenvalue=(
                None if self.eigenvalues is None else float(self.eigenvalues[-1])
            ),
        )
        if self.options.complement == "scaled":  # mu: from 16 examples, by position
            out["complement_curvature"] = self.complement_curvature
        return out
