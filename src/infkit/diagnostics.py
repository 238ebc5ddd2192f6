"""Cheap checks of a fitted answer along a few probe directions (docs/conventions.md §9).

Approximate and iterative methods can be off by orders of magnitude without failing; these
checks measure how far, on a small sample, so that ``describe()`` can report the figure and
``fit`` can warn only when it matters:

* :func:`probe_directions`: ``J_i^T r_i`` for a few training examples and Gaussian output
  cotangents r_i, vectors in the range of the GGN, where query gradients live (a random
  parameter vector mostly sees directions of no curvature, where every method gives v / ridge);
* :func:`energy_ratio`: ``rho = u^T (H + ridge) u / u^T v`` with ``u = A^{-1} v`` the method's
  answer. rho = 1 when A is the damped GGN; an A too small by a factor c in the directions that
  matter gives rho ~ c, so rho is how many times too large the scores come out;
* :func:`curvature_scale`: the Rayleigh quotient of the GGN along probe directions, the scale
  the damping is compared with (a damping 1e12 times larger makes every score vanish);
* :func:`drift`: the step ``d = (H + ridge)^{-1} grad L(theta*)`` that would take a loosely
  trained model to its optimum, and how much it would change the training residuals
  ``dl_i/df``, on which every score depends (``grad l_i = J_i^T dl_i/df``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from infkit.curvature import (
    CurvatureOperator,
    product_chunk,
    product_direction_bytes,
    product_work_bytes,
)
from infkit.data import Batch
from infkit.fitted import Fitted
from infkit.linalg import conjugate_gradients
from infkit.memory import FLOAT64_BYTES
from infkit.parameters import evaluation_mode

#: directions of :func:`probe_directions`
PROBE_DIRECTIONS = 16
#: probe directions and curvature sample of :func:`curvature_scale`
SCALE_DIRECTIONS, SCALE_SAMPLE = 2, 32
#: training examples of the curvature sample in :func:`energy_ratio`
CURVATURE_SAMPLE = 256
#: queries whose gradients :meth:`infkit.methods.base.Method.check_queries` sums into its
#: direction (the first of a ``scores()`` call)
QUERY_DIRECTIONS = 16
#: training examples on which :func:`drift` measures the residual shift
DRIFT_SAMPLE = 256
#: relative residual and iterations of :func:`sample_solve`
SAMPLE_SOLVE_TOL = 1e-3
SAMPLE_SOLVE_MAXITER = 100


def _sample(fitted: Fitted, count: int, skip: int = 0, seed: int = 0) -> Tensor:
    """``count`` training indices from a fixed permutation, after its first ``skip``, sorted."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(fitted.n, generator=gen)
    chosen = order[skip : skip + count]
    if len(chosen) == 0:
        chosen = order[:count]
    return chosen.sort().values


