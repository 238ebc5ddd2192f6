"""The estimators IF, RIF, Newton step and RelatIF, built on any inverse curvature.

Everything here needs only a way to apply the inverse damped curvature (the
:class:`InverseCurvature` protocol: ``solve`` and, optionally, ``solve_retained``) and the
:class:`~infkit.fitted.Fitted` record. Parameter-space methods get all four estimators from it
(docs/estimators.md). All parameter changes are *removal effects* (sign +, 1/N included). With
the mean-form objective ``L = (1/N) sum_i l_i + (l2/2) ||theta - theta'||^2`` and the attributed
training gradient ``v_j = grad l_j + l2 (theta - theta')``:

* ``"if"``:      ``Delta theta_j = (1/N) H^{-1} v_j``, ``H = (1/N) sum_i C_i + (l2 + damping) I``;
* ``"rif"``:     ``Delta theta_j = (1/N) (H - (1/N) J_j^T Lambda_j J_j)^{-1} v_j``: the IF with the
  removed example's own curvature taken out, by a C x C Woodbury correction (the leverage block);
* ``"newton"``:  ``Delta theta_F = H_R^{-1} [(1/N) sum_{j in F} v_j - grad L(theta*)]``, one Newton
  step on the retained objective (H_R drops F's curvature and its l2 share): exact for quadratic
  losses, groups included;
* ``"relatif"``: ``u_j / ||u_j||`` (theta-normalised) or ``u_j / sqrt(v_j^T u_j)``
  (loss-normalised), ``u_j = H^{-1} v_j``: directions, with no counterfactual units.

RIF and the per-example Newton step downdate ``J_j^T Lambda_j J_j`` from the method's H; that is
exact only when H contains each example's exact curvature block
(``InverseCurvature.exact_example_curvature``); for an approximate curvature (K-FAC) the
downdate is an approximation too, and a leverage >= 1 says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import CurvatureError, Notice, UnsupportedError, warn
from infkit.fitted import Fitted
from infkit.progress import track

EstimatorName = Literal["if", "rif", "newton", "relatif"]
ESTIMATORS: tuple[EstimatorName, ...] = ("if", "rif", "newton", "relatif")
RelatifNorm = Literal["theta", "loss"]
RELATIF_NORMS: tuple[RelatifNorm, ...] = ("theta", "loss")
#: largest leverage (eigenvalue of Lambda_j M_j / N) accepted before RIF/Newton blow up
MAX_LEVERAGE = 1.0 - 1e-8
#: seconds the rest of a pass of solves per training example must be expected to take, at the
#: first batch's pace, before :class:`SolvePace` says so
SLOW_SOLVES_SECONDS = 60.0


@dataclass(frozen=True)
class Estimator:
    """Which estimator answers, and RelatIF's normalisation.

    Attributes:
        name: ``"if"``, ``"rif"``, ``"newton"`` or ``"relatif"``.
        relatif: ``"theta"`` or ``"loss"``, the normalisation of ``"relatif"``.
    """

    name: EstimatorName = "if"
    relatif: RelatifNorm = "theta"

    def __post_init__(self) -> None:
        if self.name not in ESTIMATORS:
            raise UnsupportedError(
                f"unknown estimator {self.name!r}; valid estimators: {', '.join(ESTIMATORS)}"
            )
        if self.relatif not in RELATIF_NORMS:
            raise UnsupportedError(
                f"unknown relatif norm {self.relatif!r}; use one of {', '.join(RELATIF_NORMS)}"
            )

    @property
    def counterfactual(self) -> bool:
        """Whether the estimator predicts a removal in the measured quantity's units."""
        return self.name != "relatif"

    def require_counterfactual(self) -> None:
        """Raise for ``"relatif"``, which cannot predict a removal."""
        if not self.counterfactual:
            raise UnsupportedError(
                "estimator 'relatif' gives normalised scores with no counterfactual units, so it "
                "cannot predict a removal; use estimator 'if', 'rif' or 'newton' for remove()"
            )


