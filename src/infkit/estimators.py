"""Estimators on top of any method's inverse curvature (methods.md §0, §2.3, §5, §6.1).

All parameter changes are *removal effects* (sign +, 1/N included). With the mean-form objective
``L = (1/N) sum_i l_i + (l2/2) ||theta||^2`` and the attributed training gradient
``v_j = grad l_j + l2 theta`` (the example's loss plus its share of the regulariser):

* ``"if"``:      Delta theta_j = (1/N) H^{-1} v_j, H = (1/N) sum_i C_i + (l2 + damping) I;
* ``"rif"``:     Delta theta_j = (1/N) (H - (1/N) J_j^T Lambda_j J_j)^{-1} v_j, the IF with the
  removed example's own data curvature taken out (the multi-output leverage-block form of
  Rubinstein & Hopkins), via a C x C Woodbury correction;
* ``"newton"``:  Delta theta_F = -H_R^{-1} grad L_R(theta*), in mean-over-N form
  H_R^{-1} [(1/N) sum_{j in F} v_j - grad L(theta*)], one Newton step on the retained objective
  (H_R drops F's curvature and its l2 share; grad L(theta*) = 0 at an exact optimum): exact for
  quadratic losses, for groups too;
* ``"relatif"``: u_j / ||u_j|| (theta-relative) or u_j / sqrt(v_j^T u_j) (loss-relative) with
  u_j = H^{-1} v_j. These are directions, not removal effects: no counterfactual units.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import CurvatureError, UnsupportedError
from infkit.gradients import PerExample
from infkit.methods.base import InverseCurvature

ESTIMATORS = ("if", "rif", "newton", "relatif")
RELATIF_NORMS = ("theta", "loss")
#: largest leverage (eigenvalue of Lambda_j M_j / N) accepted before RIF/Newton blow up
MAX_LEVERAGE = 1.0 - 1e-8


@dataclass
class FittedState:
    """What estimators need after ``fit``: the method, the data, theta and the objective."""

    method: InverseCurvature
    engine: PerExample
    train: ExampleSet
    theta: Tensor  # [P], float64
    l2: float
    batch_size: int
    #: [N, P] loss gradients when they fit in memory, in :func:`cache_dtype` of the model
    train_grad_cache: Tensor | None = None
    #: grad L(theta*) [P], the full objective's gradient (0 at an exact optimum). The Newton
    #: step uses the retained objective's actual gradient, so it stays exact when theta* is a
    #: slightly loose optimum.
    objective_gradient: Tensor | None = None
    #: theta' [P], the regulariser's anchor (None: 0); the objective is (l2/2)||theta - theta'||^2
    anchor: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.train)

    @property
    def regularised_theta(self) -> Tensor:
        """theta - theta' [P] float64 (theta' the regulariser's anchor, 0 by default)."""
        return self.theta if self.anchor is None else self.theta - self.anchor

    def loss_grads(self, batch: Batch) -> Tensor:
        """grad l_j for the batch, [B, P] float64 (no regulariser share)."""
        if self.train_grad_cache is not None:
            return self.train_grad_cache[batch.indices].to(torch.float64)
        return self.engine.grads(batch, "loss").to(torch.float64)

    def attributed_grads(self, batch: Batch) -> Tensor:
        """v_j = grad l_j + l2 (theta - theta'), [B, P] float64."""
        return self.loss_grads(batch) + self.l2 * self.regularised_theta

    def attributed_products(self, U: Tensor) -> Tensor:
        """U v_j^T for every training example j: [k, N] float64, for U of shape [k, P].

        With the gradient cache this is one matrix product in the cache's dtype (float32 for a
        float32 model: the gradients carry no more precision than that), plus the regulariser
        share l2 U (theta - theta') added in float64; otherwise it streams the gradients.
        """
        U = U.to(torch.float64)
        shared = self.l2 * (U @ self.regularised_theta.to(U)) if self.l2 else None
        if self.train_grad_cache is not None:
            G = self.train_grad_cache
            S = (U.to(G.dtype) @ G.T).to(torch.float64)
        else:
            S = torch.empty(U.shape[0], self.n, dtype=torch.float64, device=U.device)
            for batch in self.train.batches(self.batch_size):
                S[:, batch.indices] = U @ self.loss_grads(batch).T
        return S if shared is None else S + shared.unsqueeze(1)

    def jacobians_and_lambdas(self, batch: Batch) -> tuple[Tensor, Tensor]:
        J = self.engine.jacobians(batch).to(torch.float64)
        _, _, lam = self.engine.output_derivatives(batch)
        return J, lam.to(torch.float64)


