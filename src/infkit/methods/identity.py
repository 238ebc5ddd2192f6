"""method="identity": no curvature (H = I), i.e. the gradient dot product; and TracInCP.

Without checkpoints, scores are ``(1/N) grad m(z_t)^T grad l~_j``: what influence would be if the
curvature were the identity. With estimator ``"relatif"`` this becomes the gradient cosine
(methods.md §6.1). ``l2`` still enters the attributed training gradient
(``grad l~_j = grad l_j + l2 theta``) but not the curvature; ``damping`` is ignored.

With ``checkpoints`` (and their ``learning_rates``), this is **TracInCP** (Pruthi et al. 2020;
methods.md §6.4), in infkit's units:

    scores[t, j] = (1/N) sum_k eta_k  grad m_t(w_k)^T (grad l_j(w_k) + l2 w_k).

Units: full-batch gradient descent on ``mean_i l_i + (l2/2)||w||^2`` moves the parameters at step
k by ``-eta_k (1/N) sum_i grad l~_i(w_k)``; dropping example j from that step changes the step by
``+eta_k (1/N) grad l~_j(w_k)`` and, to first order, the test measurement by
``eta_k (1/N) grad m_t(w_k)^T grad l~_j(w_k)``. So the score is the first-order **removal effect
summed over the listed steps**, ignoring how an early change propagates through later steps (it is
not the counterfactual of the final model, and the Adam preconditioner is ignored). It is the
paper's TracInCP divided by N (and with the regulariser share added): the sign is the paper's
(> 0: a proponent, removing j raises t's loss). If the checkpoints are saved every c steps, pass
``c * eta`` as the learning rate to account for the steps in between.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from infkit.checkpoints import Checkpoint, checkpoint_vector, parameters_at
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.estimators import group_delta, removal_deltas
from infkit.methods import register
from infkit.methods.base import DirectMethod, FitContext


@register
class Identity(DirectMethod):
    """The identity as inverse curvature: gradient similarity, or TracInCP over checkpoints.

    Args:
        checkpoints: optional list of checkpoints ``w_k`` (``model.state_dict()`` copies or flat
            [P] parameter vectors); when given, the method is TracInCP.
        learning_rates: ``eta_k``, one per checkpoint (a single number is used for all).
    """

    name = "identity"
    estimators = ("if", "relatif")
    summary = (
        "gradient dot product (H = I); with relatif, gradient cosine; TracInCP over checkpoints"
    )
    scales = True
    curvature = "identity"

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint] | None = None,
        learning_rates: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__()
        if checkpoints is not None:
            checkpoints = list(checkpoints)
            if not checkpoints:
                raise InvalidInputError("checkpoints is empty; pass at least one, or None")
            if learning_rates is None:
                raise InvalidInputError(
                    "TracInCP needs the learning rate of each checkpoint: pass learning_rates"
                )
            if isinstance(learning_rates, (int, float)):
                learning_rates = [float(learning_rates)] * len(checkpoints)
            learning_rates = [float(r) for r in learning_rates]
            if len(learning_rates) != len(checkpoints):
                raise InvalidInputError(
                    f"{len(checkpoints)} checkpoints but {len(learning_rates)} learning rates"
                )
        elif learning_rates is not None:
            raise InvalidInputError("learning_rates given without checkpoints")
        self.checkpoints = checkpoints
        self.learning_rates = learning_rates
        #: TracInCP sums over a trajectory: it does not assume a trained optimum
        self.assumes_optimum = checkpoints is None

    @property
    def tracin(self) -> bool:
        return self.checkpoints is not None

    def fit(self, context: FitContext) -> None:
        self.context = context
        if self.tracin:  # validate every checkpoint now, not halfway through scoring
            for k, w in enumerate(self.checkpoints):
                checkpoint_vector(context.space, w, k)

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return V.to(torch.float64)

    # ------------------------------------------------------------------ plain gradient products
    def _plain_scores(self, state, test: ExampleSet, estimator: str, relatif: str) -> Tensor:
        Q = torch.cat(
            [
                state.engine.grads(b, "measurement").to(torch.float64)
                for b in test.batches(state.batch_size)
            ]
        )
        S = torch.empty(Q.shape[0], state.n, dtype=torch.float64)
        if estimator == "if":
            for batch in state.train.batches(state.batch_size):
                S[:, batch.indices] = (Q @ state.attributed_grads(batch).T).cpu() / state.n
        else:
            for batch, delta in removal_deltas(state, estimator, relatif=relatif):
                S[:, batch.indices] = (Q @ delta.T).cpu()
        return S

    # ------------------------------------------------------------------ TracInCP
    def _checkpoint_terms(self, state) -> Iterator[tuple[float, Tensor, bool]]:
        """(eta_k, w_k as float64, whether w_k is the fitted model) with the model at w_k."""
        space = self.context.space
        for k, (w, eta) in enumerate(zip(self.checkpoints, self.learning_rates)):
            vector = checkpoint_vector(space, w, k).to(torch.float64)
            if torch.equal(vector, state.theta):  # the fitted model: reuse its cached gradients
                yield eta, state.theta, True
                continue
            with parameters_at(space, w, k) as theta:
                yield eta, theta, False

    @staticmethod
    def _loss_grads(state, batch, fitted: bool) -> Tensor:
        """grad l_j(w_k) [B, P] in the model's dtype (float32 products are twice as fast)."""
        if fitted and state.train_grad_cache is not None:
            return state.train_grad_cache[batch.indices].to(state.engine.space.dtype)
        return state.engine.grads(batch, "loss")

    def _train_side(self, state, g: Tensor, theta: Tensor, estimator: str) -> Tensor:
        """grad l~_j(w_k) ([B, P], g's dtype) from the loss gradients g; unit length for relatif.

        The 1/N of the "if" scores is applied by the callers, to the (smaller) results.
        """
        v = g + state.l2 * theta.to(g.dtype) if state.l2 else g
        if estimator == "relatif":
            return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        return v

    @staticmethod
    def _unit(state, estimator: str) -> float:
        return 1.0 if estimator == "relatif" else 1.0 / state.n

    def scores(self, state, test: ExampleSet, estimator: str, relatif: str) -> Tensor:
        if not self.tracin:
            return self._plain_scores(state, test, estimator, relatif)
        S = torch.zeros(len(test), state.n, dtype=torch.float64)
        for eta, theta, fitted in self._checkpoint_terms(state):
            Q = torch.cat(
                [state.engine.grads(b, "measurement") for b in test.batches(state.batch_size)]
            )
            parts = []
            for batch in state.train.batches(state.batch_size):  # in order: 0, 1, ..., N-1
                g = self._loss_grads(state, batch, fitted)
                parts.append(Q @ self._train_side(state, g, theta, estimator).T)
            weight = eta * self._unit(state, estimator)
            S += weight * torch.cat(parts, dim=1).to(torch.float64).cpu()
        return S

    def self_scores(self, state, estimator: str, relatif: str) -> Tensor:
        out = torch.zeros(state.n, dtype=torch.float64)
        if not self.tracin:
            for batch, delta in removal_deltas(state, estimator, relatif=relatif):
                out[batch.indices] = (state.loss_grads(batch) * delta).sum(1).cpu()
            return out
        for eta, theta, fitted in self._checkpoint_terms(state):
            weight = eta * self._unit(state, estimator)
            for batch in state.train.batches(state.batch_size):
                g = self._loss_grads(state, batch, fitted)
                side = self._train_side(state, g, theta, estimator)
                out[batch.indices] += weight * (g * side).sum(1).to(torch.float64).cpu()
        return out

    def group_delta(self, state, indices: Tensor, estimator: str) -> Tensor:
        if not self.tracin:
            return group_delta(state, estimator, indices)
        if estimator != "if":
            raise UnsupportedError("TracInCP group removal is defined for estimator 'if' only")
        total = torch.zeros_like(state.theta)
        for eta, theta, fitted in self._checkpoint_terms(state):
            for batch in state.train.batches(state.batch_size, indices):
                g = self._loss_grads(state, batch, fitted).to(torch.float64)
                total += eta / state.n * self._train_side(state, g, theta, estimator).sum(0)
        return total

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.tracin:
            out.update(
                variant="tracincp",
                checkpoints=len(self.checkpoints),
                learning_rates=list(self.learning_rates),
            )
        return out