def report_sample(n: int) -> int:
    """The curvature sample of an :func:`energy_ratio` that only reports (no warning hangs on
    it): N / 16 examples, between 1 and :data:`CURVATURE_SAMPLE`, so that its 16 directions
    cost about one pass over the data. Noisier than the full sample, enough for the
    order-of-magnitude errors the figure is for."""
    return max(1, min(CURVATURE_SAMPLE, n // PROBE_DIRECTIONS))


#: a curvature product of one example in one direction costs about this many of the example's
#: share of a batch's forward and backward pass (a forward-mode pass, the output Hessian's
#: product and a backward pass, one example at a time; measured 4.5 on a small language model,
#: whose vocabulary's products dominate): :meth:`infkit.Influence.plan` prices the checks by it
PRODUCT_PASS_COST = 4.0


def check_products(n: int, scale: bool, energy_sample: int) -> int:
    """Per-example curvature products (each about :data:`PRODUCT_PASS_COST` of the example's
    share of a batch's forward and backward pass) of the post-fit checks on N = ``n``
    training examples: :func:`curvature_scale` (``scale``) and :func:`energy_ratio` on
    ``energy_sample`` examples (0: not run), their probe directions included.
    :meth:`infkit.Influence.plan` counts them as passes."""
    total = 0
    if scale:
        total += SCALE_DIRECTIONS + SCALE_DIRECTIONS * min(SCALE_SAMPLE, n)
    if energy_sample:
        sample = min(energy_sample, n - PROBE_DIRECTIONS if n > PROBE_DIRECTIONS else n)
        total += PROBE_DIRECTIONS + PROBE_DIRECTIONS * sample
    return total


def check_bytes(
    p: int, outputs: int, batch_size: int, itemsize: int, memory_limit: int, energy: bool
) -> int:
    """Bytes the post-fit checks hold at their peak for P = ``p`` parameters in a model of
    ``itemsize`` whose examples have ``outputs`` outputs each: the energy ratio's
    (``energy``; else the scale check's) probe directions, answers and curvature products in
    float64 and the directions in the model's precision, and a batch product's working memory
    (:func:`~infkit.curvature.product_chunk` of :func:`~infkit.curvature.product_work_bytes`).
    :meth:`infkit.Influence.plan` reports them."""
    directions = PROBE_DIRECTIONS if energy else SCALE_DIRECTIONS
    return _product_bytes(
        p, outputs, batch_size, itemsize, memory_limit, directions, 3 if energy else 2
    )


def query_check_bytes(
    p: int, outputs: int, batch_size: int, itemsize: int, memory_limit: int
) -> int:
    """Bytes :meth:`infkit.methods.base.Method.check_queries` holds at its peak for P = ``p``
    parameters (as :func:`check_bytes`), beyond a batch of the queries' gradients: their one
    direction, its answer and curvature product in float64, the direction in the model's
    precision, and a batch product's working memory for it."""
    return _product_bytes(p, outputs, batch_size, itemsize, memory_limit, 1, 3)


def _product_bytes(
    p: int,
    outputs: int,
    batch_size: int,
    itemsize: int,
    memory_limit: int,
    directions: int,
    float64_arrays: int,
) -> int:
    """``directions`` rows of P held ``float64_arrays`` times in float64 and once in the
    model's precision, and a batch's curvature product's working memory for them."""
    arrays = directions * p * (float64_arrays * FLOAT64_BYTES + itemsize)
    batch_outputs = batch_size * outputs
    chunk = product_chunk(directions, batch_outputs, p, itemsize, product_work_bytes(memory_limit))
    return arrays + chunk * product_direction_bytes(batch_outputs, p, itemsize)


def probe_directions(fitted: Fitted, count: int = PROBE_DIRECTIONS, seed: int = 0) -> Tensor:
    """``J_i^T r_i`` [count, P] float64 for ``count`` training examples, ``r_i ~ N(0, I_C)``.

    One example at a time, so that only a [1, 1, C] cotangent is ever built (C may be a
    sequence of vocabulary logits).
    """
    gen = torch.Generator().manual_seed(seed)
    chosen = _sample(fitted, count, seed=seed)
    out = torch.empty(
        len(chosen), fitted.space.size, dtype=torch.float64, device=fitted.space.device
    )
    for row, i in enumerate(chosen):
        batch = fitted.train.take(i.reshape(1))
        c = fitted.engine.outputs(batch).reshape(1, -1).shape[1]
        r = torch.randn(1, 1, c, generator=gen, dtype=torch.float64)
        out[row] = fitted.engine.vjp(batch, r).reshape(-1)
    return out


def _sample_curvature(
    fitted: Fitted, sample: int, skip: int = PROBE_DIRECTIONS
) -> CurvatureOperator:
    """The mean GGN of ``sample`` training examples, after the first ``skip`` of the fixed
    permutation (by default the examples :func:`probe_directions` draws its directions from,
    whose own curvature would weigh on them; 0 for directions from elsewhere, the queries',
    which then take every example up to ``sample``)."""
    indices = _sample(fitted, sample, skip=skip)
    return CurvatureOperator(
        fitted.engine,
        fitted.train,
        "ggn",
        batch_size=fitted.pass_batch_size,
        indices=indices,
        work_bytes=product_work_bytes(fitted.memory_limit),
    )


def damped_products(
    fitted: Fitted, U: Tensor, sample: int = CURVATURE_SAMPLE, skip: int = PROBE_DIRECTIONS
) -> Tensor:
    """``(H_s + ridge) U`` [k, P] float64, H_s the mean GGN of a sample of training examples
    (:func:`_sample_curvature`)."""
    return _sample_curvature(fitted, sample, skip).matmat(U).add_(U, alpha=fitted.ridge)


def curvature_scale(
    fitted: Fitted, directions: int = SCALE_DIRECTIONS, sample: int = SCALE_SAMPLE
) -> float:
    """``sum_k v_k^T H_s v_k / sum_k v_k^T v_k`` over a few probe directions: the curvature the
    ridge competes with along gradient directions (undamped GGN on a small sample)."""
    V = probe_directions(fitted, directions)
    HV = _sample_curvature(fitted, sample).matmat(V)
    return float((V * HV).sum() / (V * V).sum().clamp_min(1e-300))


def sample_solve(fitted: Fitted, sample: int = CURVATURE_SAMPLE) -> Callable[[Tensor], Tensor]:
    """An approximate ``(H + ridge)^{-1}``: CG on the damped GGN of a sample of training examples
    (to :data:`SAMPLE_SOLVE_TOL`), for checks of methods that do not solve in parameter space."""
    operator = _sample_curvature(fitted, sample)

    def solve(V: Tensor) -> Tensor:
        def matmat(X: Tensor) -> Tensor:
            return (operator.matmat(X.T) + fitted.ridge * X.T).T

        result = conjugate_gradients(
            matmat,
            V.to(torch.float64).T,
            tol=SAMPLE_SOLVE_TOL,
            maxiter=SAMPLE_SOLVE_MAXITER,
            curvature="ggn",
        )
        return result.X.T

    return solve


def energy_ratio(
    fitted: Fitted,
    solve: Callable[[Tensor], Tensor],
    directions: Tensor | None = None,
    sample: int = CURVATURE_SAMPLE,
) -> float:
    """``rho = sum_k u_k^T (H + ridge) u_k / sum_k u_k^T v_k`` with ``u_k = solve(v_k)``.

    ``solve`` is the method's inverse damped curvature; H is the GGN on a sample of
    ``sample`` training examples (an unbiased estimate of the mean). Along the default
    directions, :func:`probe_directions`, the sample leaves out the examples they come from;
    along given ``directions`` it takes the examples from the start, all of them where N is
    at most ``sample``. rho is 1 (within the sample's noise, a few percent) for an exact
    solve, and ~c when the answer is c times too large along the directions.
    """
    V = probe_directions(fitted) if directions is None else directions
    skip = PROBE_DIRECTIONS if directions is None else 0
    U = solve(V).to(torch.float64)
    # sums of elementwise products as dot products of the flattened blocks: no third [k, P]
    numerator = float(U.reshape(-1) @ damped_products(fitted, U, sample, skip).reshape(-1))
    denominator = float(U.reshape(-1) @ V.to(torch.float64).reshape(-1))
    return numerator / denominator if denominator > 0 else float("inf")


@dataclass(frozen=True)
class Drift:
    """How far theta* is from the optimum of its objective, in what the scores depend on.

    Attributes:
        step: ``||d||``, ``d = (H + ridge)^{-1} grad L(theta*)`` (the Newton step to the
            optimum, with the method's curvature and damping).
        relative_step: ``||d|| / ||theta*||``.
        residual_shift: the larger of ``sqrt(sum_i ||Lambda_i J_i d||^2 / sum_i ||dl_i/df||^2)``
            and ``median_i ||Lambda_i J_i d|| / median_i ||dl_i/df||`` on a sample of training
            examples: how much the output-space loss gradients (the residuals), and with them
            the scores, would change on the way to the optimum, to first order, pooled and for
            the typical example (which one outlying residual cannot hide).
        kinked: the loss has no curvature in the outputs on any example of the sample
            (``Lambda_i = 0``: a hinge, an absolute error), so ``residual_shift`` is the
            residuals' actual change at ``theta* - d``: they jump at the loss's kinks, which
            the first-order expansion does not see (0 for a loss linear in the outputs).
    """

    step: float
    relative_step: float
    residual_shift: float
    kinked: bool = False

    def record(self) -> dict[str, float | bool]:
        """The figures as a plain dict (for ``describe()``)."""
        return {
            "step": self.step,
            "relative_step": self.relative_step,
            "residual_shift": self.residual_shift,
            "kinked": self.kinked,
        }


def drift(
    fitted: Fitted, solve: Callable[[Tensor], Tensor], sample: int = DRIFT_SAMPLE
) -> Drift | None:
    """The :class:`Drift` of ``fitted`` (None when it has no objective gradient)."""
    if fitted.objective_gradient is None:
        return None
    d = solve(fitted.objective_gradient.reshape(1, -1)).reshape(-1).to(torch.float64)
    indices = _sample(fitted, sample)
    shifts, residuals = [], []  # per example: ||Lambda_i J_i d||, ||dl_i/df||
    for batch in fitted.train.batches(fitted.pass_batch_size, indices):
        g, lam_jd = _residual_and_shift(fitted, batch, d)
        shifts.append(lam_jd.to(torch.float64).reshape(len(lam_jd), -1).norm(dim=1))
        residuals.append(g.to(torch.float64).reshape(len(g), -1).norm(dim=1))
    shift, residual = torch.cat(shifts), torch.cat(residuals)
    step = float(d.norm())
    # no curvature in the outputs anywhere (a hinge loss's kinks: a tester's SVM at its optimum
    # read 0 here, its step 1.6 x ||theta*||, its scores 10x the leave-one-out changes):
    # the residuals' actual change along the step instead (a forward pass of the sample)
    kinked = float(shift.max()) == 0 and float(residual.max()) > 0 and step > 0
    if kinked:
        shift = torch.cat(
            [
                _residual_jump(fitted, batch, d)
                for batch in fitted.train.batches(fitted.pass_batch_size, indices)
            ]
        )
    pooled = _ratio(float(shift.square().sum()) ** 0.5, float(residual.square().sum()) ** 0.5)
    # the typical example's too: one residual far larger than the others (a corrupted target)
    # dominates both pooled sums, and a tester's read 0.24 while every other example's score
    # moved by 100%; not at kinks, where most residuals are 0 (a hinge's examples beyond the
    # margin: the typical ratio read "inf%", a reviewer's)
    typical = 0.0 if kinked else _ratio(float(shift.median()), float(residual.median()))
    theta = float(fitted.theta.norm())
    return Drift(
        step=step,
        relative_step=step / max(theta, 1e-300),
        residual_shift=max(pooled, typical),
        kinked=kinked,
    )


def _residual_jump(fitted: Fitted, batch: Batch, d: Tensor) -> Tensor:
    """``||dl_i/df (theta* - d) - dl_i/df (theta*)||`` [B]: the residuals' change at the step's
    end (:attr:`Drift.kinked`)."""
    engine = fitted.engine
    inputs, targets = engine.prepare(batch)
    here = engine.params()
    moved = fitted.space.unflatten(fitted.theta.to(torch.float64) - d.to(fitted.theta.device))
    there = {name: moved[name].to(value.dtype) for name, value in here.items()}
    residuals = []
    for at in (here, there):
        with torch.no_grad(), evaluation_mode(fitted.task.model):
            f = engine.call(at, inputs).detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fitted.task.checked_loss(f, targets).sum(), f)
        residuals.append(g.to(torch.float64).reshape(len(g), -1))
    return (residuals[1] - residuals[0]).norm(dim=1)


def _ratio(shift: float, residual: float) -> float:
    """``shift / residual``; 0 where both are 0 (nothing moves), infinite where only the
    residual is."""
    if residual > 0:
        return shift / residual
    return 0.0 if shift == 0 else float("inf")


def _residual_and_shift(fitted: Fitted, batch: Batch, d: Tensor) -> tuple[Tensor, Tensor]:
    """``dl_i/df`` and ``Lambda_i J_i d`` [B, C] (Lambda_i applied by double backward, never
    formed: C may be a sequence of vocabulary logits)."""
    engine = fitted.engine
    _, targets = engine.prepare(batch)
    out = engine.outputs(batch)
    jd = engine.jvp(batch, d).reshape(out.shape)
    with torch.enable_grad():
        f = out.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fitted.task.checked_loss(f, targets).sum(), f, create_graph=True)
        if not g.requires_grad:  # a loss linear in the outputs: Lambda = 0
            return g.detach(), torch.zeros_like(g)
        (shift,) = torch.autograd.grad((g * jd.to(g.dtype)).sum(), f)
    return g.detach(), shift.detach()