def cache_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """dtype of the [N, P] training-gradient cache: float64 for float64 models, else float32."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def check_estimator(method: InverseCurvature, estimator: str) -> None:
    """Raise UnsupportedError for an unknown estimator or a pair the method cannot compute."""
    from infkit.methods import registered

    if estimator not in ESTIMATORS:
        raise UnsupportedError(
            f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}"
        )
    if estimator not in method.estimators:
        pairs = [
            f"{name}+{est}"
            for name, cls in sorted(registered().items())
            for est in cls.estimators
            if est == estimator
        ]
        raise UnsupportedError(
            f"method {method.name!r} cannot compute estimator {estimator!r}; it supports "
            f"{', '.join(method.estimators)}. Methods that support {estimator!r}: "
            f"{', '.join(pairs) or 'none'}"
        )
    if estimator == "rif" and method.curvature == "hessian":
        raise UnsupportedError(
            "estimator 'rif' needs a positive semidefinite curvature to define leverages; the "
            "true Hessian can give leverages below 0 or above 1. Use curvature='ggn' with rif, "
            "or estimator='newton' with the Hessian"
        )


def downdate_solve(
    method: InverseCurvature, V: Tensor, J: Tensor, lam: Tensor, n: int, shift: float
) -> tuple[Tensor, Tensor]:
    """(A - (1/N) J_b^T Lambda_b J_b)^{-1} v_b for every row b, with A = H + shift I.

    Woodbury with the C x C leverage blocks M_b = J_b A^{-1} J_b^T (Lambda_b may be singular):
    ``A^{-1} v + W^T (I - Lambda M / N)^{-1} (Lambda / N) J A^{-1} v`` with W = J A^{-1}.

    Args:
        V: [B, P]; J: [B, C, P]; lam: [B, C, C]; n: N; shift: added to the ridge of H.

    Returns:
        the solutions [B, P] and the leverages tr(Lambda_b M_b) / N [B].
    """
    b, c, p = J.shape
    W = method.solve(J.reshape(b * c, p), shift).reshape(b, c, p)
    w = method.solve(V, shift)
    M = torch.einsum("bcp,bdp->bcd", J, W)
    M = 0.5 * (M + M.transpose(1, 2))
    LM = lam @ M / n
    eig = torch.linalg.eigvals(LM).real
    worst = eig.max(dim=1).values
    if bool((worst >= MAX_LEVERAGE).any()):
        k = int(worst.argmax())
        raise CurvatureError(
            f"an example's leverage reached {float(worst[k]):.6f} >= 1: the model interpolates "
            "it, so removing it is not a small change and rif/newton are undefined. Increase "
            "l2 or damping"
        )
    eye = torch.eye(c, dtype=J.dtype, device=J.device).expand(b, c, c)
    Jw = torch.einsum("bcp,bp->bc", J, w)
    coef = torch.linalg.solve(eye - LM, (lam @ Jw.unsqueeze(-1)) / n).squeeze(-1)
    return w + torch.einsum("bcp,bc->bp", W, coef), torch.diagonal(LM, dim1=1, dim2=2).sum(-1)


def removal_deltas(
    state: FittedState, estimator: str, indices: Tensor | None = None, relatif: str = "theta"
) -> Iterator[tuple[Batch, Tensor]]:
    """Per-example removal parameter changes Delta theta_j ([B, P] float64), batch by batch.

    For ``"relatif"`` the rows are the normalised directions instead (no units).
    """
    method, n = state.method, state.n
    for batch in state.train.batches(state.batch_size, indices):
        v = state.attributed_grads(batch)
        if estimator == "if":
            yield batch, method.solve(v) / n
        elif estimator == "relatif":
            u = method.solve(v)
            yield batch, relatif_directions(u, v, relatif, batch)
        elif estimator == "rif":
            J, lam = state.jacobians_and_lambdas(batch)
            delta, _ = downdate_solve(method, v, J, lam, n, shift=0.0)
            yield batch, delta / n
        elif estimator == "newton":
            if state.objective_gradient is not None:
                v = v - n * state.objective_gradient
            if method.curvature == "hessian":
                rows = [
                    _retained_or_raise(method, v[k : k + 1] / n, batch.indices[k : k + 1])
                    for k in range(len(batch))
                ]
                yield batch, torch.cat(rows)
            else:
                J, lam = state.jacobians_and_lambdas(batch)
                delta, _ = downdate_solve(method, v, J, lam, n, shift=-state.l2 / n)
                yield batch, delta / n
        else:  # pragma: no cover - guarded by check_estimator
            raise UnsupportedError(estimator)


def relatif_directions(u: Tensor, v: Tensor, norm: str, batch: Batch) -> Tensor:
    """u_j / ||u_j|| (``"theta"``) or u_j / sqrt(v_j^T u_j) (``"loss"``)."""
    if norm == "theta":
        scale = u.norm(dim=1)
    elif norm == "loss":
        scale = (u * v).sum(dim=1).clamp_min(0).sqrt()
    else:
        raise UnsupportedError(f"unknown relatif norm {norm!r}; use one of {RELATIF_NORMS}")
    tiny = scale <= torch.finfo(scale.dtype).tiny
    if bool(tiny.any()):
        i = int(batch.indices[tiny.nonzero()[0, 0]])
        raise CurvatureError(
            f"training example {i} has a zero attributed gradient, so its RelatIF score is 0/0; "
            "it has no influence at all (exclude it)"
        )
    return u / scale.unsqueeze(1)


def _retained_or_raise(method: InverseCurvature, V: Tensor, group: Tensor) -> Tensor:
    out = method.solve_retained(V, group)
    if out is None:
        raise UnsupportedError(
            f"method {method.name!r} with curvature {method.curvature!r} cannot form the "
            "retained curvature needed by estimator 'newton'"
        )
    return out


def group_delta(state: FittedState, estimator: str, indices: Tensor) -> Tensor:
    """Delta theta [P] (float64) for removing the group ``indices`` jointly."""
    method, n = state.method, state.n
    if estimator == "relatif":
        raise UnsupportedError(
            "estimator 'relatif' gives normalised scores with no counterfactual units, so it "
            "cannot predict a removal; use estimator 'if', 'rif' or 'newton' for remove()"
        )
    if estimator in ("if", "rif"):
        # IF is linear in the group; RIF is additive over the group (Rubinstein & Hopkins).
        total = torch.zeros_like(state.theta)
        if estimator == "if":
            for batch in state.train.batches(state.batch_size, indices):
                total += state.attributed_grads(batch).sum(0)
            return method.solve(total.unsqueeze(0))[0] / n
        for _, delta in removal_deltas(state, "rif", indices):
            total += delta.sum(0)
        return total
    # Newton step on the retained objective.
    v = torch.zeros_like(state.theta)
    for batch in state.train.batches(state.batch_size, indices):
        v += state.attributed_grads(batch).sum(0)
    v = v / n
    if state.objective_gradient is not None:
        v = v - state.objective_gradient
    v = v.unsqueeze(0)
    direct = method.solve_retained(v, indices)
    if direct is not None:
        return direct[0]
    if method.curvature == "hessian":
        _retained_or_raise(method, v, indices)
    Js, lams = [], []
    for batch in state.train.batches(state.batch_size, indices):
        J, lam = state.jacobians_and_lambdas(batch)
        Js.append(J)
        lams.append(lam)
    J = torch.cat(Js)  # [N_F, C, P]
    n_f, c, p = J.shape
    lam = torch.block_diag(*torch.cat(lams))
    delta, _ = downdate_solve(
        method, v, J.reshape(1, n_f * c, p), lam.unsqueeze(0), n, shift=-n_f * state.l2 / n
    )
    return delta[0]


def leverages(state: FittedState) -> Tensor:
    """Generalised leverages h_j = tr(Lambda_j J_j H^{-1} J_j^T) / N, [N] float64.

    For ordinary least squares this is the diagonal of the hat matrix; RIF divides by 1 - h_j.
    """
    out = torch.empty(state.n, dtype=torch.float64)
    for batch in state.train.batches(state.batch_size):
        J, lam = state.jacobians_and_lambdas(batch)
        b, c, p = J.shape
        W = state.method.solve(J.reshape(b * c, p)).reshape(b, c, p)
        M = torch.einsum("bcp,bdp->bcd", J, W)
        out[batch.indices] = torch.diagonal(lam @ M, dim1=1, dim2=2).sum(-1).cpu() / state.n
    return out