class InverseCurvature(Protocol):
    """A way of applying the inverse of the damped mean-form curvature to vectors in R^P."""

    @property
    def name(self) -> str:
        """The method's name, for messages."""
        ...

    @property
    def curvature(self) -> str:
        """``"ggn"`` or ``"hessian"`` (or another name for what the method's H approximates)."""
        ...

    @property
    def exact_example_curvature(self) -> bool:
        """Whether H contains every example's exact curvature block (RIF/Newton exact)."""
        ...

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """``(H + (l2 + damping + shift) I)^{-1} V`` for V [k, P], float64."""
        ...

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor | None:
        """``H_R^{-1} V`` for the retained curvature without ``group``, or None."""
        ...


# ------------------------------------------------------------------------------ downdates
def downdate_solve(
    inverse: InverseCurvature,
    V: Tensor,
    J: Tensor,
    lam: Tensor,
    n: int,
    shift: float,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A - (1/N) J_b^T Lambda_b J_b)^{-1} v_b`` for every row b, with ``A = H + shift I``.

    Woodbury with the C x C leverage blocks ``M_b = J_b A^{-1} J_b^T`` (Lambda_b may be
    singular): ``A^{-1} v + W^T (I - Lambda M / N)^{-1} (Lambda / N) J A^{-1} v`` with
    ``W = J A^{-1}``.

    Args:
        inverse: the method's inverse curvature.
        V: [B, P]; J: [B, C, P]; lam: [B, C, C]; n: N; shift: added to the ridge of H.
        indices: the training examples of the rows, for error messages (None: a group).

    Returns:
        the solutions [B, P] and the leverages ``tr(Lambda_b M_b) / N`` [B].
    """
    b, c, p = J.shape
    W = inverse.solve(J.reshape(b * c, p), shift).reshape(b, c, p)
    w = inverse.solve(V, shift)
    M = torch.einsum("bcp,bdp->bcd", J, W)
    M = 0.5 * (M + M.transpose(1, 2))
    LM = lam @ M / n
    check_leverage(LM, indices, inverse)
    eye = torch.eye(c, dtype=J.dtype, device=J.device).expand(b, c, c)
    Jw = torch.einsum("bcp,bp->bc", J, w)
    coef = torch.linalg.solve(eye - LM, (lam @ Jw.unsqueeze(-1)) / n).squeeze(-1)
    return w + torch.einsum("bcp,bc->bp", W, coef), torch.diagonal(LM, dim1=1, dim2=2).sum(-1)


def check_leverage(
    LM: Tensor, indices: Tensor | None, inverse: InverseCurvature | None = None
) -> None:
    """Raise CurvatureError when a leverage block ``Lambda_j M_j / N`` has an eigenvalue >= 1.

    ``indices`` names the training examples of the rows (None: the rows are one removed group).
    The message depends on whether the curvature holds the examples' exact curvature.
    """
    # each block scaled to entries of order 1 first (eigenvalues scale with it): a saturated
    # example's block, all of it near 1e-189, made LAPACK fail to converge
    scale = LM.abs().amax(dim=(1, 2))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    worst = torch.linalg.eigvals(LM / scale[:, None, None]).real.max(dim=1).values * scale
    if not bool((worst >= MAX_LEVERAGE).any()):
        return
    k = int(worst.argmax())
    who = "the removed group" if indices is None else f"training example {int(indices[k])}"
    if inverse is not None and not inverse.exact_example_curvature:
        raise CurvatureError(
            f"{who} has leverage {float(worst[k]):.6f} >= 1 against method {inverse.name!r}'s "
            "curvature, which approximates the data curvature and need not contain the example's "
            "own exact curvature block: rif/newton downdate that block, so they are unreliable "
            "here. Use estimator 'if', or for rif/newton a method whose curvature holds every "
            "example's exact block ('exact_curvature' in infkit.methods()), or increase damping"
        )
    raise CurvatureError(
        f"{who} has leverage {float(worst[k]):.6f} >= 1: the model interpolates it, so removing "
        "it is not a small change and rif/newton are undefined. Increase l2 or damping"
    )


# ------------------------------------------------------------------------------ per example
#: an attributed gradient below this many machine epsilons of its terms' size
#: (:meth:`~infkit.fitted.Fitted.attributed_grads_and_terms`) is zero to rounding: the
#: gradient's own rounding follows the larger numbers it is computed from (a residual f - y of
#: outputs near 1: a tester's single example at the optimum read 300 epsilons of its terms)
ROUNDING_EPSILONS = 1000
#: ... and at most this share of them: below float64 a thousand epsilons is a real gradient's
#: size (bfloat16's is 7.8 times the terms, which every v_j is below; a reviewer's float32
#: example at 7.5e-5 of its terms was genuine), so there only a cancellation to 10 digits is
#: taken for zero
ROUNDING_SHARE = 1e-10


def relatif_directions(
    u: Tensor, v: Tensor, norm: RelatifNorm, batch: Batch, terms: Tensor, dtype: torch.dtype
) -> Tensor:
    """``u_j / ||u_j||`` (``"theta"``) or ``u_j / sqrt(v_j^T u_j)`` (``"loss"``); ``terms``:
    the size of each v_j's terms, computed in ``dtype`` (the model's), below whose rounding a
    v_j is zero: its direction would be that rounding, normalised to an O(1) score (a tester's
    single example at the optimum, v = 3e-16: RelatIF scores 0.19 and 2.66)."""
    scale = u.norm(dim=1) if norm == "theta" else (u * v).sum(dim=1).clamp_min(0).sqrt()
    share = min(ROUNDING_EPSILONS * torch.finfo(dtype).eps, ROUNDING_SHARE)
    floor = share * terms.to(v)
    zero = (scale <= torch.finfo(scale.dtype).tiny) | (v.norm(dim=1) <= floor)
    if bool(zero.any()):
        k = int(zero.nonzero()[0, 0])
        size = float(v[k].norm())
        exactly = (
            ""
            if size == 0
            else f" to rounding ({size:.2g} against its terms' {float(terms[k]):.2g})"
        )
        raise CurvatureError(
            f"training example {int(batch.indices[k])} has a zero attributed gradient{exactly}, "
            "so its RelatIF score is 0/0; it has no influence at all (exclude it)"
        )
    return u / scale.unsqueeze(1)


def _retained_or_raise(inverse: InverseCurvature, V: Tensor, group: Tensor) -> Tensor:
    out = inverse.solve_retained(V, group)
    if out is None:
        raise UnsupportedError(
            f"method {inverse.name!r} with curvature {inverse.curvature!r} cannot form the "
            "retained curvature needed by estimator 'newton'"
        )
    return out


@dataclass
class SolveCall:
    """One answer's passes of solves per training example, as the facade takes it: a pass per
    chunk of queries (``Influence.scores`` in chunks under ``memory_limit``), told once."""

    passes: int = 1
    told: bool = False


class SolvePace:
    """Times the first batch of a pass that solves a system per training example and, where
    the method solves by iterations (``cg``, ``lissa``, ``astra``: not ``cheap_solve``) and the
    rest of the answer (every pass of its :class:`SolveCall`, the method's ``solve_call``) is
    expected to take over :data:`SLOW_SOLVES_SECONDS`, says so once with the way out: a
    tester's RIF scores by ``lissa`` on 300 examples ran for minutes (cg: 17 s) with nothing
    but progress lines, where a direct method answers the same at once.

    ``direct``: the methods that answer the question directly; ``also``: another way out."""

    def __init__(
        self,
        inverse: InverseCurvature,
        what: str,
        examples: int,
        direct: str = "exact, dual, ekfac, kfac",
        also: str = "",
    ) -> None:
        self.iterative = not getattr(inverse, "cheap_solve", True)
        self.call: SolveCall = getattr(inverse, "solve_call", None) or SolveCall()
        self.method, self.what, self.examples = inverse.name, what, examples
        self.direct, self.also = direct, also
        self.started: float | None = None

    def start(self) -> None:
        """Mark the start of a batch (only the answer's first is timed)."""
        if self.started is None:
            self.started = time.perf_counter()

    def done(self, size: int) -> None:
        """After the answer's first batch of ``size`` examples: the notice, if the rest is
        slow."""
        if self.call.told or self.started is None or not self.iterative:
            return
        self.call.told = True
        seconds = time.perf_counter() - self.started
        total = self.examples * self.call.passes
        rest = seconds * (total - size) / max(size, 1)
        if rest <= SLOW_SOLVES_SECONDS:
            return
        passes = f" in each of {self.call.passes} chunks of queries" if self.call.passes > 1 else ""
        warn(
            f"{self.what} by {self.method!r}: a system per training example{passes}, each "
            f"solved by its iterations; the first {size} of {total:,} took {seconds:.1f} s, so "
            f"the rest takes about {rest / 60:.0f} min more. A direct method ({self.direct}) "
            "answers them at once" + (f"; {self.also}" if self.also else ""),
            Notice,
        )


def removal_deltas(
    inverse: InverseCurvature,
    fitted: Fitted,
    estimator: Estimator,
    indices: Tensor | None = None,
    also: str = "",
) -> Iterator[tuple[Batch, Tensor]]:
    """Per-example removal parameter changes ``Delta theta_j`` ([B, P] float64), batch by batch.

    For ``"relatif"`` the rows are the normalised directions instead (no units). ``also``:
    another way out for :class:`SolvePace`'s notice.
    """
    n = fitted.n
    examples = n if indices is None else len(indices)
    if estimator.name == "rif" or (estimator.name == "newton" and inverse.curvature != "hessian"):
        fitted.warn_jacobian_cost(estimator.name, examples)
    # (dual answers no RelatIF)
    direct = "exact, ekfac, kfac" if estimator.name == "relatif" else "exact, dual, ekfac, kfac"
    pace = SolvePace(inverse, f"estimator {estimator.name!r}", examples, direct, also)
    for batch in fitted.train.batches(fitted.training_gradient_batch_size, indices):
        pace.start()
        delta = _removal_delta(inverse, fitted, estimator, batch)
        pace.done(len(batch))
        yield batch, delta


def _removal_delta(
    inverse: InverseCurvature, fitted: Fitted, estimator: Estimator, batch: Batch
) -> Tensor:
    """:func:`removal_deltas` of one batch of training examples."""
    n = fitted.n
    v, terms = fitted.attributed_grads_and_terms(batch)
    if estimator.name == "if":
        return inverse.solve(v) / n
    if estimator.name == "relatif":
        u = inverse.solve(v)
        return relatif_directions(u, v, estimator.relatif, batch, terms, fitted.space.dtype)
    if estimator.name == "rif":
        J, lam = fitted.jacobians_and_lambdas(batch, estimator.name)
        delta, _ = downdate_solve(inverse, v, J, lam, n, 0.0, batch.indices)
        return delta / n
    # newton
    if fitted.objective_gradient is not None:
        v = v - n * fitted.objective_gradient
    if inverse.curvature == "hessian":
        rows = [
            _retained_or_raise(inverse, v[k : k + 1] / n, batch.indices[k : k + 1])
            for k in range(len(batch))
        ]
        return torch.cat(rows)
    J, lam = fitted.jacobians_and_lambdas(batch, estimator.name)
    delta, _ = downdate_solve(inverse, v, J, lam, n, -fitted.l2 / n, batch.indices)
    return delta / n


# ------------------------------------------------------------------------------ answers
def scores(
    inverse: InverseCurvature, fitted: Fitted, queries: ExampleSet, estimator: Estimator
) -> Tensor:
    """Removal effects of every training example on every query measurement, [T, N] float64."""
    Q = fitted.query_gradients(queries)
    if estimator.name == "if":
        U = inverse.solve(Q)  # H^{-1} grad m_t, one solve per query
        return fitted.attributed_products(U) / fitted.n
    S = torch.empty(Q.shape[0], fitted.n, dtype=torch.float64)
    total = -(-fitted.n // fitted.training_gradient_batch_size)
    also = "scores with estimator 'if' solve one system per query"
    deltas = removal_deltas(inverse, fitted, estimator, also=also)
    for batch, delta in track(deltas, fitted.progress, estimator.name, total):
        S[:, batch.indices] = (Q @ delta.T).cpu()
    return S


def relatif_and_self_scores(
    inverse: InverseCurvature, fitted: Fitted, queries: ExampleSet, norm: RelatifNorm
) -> tuple[Tensor, Tensor]:
    """RelatIF scores [T, N] and the IF self-scores [N] (float64) from one solve per training
    example: ``u_j = H^{-1} v_j`` gives both the RelatIF direction (:func:`relatif_directions`)
    and ``(1/N) grad l_j^T u_j``, where :func:`scores` with ``"relatif"`` and
    :func:`self_scores` with ``"if"`` each solve for every ``u_j``."""
    Q = fitted.query_gradients(queries)
    n = fitted.n
    S = torch.empty(Q.shape[0], n, dtype=torch.float64)
    own = torch.empty(n, dtype=torch.float64)
    total = -(-n // fitted.training_gradient_batch_size)
    batches = fitted.train.batches(fitted.training_gradient_batch_size)
    pace = SolvePace(inverse, "RelatIF and self-scores", n, "exact, ekfac, kfac")
    for batch in track(batches, fitted.progress, "relatif and self-scores", total):
        pace.start()
        v, terms = fitted.attributed_grads_and_terms(batch)
        u = inverse.solve(v)
        # grad l_j = v_j less the regulariser share (not the gradients taken a second time)
        own[batch.indices] = ((v - fitted.l2 * fitted.regularised_theta) * u).sum(1).cpu() / n
        directions = relatif_directions(u, v, norm, batch, terms, fitted.space.dtype)
        S[:, batch.indices] = (Q @ directions.T).cpu()
        pace.done(len(batch))
    return S, own


def self_scores(inverse: InverseCurvature, fitted: Fitted, estimator: Estimator) -> Tensor:
    """Removal effect of each training example on its own loss, [N] float64."""
    out = torch.empty(fitted.n, dtype=torch.float64)
    total = -(-fitted.n // fitted.training_gradient_batch_size)
    deltas = removal_deltas(inverse, fitted, estimator)
    for batch, delta in track(deltas, fitted.progress, "self-scores", total):
        out[batch.indices] = (fitted.loss_grads(batch) * delta).sum(1).cpu()
    return out


def group_delta(
    inverse: InverseCurvature, fitted: Fitted, estimator: Estimator, indices: Tensor
) -> Tensor:
    """``Delta theta`` [P] (float64) for removing the group ``indices`` jointly."""
    estimator.require_counterfactual()
    n = fitted.n
    if estimator.name in ("if", "rif"):
        # IF is linear in the group; RIF is additive over the group (Rubinstein & Hopkins).
        total = fitted.zeros()
        if estimator.name == "if":
            for batch in fitted.train.batches(fitted.training_gradient_batch_size, indices):
                total += fitted.attributed_grads(batch).sum(0)
            return inverse.solve(total.unsqueeze(0))[0] / n
        for _, delta in removal_deltas(inverse, fitted, estimator, indices):
            total += delta.sum(0)
        return total
    # Newton step on the retained objective.
    v = fitted.zeros()
    for batch in fitted.train.batches(fitted.training_gradient_batch_size, indices):
        v += fitted.attributed_grads(batch).sum(0)
    v = v / n
    if fitted.objective_gradient is not None:
        v = v - fitted.objective_gradient
    v = v.unsqueeze(0)
    direct = inverse.solve_retained(v, indices)
    if direct is not None:
        return direct[0]
    if inverse.curvature == "hessian":
        _retained_or_raise(inverse, v, indices)
    fitted.require_jacobian_room(len(indices), estimator.name, joint=True)
    fitted.warn_jacobian_cost(estimator.name, len(indices))
    Js, lams = [], []
    for batch in fitted.train.batches(fitted.training_gradient_batch_size, indices):
        J, lam = fitted.jacobians_and_lambdas(batch, estimator.name, checked=True)
        Js.append(J)
        lams.append(lam)
    J = torch.cat(Js)  # [N_F, C, P]
    n_f, c, p = J.shape
    blocks = torch.block_diag(*torch.cat(lams))
    delta, _ = downdate_solve(
        inverse, v, J.reshape(1, n_f * c, p), blocks.unsqueeze(0), n, shift=-n_f * fitted.l2 / n
    )
    return delta[0]


def leverages(inverse: InverseCurvature, fitted: Fitted) -> Tensor:
    """Generalised leverages ``h_j = tr(Lambda_j J_j H^{-1} J_j^T) / N``, [N] float64.

    For ordinary least squares this is the diagonal of the hat matrix; RIF divides by 1 - h_j.
    """
    out = torch.empty(fitted.n, dtype=torch.float64)
    pace = SolvePace(inverse, "leverages", fitted.n)
    for batch in fitted.train.batches(fitted.batch_size):
        pace.start()
        J, lam = fitted.jacobians_and_lambdas(batch, "rif")
        b, c, p = J.shape
        W = inverse.solve(J.reshape(b * c, p)).reshape(b, c, p)
        M = torch.einsum("bcp,bdp->bcd", J, W)
        out[batch.indices] = torch.diagonal(lam @ M, dim1=1, dim2=2).sum(-1).cpu() / fitted.n
        pace.done(len(batch))
    return out
