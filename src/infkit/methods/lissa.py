"""method="lissa": the stochastic Neumann series of Agarwal et al. / Koh & Liang (docs/methods/lissa.md).

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
``(1 - mu_low / s)^J`` below ``tol``, ``mu_low`` the ridge plus the Hessian's lowest eigenvalue
where it is negative (measured by Lanczos; the GGN's is >= 0); truncating earlier acts as an
extra implicit damping of about ``s / J`` (docs/methods/lissa.md §4). A minibatch curvature
above ``2 s`` among the first few is warned of at fit; a blow-up of the iterates (such a
minibatch, or an indefinite Hessian) is detected and raises :class:`CurvatureError`.

The core recursion, :func:`lissa`, takes any ``matmat`` so it can be checked on an explicit matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from infkit.blocks import BlockMode, block_diagonal, layer_slices
from infkit.curvature import Curvature, CurvatureOperator, product_work_bytes
from infkit.errors import CurvatureError, InvalidInputError, NotFittedError, warn
from infkit.fitted import Fitted
from infkit.linalg import indefinite_remedy, lanczos_extremes, power_iteration
from infkit.methods.base import PRODUCT_PASSES, Fidelity, PrimalMethod, register
from infkit.options import Options, option
from infkit.plan import RunShape

#: an iterate whose norm exceeds this multiple of the contractive bound counts as diverged
DIVERGENCE_FACTOR = 10.0
#: steps between two divergence checks (a non-finite iterate is caught at the next check)
CHECK_EVERY = 10
#: minibatches whose largest curvature fit measures against 2 s
MINIBATCH_PROBES = 4
#: the power iteration's lambda_max is read this much higher where a scale of one's own is
#: checked against it (it stops at a relative change of 1e-3 and approaches from below: a
#: tester's s at 0.9999 of the bound passed a check without it, scores 0.3 off)
TOP_MARGIN = 1.02


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
    curvature: str = "hessian",
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
        curvature: what ``matmat`` multiplies by, "hessian" or "ggn", for the remedy a divergence
            gets.

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
                "scale_factor=...), raise the damping, use a larger minibatch (minibatch_size=...), "
                f"{indefinite_remedy(curvature)}"
            )
    return LissaResult(h / scale, depth)


@dataclasses.dataclass(frozen=True)
class LissaOptions(Options):
    """Options of ``method="lissa"``."""

    aliases: ClassVar[Mapping[str, str]] = {
        "minibatch": "minibatch_size",
        "product_batch_size": "minibatch_size",
    }
    value_aliases: ClassVar[Mapping[str, Mapping[Any, Any]]] = {"blocks": {"layer": "tensor"}}

    curvature: Curvature = option("ggn", "per-example curvature: 'ggn' (PSD) or 'hessian'")
    scale: float | Literal["auto"] = option(
        "auto",
        "s; 'auto' = scale_factor x (lambda_max(H) + l2 + damping), power iteration",
        above=0,
    )
    scale_factor: float = option(1.1, "safety factor of the automatic scale", minimum=1.0)
    depth: int | Literal["auto"] = option(
        "auto", "recursion depth J; 'auto': the slowest direction's error below tol", minimum=0
    )
    tol: float = option(
        1e-2,
        "target truncation error of depth='auto': the share of the slowest direction's answer "
        "the series may leave out (below 1: at 1 no step would be taken)",
        above=0,
        below=1,
    )
    max_depth: int = option(
        10_000, "cap of the automatic depth (a warning says when it binds)", minimum=1
    )
    repeats: int = option(1, "independent runs averaged (each its own minibatch order)", minimum=1)
    minibatch_size: int | None = option(
        None,
        "examples of each stochastic curvature product H~_j (default 256, or N when smaller); "
        "larger is less noisy",
        minimum=1,
    )
    blocks: BlockMode | None = option(
        None, "None (full curvature), or block-diagonal: one block per 'tensor' or per 'module'"
    )
    power_iterations: int = option(
        30,
        "iterations of the lambda_max estimate (and of the minibatches' and, for the Hessian, "
        "twice as many Lanczos steps of lambda_min)",
        minimum=1,
    )
    seed: int = option(0, "seeds the minibatch order and the power iteration")


@register
class Lissa(PrimalMethod):
    """Stochastic Neumann series on minibatch GGN/Hessian-vector products (docs/methods/lissa.md).

    With fewer examples than ``minibatch_size`` every product is over the full set, which
    makes the recursion deterministic.
    """

    name = "lissa"
    summary = "stochastic Neumann series (LiSSA) on minibatch curvature products, automatic scale"
    Options = LissaOptions
    scales = True
    cheap_solve = False
    solves_together = True
    exact_example_curvature = True
    # stochastic (full batch on the small problems); the damping keeps the recursion short
    fidelity = Fidelity(
        rtol=None,
        min_correlation=0.99,
        scale=(0.9, 1.1),
        damping=0.1,
        test_options={"tol": 1e-2, "minibatch_size": 256},
    )
    #: the scale and its eigenvalue estimate, and the counts of products, depths and solves
    fitted_state = ("lambda_max", "scale", "products", "depths", "_runs")
    options: LissaOptions

    def __init__(self, options: LissaOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature = self.options.curvature
        self.lambda_max: float | None = None
        self.lambda_min: float | None = None  # the Hessian's (Lanczos), where it is used
        self.minibatch_lambda_max: float | None = None
        self.scale: float | None = None
        self.products = 0
        self.depths: list[int] = []
        self._runs = 0
        self._slices: list[slice] | None = None

    # ------------------------------------------------------------------ fit
    def solve_passes_at_most(self, shape: RunShape, chunks: list[int]) -> float:
        """Each chunk's k vectors: ``repeats`` recursions of ``depth`` minibatch products
        (``max_depth`` under ``depth="auto"``), a minibatch a share ``m / N`` of a product over
        the data (``blocks=`` multiplies the vectors by the blocks, not counted here)."""
        options, n = self.options, max(shape.n_train, 1)
        depth = options.max_depth if options.depth == "auto" else int(options.depth)
        share = min(options.minibatch_size or 256, n) / n
        return sum(k for k in chunks) * options.repeats * depth * share * PRODUCT_PASSES

    def fit_passes(self) -> float:
        """At most: the power iteration's products over the full data (the automatic scale, or
        the check of one's own) and the Lanczos steps of the Hessian's lowest eigenvalue (the
        minibatches' probes are a few minibatches each, not counted)."""
        options = self.options
        products = options.power_iterations
        if options.curvature == "hessian":
            products += 2 * options.power_iterations
        return products * PRODUCT_PASSES

    def solve_note(self, shape: RunShape) -> str:
        depth = self.options.depth
        told = f"depth {depth}" if depth != "auto" else f"depth up to {self.options.max_depth:,}"
        return f"LiSSA, {told} minibatch products a recursion"

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        options = self.options
        self._slices = self._block_slices(fitted)
        ridge = fitted.ridge
        full = self._full_operator()
        self.lambda_max = power_iteration(
            self._wrap(full.matmat),
            fitted.space.size,
            iterations=options.power_iterations,
            seed=options.seed,
            device=fitted.space.device,
        )
        self.products += full.products
        if options.scale == "auto":
            self.scale = options.scale_factor * (self.lambda_max + ridge)
            if not self.scale > 0:
                raise CurvatureError(
                    "LiSSA's automatic scale is 0: the data curvature vanishes and l2 + damping "
                    "is 0; pass damping > 0"
                )
        else:
            # A scale of one's own is checked as the automatic one is made: the series
            # diverges along the top direction where lambda_max + ridge >= 2 s (a tester's
            # s = 0.99 (lambda_max + ridge) / 2 gave scores 5 to 318 times the answer, no word).
            self.scale = float(options.scale)
            if TOP_MARGIN * (self.lambda_max + ridge) >= 2 * self.scale:
                raise CurvatureError(
                    f"LiSSA: scale s = {self.scale:.4g} is too small for this curvature, whose "
                    f"largest eigenvalue is about {self.lambda_max:.4g} (plus l2 + damping = "
                    f"{ridge:.3g}): the series converges only below 2 s = {2 * self.scale:.4g} "
                    "(an estimate within a few percent of it cannot tell), and along that "
                    f"direction diverges or crawls. Pass scale >= "
                    f"{1.1 * (self.lambda_max + ridge):.4g} or scale='auto' (the default)"
                )
        if options.curvature == "hessian":
            self.lambda_min = self._lowest_eigenvalue()
        self.minibatch_lambda_max = self._probe_minibatches()

    def _full_operator(self) -> CurvatureOperator:
        fitted = self.fitted
        return CurvatureOperator(
            fitted.engine,
            fitted.train,
            self.options.curvature,
            batch_size=max(self._batch(), 4 * fitted.batch_size),
            work_bytes=product_work_bytes(fitted.memory_limit),
        )

    def _lowest_eigenvalue(self) -> float:
        """mu_min of the data Hessian (Lanczos, 2 x power_iterations steps; a negative one as
        low as its residual allows): the depth's slowest direction is mu_min + ridge, not the ridge, where
        the Hessian is indefinite (a tester: -0.0068 against a ridge of 0.01 left 23% of that
        direction out where the depth said 1%). Refused where the damped Hessian is not
        positive definite (the series diverges); a negative value at the rounding of the
        model's dtype (a float32 softmax's null direction reads -1.2e-8) is 0; where the
        Ritz value has not settled and its residual reaches below -ridge, a warning (a dense
        spectrum's lowest eigenvalue converges slowly: a reviewer's -0.012 read -0.0054)."""
        fitted, ridge = self.fitted, self.fitted.ridge
        full = self._full_operator()
        steps = 2 * self.options.power_iterations
        found = lanczos_extremes(
            self._wrap(full.matmat),
            fitted.space.size,
            steps=steps,
            seed=self.options.seed,
            device=fitted.space.device,
        )
        self.products += full.products
        rounding = 100 * torch.finfo(fitted.space.dtype).eps * max(abs(found.high), 1e-300)
        low = 0.0 if -rounding <= found.low < 0 else found.low
        if low < 0 and low + ridge <= 0:
            raise CurvatureError(
                f"LiSSA: the data Hessian has an eigenvalue of about {low:.4g}, and l2 + damping "
                f"= {ridge:.4g} does not make it positive: the Neumann series diverges "
                f"along it. Pass damping > {-low - ridge:.3g} (more, to converge in fewer "
                f"steps), {indefinite_remedy('hessian')}"
            )
        # A negative Ritz value may not have settled: taken as low as its residual allows. (A
        # positive one is left as it is: a convex model's, 1.9e-6 with a residual of 2.3e-5,
        # would read negative and lengthen every recursion, a reviewer's; the residual bounds
        # the distance to some eigenvalue, not to the lowest.)
        cautious = low - found.low_residual
        if low >= 0 or cautious >= -rounding or ridge <= 0:  # (no damping: _depth warns)
            return low
        if cautious + ridge > 0:
            return cautious
        warn(
            f"LiSSA: the data Hessian's lowest eigenvalue reads {low:.4g} after {steps} Lanczos "
            f"steps, but has not settled (residual {found.low_residual:.3g}): it may lie below "
            f"-(l2 + damping) = {-ridge:.4g}, where the series diverges, or below what the "
            "depth assumes. Check the scores against method='cg', raise power_iterations or the "
            "damping, or use curvature='ggn'",
            UserWarning,
        )
        return low

    def _probe_minibatches(self) -> float | None:
        """The largest curvature of the first :data:`MINIBATCH_PROBES` minibatches a recursion
        multiplies by (power iteration on each), where they are smaller than the training set:
        one above ``2 s`` (less the ridge) expands the series along it, and the answer is
        noisy or diverges (a tester: minibatches of 10 of 60 at 1.83 against 2 s = 1.51,
        Pearson 0.58 with exact, and no word); a warning says so."""
        fitted, options = self.fitted, self.options
        b = self._batch()
        if b >= fitted.n:
            return None
        operator = CurvatureOperator(
            fitted.engine,
            fitted.train,
            options.curvature,
            batch_size=b,
            work_bytes=product_work_bytes(fitted.memory_limit),
        )
        # the order of the first recursion's minibatches (_run's first repeat, on every example)
        first = torch.Generator().manual_seed(options.seed * 1_000_003)
        order = torch.randperm(fitted.n, generator=first)
        largest = 0.0
        for k in range(min(MINIBATCH_PROBES, fitted.n // b)):
            batch = fitted.train.take(order[k * b : (k + 1) * b])

            def product(Y: Tensor, batch=batch) -> Tensor:
                self.products += Y.shape[0]
                return operator.batch_product(batch, Y).to(torch.float64) / b

            largest = max(
                largest,
                power_iteration(
                    self._wrap(product),
                    fitted.space.size,
                    iterations=options.power_iterations,
                    seed=options.seed + k,
                    device=fitted.space.device,
                ),
            )
        scale, ridge = self._scale(), fitted.ridge
        if largest + ridge > 2 * scale:
            warn(
                f"LiSSA: a minibatch of {b} examples has curvature up to {largest:.4g}, and with "
                f"l2 + damping = {ridge:.3g} that is above 2 s = {2 * scale:.4g}: the series "
                "expands along it at each such step, and its answer is noisy or diverges. Use a "
                f"larger minibatch_size, or scale >= {1.1 * (largest + ridge) / 2:.4g} (longer "
                "recursions), or method='cg'",
                UserWarning,
            )
        return largest

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        self._slices = self._block_slices(fitted)
        self.lambda_min = state.get("lambda_min")
        self.minibatch_lambda_max = state.get("minibatch_lambda_max")
        if self.options.curvature == "hessian" and "lambda_min" not in state:
            warn(
                "this LiSSA fit on the Hessian was saved before infkit measured the Hessian's "
                "lowest eigenvalue: its depth assumes the ridge is the slowest direction, which "
                "an indefinite Hessian makes slower (scores 0.12 off where -0.0068 met a ridge "
                "of 0.01); fit again to have it measured",
                UserWarning,
            )

    def state(self) -> dict[str, Any]:
        out = super().state()
        for name in ("lambda_min", "minibatch_lambda_max"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def _block_slices(self, fitted: Fitted) -> list[slice] | None:
        blocks = self.options.blocks
        return None if blocks is None else [sl for _, sl in layer_slices(fitted.space, blocks)]

    def _batch(self) -> int:
        return min(self.options.minibatch_size or 256, self.fitted.n)

    def _scale(self) -> float:
        if self.scale is None:
            raise NotFittedError("method 'lissa' is not fitted")
        return self.scale

    def _wrap(self, matmat: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return block_diagonal(matmat, self._slices) if self._slices is not None else matmat

    def _slowest(self, ridge: float) -> float:
        """The damped curvature's lowest eigenvalue: the ridge, plus the Hessian's own lowest
        where it is negative (the GGN's is >= 0)."""
        return ridge + min(self.lambda_min or 0.0, 0.0)

    def _contraction(self, ridge: float) -> float:
        """The series' slowest factor per step, ``max |1 - (lambda + ridge) / s|`` over the
        curvature's eigenvalues: the lowest one's ``1 - mu/s`` (mu the damped curvature's lowest
        eigenvalue), or the top one's ``TOP_MARGIN (lambda_max + ridge)/s - 1`` where a scale of
        one's own lies just above the bound the fit checks (a tester's scale at 0.9999 of it,
        refused now, left the answer 0.3 off after a depth chosen for the ridge alone). 1 where
        the series does not converge. :meth:`_depth` takes the same two factors."""
        scale, slowest = self._scale(), self._slowest(ridge)
        if slowest <= 0:
            return 1.0
        top = TOP_MARGIN * ((self.lambda_max or 0.0) + ridge)
        return min(1.0, max(1.0 - slowest / scale, top / scale - 1.0))

    def truncation(self, ridge: float, depth: int) -> float:
        """``q^J``, q the series' slowest factor (:meth:`_contraction`): the share of the
        slowest direction's answer the series misses."""
        return float(self._contraction(ridge) ** depth)

    def _depth(self, ridge: float) -> int:
        options, scale = self.options, self._scale()
        if ridge <= 0:
            warn(
                f"LiSSA with l2 + damping = {ridge:g} has no damping: its Neumann series does not "
                f"converge along flat directions and is truncated at depth J, which acts as an "
                f"implicit damping of about s/J = {scale / options.max_depth:.2g}; its answer is "
                "not the undamped inverse. Pass damping > 0 (or the l2 the model was trained "
                "with), or use method='cg' or 'exact'",
                UserWarning,
            )
        if options.depth != "auto":
            depth = int(options.depth)
            missed = self.truncation(ridge, depth)
            if missed > 0.5:
                warn(
                    f"LiSSA's depth {depth} leaves {missed:.0%} of the slowest direction's answer "
                    f"out (scale {scale:.4g}, ridge {ridge:.3g}); use depth='auto' or a larger "
                    "depth, or more damping",
                    UserWarning,
                )
            return depth
        slowest = self._slowest(ridge)
        top = TOP_MARGIN * ((self.lambda_max or 0.0) + ridge) / scale - 1.0
        if slowest <= 0 or top >= 1.0:
            depth = options.max_depth
        else:
            # the lowest direction's rate by log1p (a damping of 1e-17 s still asks for a
            # depth, capped with a warning), the top one's where it is the slower
            rate = -math.log1p(-min(slowest / scale, 1.0 - 1e-16))
            if top > 0:
                rate = min(rate, -math.log(top))
            depth = math.ceil(math.log(1.0 / options.tol) / rate)
        if depth > options.max_depth:
            warn(
                f"LiSSA needs depth {depth:,} to reach tol={options.tol:g} with scale "
                f"{scale:.4g} and ridge {ridge:.3g}; capped at max_depth={options.max_depth:,}, "
                f"which leaves an implicit extra damping of about s/J = "
                f"{scale / options.max_depth:.2g}. Raise max_depth or the damping, or use "
                "method='cg'",
                UserWarning,
            )
            depth = options.max_depth
        return depth

    def _minibatch_matmat(
        self, pool: Tensor, share: float, gen: torch.Generator
    ) -> Callable[[Tensor], Tensor]:
        """X -> H~_j X on the next minibatch of ``pool`` (reshuffled every epoch).

        H~_j = share * (1/b) sum_{i in minibatch} C_i, an unbiased estimate of
        ``(1/N) sum_{i in pool} C_i`` when share = |pool| / N.
        """
        fitted = self.fitted
        b = min(self._batch(), len(pool))
        operator = CurvatureOperator(
            fitted.engine,
            fitted.train,
            self.options.curvature,
            batch_size=b,
            work_bytes=product_work_bytes(fitted.memory_limit),
        )
        work = torch.promote_types(fitted.engine.dtype, torch.float32)  # the recursion's (_run)
        order = pool[torch.randperm(len(pool), generator=gen)]
        at = 0

        def matmat(X: Tensor) -> Tensor:
            nonlocal order, at
            if at + b > len(pool):
                order = pool[torch.randperm(len(pool), generator=gen)]
                at = 0
            batch = fitted.train.take(order[at : at + b])
            at += b

            def product(Y: Tensor) -> Tensor:
                self.products += Y.shape[0]
                return operator.batch_product(batch, Y).to(work)

            return self._wrap(product)(X).mul_(share / b)

        return matmat

    def _run(self, V: Tensor, ridge: float, pool: Tensor, share: float) -> Tensor:
        depth = self._depth(ridge)
        self.depths.append(depth)
        scale = self._scale()
        # The recursion runs in the model's dtype, at least float32: float32 models halve its
        # memory traffic, and its rounding (~1e-7 per step) stays far below the minibatch
        # sampling noise; a bfloat16 iterate's (4e-3 per step) would not, summed over J steps
        # (a tester's bfloat16 scores: 6.7e-2 from float64's, the other methods' 1.4e-2).
        V = V.to(torch.promote_types(self.fitted.engine.dtype, torch.float32))
        total = torch.zeros_like(V, dtype=torch.float64)
        # Every solve draws the same minibatch order (run r's from seed and r alone): a
        # question asked twice gets one answer, and module_scores split the very solve that
        # scores makes (with a fresh order per solve, two calls differed by 0.10-0.14 and the
        # modules' sum missed the scores by as much); the minibatch order does not depend on V,
        # so neither do query chunks.
        for r in range(self.options.repeats):
            gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + r)
            self._runs += 1
            matmat = self._minibatch_matmat(pool, share, gen)
            estimate = lissa(
                matmat, V, scale=scale, damping=ridge / scale, depth=depth, curvature=self.curvature
            )
            total += estimate.X.to(torch.float64)
        return total / self.options.repeats

    # ------------------------------------------------------------------ solves
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        fitted = self.fitted
        return self._run(V.to(torch.float64), fitted.ridge + shift, torch.arange(fitted.n), 1.0)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        fitted = self.fitted
        keep = torch.ones(fitted.n, dtype=torch.bool)
        keep[group] = False
        pool = keep.nonzero().squeeze(1)
        ridge = fitted.retained_ridge(fitted.n - len(pool))
        # (1/N) sum_{i in R} C_i = (N_R / N) * (minibatch mean over R)
        return self._run(V.to(torch.float64), ridge, pool, len(pool) / fitted.n)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        ridge = self.fitted.ridge if self._fitted is not None else None
        out.update(
            scale=self.scale,
            lambda_max=self.lambda_max,
            lambda_min=self.lambda_min,
            minibatch_lambda_max=self.minibatch_lambda_max,
            lissa_damping=None if ridge is None or not self.scale else ridge / self.scale,
            effective_damping=ridge,
            depth=self.depths[-1] if self.depths else self.options.depth,
            truncation=(
                self.truncation(ridge, self.depths[-1])
                if ridge is not None and self.depths and self.scale
                else None
            ),
            implicit_damping=(
                self.scale / self.depths[-1]
                if self.scale and self.depths and self.depths[-1]
                else None
            ),
            minibatch_size=self._batch() if self._fitted is not None else None,
            curvature_products=self.products,
        )
        return out
