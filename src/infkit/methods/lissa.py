"""method="lissa": the stochastic Neumann series of Agarwal et al. / Koh & Liang (methods.md §3.2).

For a right-hand side v the recursion is

    h_0 = v,     h_j = v + (1 - d) h_{j-1} - H~_j h_{j-1} / s,     estimate = h_J / s,

with H~_j the data curvature on a fresh minibatch (an unbiased estimate of
``H = (1/N) sum_i C_i``), s the scale and d LiSSA's damping. Its fixed point is
``(H + d s I)^{-1} v``: the *effective damping* is ``d * s``. infkit folds the ridge of the damped
curvature into d,

    d = (l2 + damping + shift) / s,

so that the fixed point is exactly ``(H + (l2 + damping + shift) I)^{-1} v``, the same damped
curvature ``method="exact"`` and ``method="cg"`` invert; ``describe()`` reports d, s and d * s.
(Folding the ridge into d or into the operator is the same recursion: ``(1 - d) h - H~ h / s =
h - (H~ + ridge I) h / s``.)

The scale is chosen automatically from a power-iteration estimate of the largest eigenvalue of
the damped curvature, ``s = scale_factor * (lambda_max(H) + ridge)`` (default factor 1.1), which
makes every factor ``1 - (mu + ridge) / s`` of the iteration lie in (0, 1). The depth J is by
default the one that shrinks the slowest (lowest-curvature) direction's error
``(1 - ridge / s)^J`` below ``tol``; truncating earlier acts as an extra implicit damping of about
``s / J`` (methods.md §3.2, §6.7). A blow-up of the iterates (a minibatch curvature above
``2 s``, or an indefinite Hessian) is detected and raises :class:`CurvatureError`.

The core recursion, :func:`lissa`, takes any ``matmat`` so it can be checked on an explicit matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from infkit.blocks import block_diagonal, layer_slices
from infkit.curvature import KINDS, CurvatureOperator
from infkit.errors import CurvatureError, InvalidInputError, UnsupportedError
from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature

BLOCKS = (None, "layer")
#: an iterate whose norm exceeds this multiple of the contractive bound counts as diverged
DIVERGENCE_FACTOR = 10.0
#: steps between two divergence checks (a non-finite iterate is caught at the next check)
CHECK_EVERY = 10


@dataclass
class LissaResult:
    """The LiSSA estimate ``h_J / s`` ([k, P]) and the number of steps taken."""

    X: Tensor
    steps: int


def lissa(
    matmat: Callable[[Tensor], Tensor],
    V: Tensor,
    *,
    scale: float,
    damping: float,
    depth: int,
) -> LissaResult:
    """One run of the LiSSA recursion for all rows of V at once.

    ``h_0 = v``, ``h_j = v + (1 - damping) h_{j-1} - matmat(h_{j-1}) / scale`` for j = 1..depth,
    returning ``h_depth / scale`` = ``sum_{k=0}^{depth} ((1-d) I - H/s)^k v / s``, which tends to
    ``(H + damping * scale * I)^{-1} v`` as depth grows when the series converges.

    Args:
        matmat: X [k, P] -> H~ X [k, P] (float64); may draw a new minibatch on each call.
        V: right-hand sides [k, P]; the recursion runs in V's dtype, and ``matmat`` must
            return that dtype.
        scale: s > 0.
        damping: d >= 0 (LiSSA's own damping; the effective damping is d * s).
        depth: number of updates J >= 0.

    Raises:
        CurvatureError: when the iterates blow up or turn non-finite (the series diverges).
    """
    if not scale > 0:
        raise InvalidInputError(f"LiSSA needs a scale > 0, got {scale!r}")
    if not V.is_floating_point():
        V = V.to(torch.float64)
    h = V.clone()
    v_norm = V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
    # For a contractive iteration ||h_j|| <= ||v|| * min(j + 1, 1 / (d)).
    horizon = math.inf if damping <= 0 else 1.0 / damping
    for step in range(1, depth + 1):
        product = matmat(h)
        h.mul_(1.0 - damping).add_(V).sub_(product, alpha=1.0 / scale)
        if step % CHECK_EVERY and step != depth:
            continue
        norms = h.norm(dim=1)
        bound = DIVERGENCE_FACTOR * min(step + 1.0, horizon) * v_norm
        if not bool(torch.isfinite(norms).all()) or bool((norms > bound).any()):
            ratio = float((norms / v_norm).max()) if bool(torch.isfinite(norms).all()) else math.inf
            raise CurvatureError(
                f"LiSSA diverged at step {step}: the iterate grew to {ratio:.3g} x ||v|| (scale "
                f"s={scale:.4g}, damping d={damping:.4g}, effective damping d*s="
                f"{damping * scale:.4g}). The series converges only when every minibatch "
                "curvature plus the damping stays below 2*s: raise the scale (scale=... or "
                "scale_factor=...), raise the damping, use a larger minibatch (minibatch=...), "
                "or use curvature='ggn' (the Hessian may be indefinite)"
            )
    return LissaResult(h / scale, depth)


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
    """Estimate of the largest |eigenvalue| of a symmetric operator by power iteration."""
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


@register
class Lissa(InverseCurvature):
    """Stochastic Neumann series on minibatch GGN/Hessian-vector products.

    Args:
        curvature: ``"ggn"`` (default, positive semidefinite) or ``"hessian"``.
        scale: s; ``"auto"`` (default) uses ``scale_factor * (lambda_max(H) + l2 + damping)``
            with lambda_max from power iteration on the full data curvature.
        scale_factor: safety factor of the automatic scale (default 1.1, i.e. s >= lambda_max).
        depth: recursion depth J; ``"auto"`` (default) picks the J for which the slowest
            direction's error ``(1 - ridge/s)^J`` is below ``tol``, capped at ``max_depth``.
        tol: target truncation error for ``depth="auto"`` (default 1e-2: with minibatches the
            sampling noise is usually larger; lower it for full-batch, deterministic runs).
        max_depth: cap of the automatic depth (a warning says when it binds).
        repeats: independent runs averaged (each with its own minibatch order).
        minibatch: examples per minibatch curvature H~_j (default 256; the full set when N is
            smaller, which makes the recursion deterministic).
        blocks: ``None`` (full curvature) or ``"layer"``: block-diagonal curvature, one block per
            parameter tensor (cross-layer curvature dropped).
        power_iterations: iterations of the lambda_max estimate.
        seed: seeds the minibatch order and the power iteration.
    """

    name = "lissa"
    estimators = ("if", "rif", "newton", "relatif")
    summary = "stochastic Neumann series (LiSSA) on minibatch curvature products, automatic scale"
    scales = True

    def __init__(
        self,
        curvature: str = "ggn",
        scale: float | str = "auto",
        scale_factor: float = 1.1,
        depth: int | str = "auto",
        tol: float = 1e-2,
        max_depth: int = 10_000,
        repeats: int = 1,
        minibatch: int | None = None,
        blocks: str | None = None,
        power_iterations: int = 30,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if curvature not in KINDS:
            raise UnsupportedError(f"unknown curvature {curvature!r}; valid curvatures: {KINDS}")
        if blocks not in BLOCKS:
            raise UnsupportedError(f"unknown blocks {blocks!r}; use None or 'layer'")
        if not (scale == "auto" or (isinstance(scale, (int, float)) and scale > 0)):
            raise InvalidInputError(f"scale must be 'auto' or a number > 0, got {scale!r}")
        if not (depth == "auto" or (isinstance(depth, int) and depth >= 0)):
            raise InvalidInputError(f"depth must be 'auto' or an integer >= 0, got {depth!r}")
        if repeats < 1:
            raise InvalidInputError(f"repeats must be >= 1, got {repeats}")
        if not scale_factor >= 1.0:
            raise InvalidInputError(f"scale_factor must be >= 1, got {scale_factor}")
        self.curvature = curvature
        self.scale_option = scale
        self.scale_factor = scale_factor
        self.depth_option = depth
        self.tol = tol
        self.max_depth = max_depth
        self.repeats = repeats
        self.minibatch = minibatch
        self.blocks = blocks
        self.power_iterations = power_iterations
        self.seed = seed
        self.lambda_max: float | None = None
        self.scale: float | None = None
        self.products = 0
        self.depths: list[int] = []
        self._runs = 0
        self._slices: list[slice] | None = None

    # ------------------------------------------------------------------ fit
    def fit(self, context: FitContext) -> None:
        self.context = context
        if self.blocks == "layer":
            self._slices = [sl for _, sl in layer_slices(context.space)]
        ridge = context.l2 + context.damping
        if self.scale_option == "auto":
            full = CurvatureOperator(
                context.per_example,
                context.train,
                self.curvature,
                batch_size=max(self._batch(), 4 * context.batch_size),
            )
            matmat = self._wrap(full.matmat)
            self.lambda_max = power_iteration(
                matmat,
                context.space.size,
                iterations=self.power_iterations,
                seed=self.seed,
                device=context.space.device,
            )
            self.products += full.products
            self.scale = self.scale_factor * (self.lambda_max + ridge)
            if not self.scale > 0:
                raise CurvatureError(
                    "LiSSA's automatic scale is 0: the data curvature vanishes and l2 + damping "
                    "is 0; pass damping > 0"
                )
        else:
            self.scale = float(self.scale_option)

    def _batch(self) -> int:
        n = self.context.n
        return min(self.minibatch or 256, n)

    def _wrap(self, matmat: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return block_diagonal(matmat, self._slices) if self._slices is not None else matmat

    def _depth(self, ridge: float) -> int:
        if self.depth_option != "auto":
            return int(self.depth_option)
        if ridge <= 0:
            depth = self.max_depth
        else:
            rate = -math.log1p(-min(ridge / self.scale, 1.0 - 1e-16))
            depth = math.ceil(math.log(1.0 / self.tol) / rate)
        if depth > self.max_depth:
            warnings.warn(
                f"LiSSA needs depth {depth:,} to reach tol={self.tol:g} with scale "
                f"{self.scale:.4g} and ridge {ridge:.3g}; capped at max_depth={self.max_depth:,}, "
                f"which leaves an implicit extra damping of about s/J = "
                f"{self.scale / self.max_depth:.2g}. Raise max_depth or the damping, or use "
                "method='cg'",
                UserWarning,
                stacklevel=5,
            )
            depth = self.max_depth
        return depth

    def _minibatch_matmat(self, pool: Tensor, share: float, gen: torch.Generator):
        """X -> H~_j X on the next minibatch of ``pool`` (reshuffled every epoch).

        H~_j = share * (1/b) sum_{i in minibatch} C_i, an unbiased estimate of
        ``(1/N) sum_{i in pool} C_i`` when share = |pool| / N.
        """
        ctx = self.context
        b = min(self._batch(), len(pool))
        operator = CurvatureOperator(ctx.per_example, ctx.train, self.curvature, batch_size=b)
        dtype = ctx.space.dtype
        state = {"order": pool[torch.randperm(len(pool), generator=gen)], "at": 0}

        def matmat(X: Tensor) -> Tensor:
            if state["at"] + b > len(pool):
                state["order"] = pool[torch.randperm(len(pool), generator=gen)]
                state["at"] = 0
            batch = ctx.train.take(state["order"][state["at"] : state["at"] + b])
            state["at"] += b

            def product(Y: Tensor) -> Tensor:
                self.products += Y.shape[0]
                return operator.batch_product(batch, Y.to(dtype))

            return self._wrap(product)(X).mul_(share / b)

        return matmat

    def _run(self, V: Tensor, ridge: float, pool: Tensor, share: float) -> Tensor:
        depth = self._depth(ridge)
        self.depths.append(depth)
        # The recursion runs in the model's dtype: float32 models halve its memory traffic, and
        # its rounding (~1e-7 per step) stays far below the minibatch sampling noise.
        V = V.to(self.context.space.dtype)
        total = torch.zeros_like(V, dtype=torch.float64)
        for _ in range(self.repeats):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._runs)
            self._runs += 1
            matmat = self._minibatch_matmat(pool, share, gen)
            estimate = lissa(matmat, V, scale=self.scale, damping=ridge / self.scale, depth=depth)
            total += estimate.X.to(torch.float64)
        return total / self.repeats

    # ------------------------------------------------------------------ solves
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        ctx = self.context
        ridge = ctx.l2 + ctx.damping + shift
        return self._run(V.to(torch.float64), ridge, torch.arange(ctx.n), 1.0)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        ctx = self.context
        keep = torch.ones(ctx.n, dtype=torch.bool)
        keep[group] = False
        pool = keep.nonzero().squeeze(1)
        ridge = ctx.retained_ridge(ctx.n - len(pool))
        # (1/N) sum_{i in R} C_i = (N_R / N) * (minibatch mean over R)
        return self._run(V.to(torch.float64), ridge, pool, len(pool) / ctx.n)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        ctx = self.context
        ridge = (ctx.l2 + ctx.damping) if ctx is not None else None
        out.update(
            scale=self.scale,
            lambda_max=self.lambda_max,
            lissa_damping=None if ridge is None or not self.scale else ridge / self.scale,
            effective_damping=ridge,
            depth=self.depths[-1] if self.depths else self.depth_option,
            implicit_damping=(
                self.scale / self.depths[-1] if self.depths and self.depths[-1] else None
            ),
            repeats=self.repeats,
            minibatch=self._batch() if ctx is not None else self.minibatch,
            blocks=self.blocks,
            curvature_products=self.products,
        )
        return out
