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

Computation. When every trainable parameter belongs to an ``nn.Linear`` (or Hugging Face
``Conv1D``) layer applied once per example to a plain [B, d_in] input, a per-example gradient is
``delta_i a_i^T`` per layer (``a_i`` the layer input with a 1 appended for the bias, ``delta_i``
the gradient of l_i with respect to the layer output), so

    grad m_t^T grad l_j = sum_layers (delta_t . delta_j) (a_t . a_j),

and the test x train products are elementwise products of two small Gram matrices, from one
hooked forward/backward pass per batch: T N (d_in + d_out) work per layer instead of per-example
gradients (T N d_in d_out). The regulariser share and RelatIF's norms factor the same way
(``grad l_j^T w = delta_j^T W a_j``, ``||grad l_j||^2 = |delta_j|^2 |a_j|^2``). ``fit`` checks the
factors against per-example gradients on a few training examples (which catches layers used
outside their module call and examples that interact within a batch); any other model, or a
check that fails, uses per-example gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from infkit.checkpoints import Checkpoint, checkpoint_vector, parameters_at
from infkit.data import Batch, ExampleSet
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.estimators import cache_dtype, group_delta, removal_deltas
from infkit.kfac.capture import layer_terms
from infkit.kfac.modules import BlockLayout, TrackedModule, find_modules
from infkit.methods import register
from infkit.methods.base import DirectMethod, FitContext

#: layer kinds whose per-example gradient is one outer product delta a^T on a [B, d_in] input
FACTORED_KINDS = ("linear", "conv1d")
#: training examples on which ``fit`` checks the factors against per-example gradients
CHECK_EXAMPLES = 4

#: per layer: (a [n, cols], delta [n, d_out]) of n examples, in the products' dtype
Factors = list[tuple[Tensor, Tensor]]


class _NotFactoredError(Exception):
    """The factored products do not apply to this call: use per-example gradients."""


def factored_layers(context: FitContext) -> list[TrackedModule] | None:
    """The layers of the factored gradient products, or None when they do not apply.

    They apply when every trainable parameter is the weight or bias of a layer in
    :data:`FACTORED_KINDS` called once per example on a [B, d_in] input, and the factored
    per-example gradients of the first :data:`CHECK_EXAMPLES` training examples, from one
    batched pass, equal the per-example gradients (within the dtype's precision).
    """
    space = context.space
    try:
        tracked, others = find_modules(context.task.model, space)
    except UnsupportedError:  # tied weights
        return None
    if others or not tracked or any(t.kind not in FACTORED_KINDS for t in tracked):
        return None
    engine = context.per_example
    batch = context.train.take(range(min(CHECK_EXAMPLES, context.n)))
    try:
        terms = layer_terms(engine, tracked, batch, "loss")
    except RuntimeError:  # a tracked layer that the forward pass does not call
        return None
    G = engine.grads(batch, "loss")
    F = torch.zeros_like(G)
    layout = BlockLayout(space, tracked, [])
    for t in tracked:
        a, d = terms[t.name]
        if a.shape[1] != 1 or d.shape[1] != 1:  # several positions (tokens) per example
            return None
        layout.put(F, t, (d[:, 0, :, None] * a[:, 0, None, :]).to(G.dtype))
    tol = min(1e-2, 10 * torch.finfo(G.dtype).eps ** 0.5)
    if not bool((F - G).abs().max() <= tol * G.abs().max()):
        return None
    return tracked


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
        #: the layers of the factored products (set by ``fit``; None: per-example gradients)
        self.layers: list[TrackedModule] | None = None
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
        self.layers = factored_layers(context)

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
        if self.layers is not None:
            try:
                S = self._factored_scores(state, test, estimator)
                if bool(torch.isfinite(S.sum())):  # NaN/Inf propagate through the sum
                    return S
            except _NotFactoredError:
                pass
        # Per-example gradients: other models, and non-finite values (whose example they name).
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
        if self.layers is not None:
            try:
                out = self._factored_self_scores(state, estimator)
                if bool(torch.isfinite(out).all()):
                    return out
            except _NotFactoredError:
                pass
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

    # ------------------------------------------------------------------ factored products
    def _terms(self, state) -> Iterator[tuple[float, Tensor]]:
        """(eta_k, w_k float64) with the model at w_k; (1, theta - theta') without checkpoints.

        Callers close it in ``finally``: the model gets its own parameters back before any
        fallback runs, not whenever the generator happens to be collected.
        """
        if not self.tracin:
            yield 1.0, state.regularised_theta
            return
        inner = self._checkpoint_terms(state)
        try:
            for eta, theta, _ in inner:
                yield eta, theta
        finally:
            inner.close()

    def _factors(self, state, data: ExampleSet, which: str) -> Iterator[tuple[Batch, Factors]]:
        """Per batch of ``data``: each layer's (a [B, cols], delta [B, d_out]) of ``which``."""
        dtype = cache_dtype(state.engine.space.dtype)
        for batch in data.batches(state.batch_size):
            terms = layer_terms(state.engine, self.layers, batch, which)
            parts = []
            for t in self.layers:
                a, d = terms[t.name]
                if a.shape[1] != 1 or d.shape[1] != 1:  # several positions per example
                    raise _NotFactoredError
                parts.append((a[:, 0].to(dtype), d[:, 0].to(dtype)))
            yield batch, parts

    def _test_factors(self, state, test: ExampleSet) -> Factors:
        batches = [parts for _, parts in self._factors(state, test, "measurement")]
        return [
            (torch.cat([p[k][0] for p in batches]), torch.cat([p[k][1] for p in batches]))
            for k in range(len(self.layers))
        ]

    @staticmethod
    def _gram(left: Factors, right: Factors) -> Tensor:
        """grad_left . grad_right: sum over layers of (D_l D_r^T) * (A_l A_r^T), factor dtype."""
        total = None
        for (a1, d1), (a2, d2) in zip(left, right):
            term = (d1 @ d2.T).mul_(a1 @ a2.T)
            total = term if total is None else total.add_(term)
        return total

    @staticmethod
    def _squared_norms(parts: Factors) -> Tensor:
        """||grad_i||^2 = sum over layers of |delta_i|^2 |a_i|^2, [n] float64."""
        return sum(
            d.to(torch.float64).pow(2).sum(1) * a.to(torch.float64).pow(2).sum(1) for a, d in parts
        )

    def _dots(self, parts: Factors, blocks: list[Tensor]) -> Tensor:
        """grad_i . w = sum over layers of delta_i^T W a_i, [n] float64 (blocks: W per layer)."""
        return sum(
            ((d.to(torch.float64) @ W) * a.to(torch.float64)).sum(1)
            for (a, d), W in zip(parts, blocks)
        )

    def _blocks(self, state, w: Tensor) -> list[Tensor]:
        """The augmented blocks [d_out, cols] of w [P] (float64), one per layer."""
        layout = BlockLayout(state.engine.space, self.layers, [])
        return [layout.block(w.unsqueeze(0), t)[0].to(torch.float64) for t in self.layers]

    def _train_scale(
        self, state, parts: Factors, blocks: list[Tensor] | None, ww: float, estimator: str
    ) -> tuple[Tensor | None, Tensor | None]:
        """(grad l_j . w, 1/||v_j|| for relatif) of a training batch, float64 [B] (or None)."""
        l2 = state.l2
        gw = self._dots(parts, blocks) if l2 else None
        if estimator != "relatif":
            return gw, None
        sq = self._squared_norms(parts)
        if l2:
            sq = sq + 2 * l2 * gw + l2 * l2 * ww
        norm = sq.clamp_min(0).sqrt()
        if bool((norm <= torch.finfo(norm.dtype).tiny).any()):
            raise _NotFactoredError  # a zero attributed gradient: the per-example path names it
        return gw, 1.0 / norm

    def _factored_scores(self, state, test: ExampleSet, estimator: str) -> Tensor:
        S = torch.zeros(len(test), state.n, dtype=torch.float64)
        terms = self._terms(state)
        try:
            self._accumulate_scores(state, test, estimator, terms, S)
        finally:
            terms.close()
        return S

    def _accumulate_scores(self, state, test, estimator: str, terms, S: Tensor) -> None:
        l2 = state.l2
        for eta, w in terms:
            weight = eta * self._unit(state, estimator)
            blocks = self._blocks(state, w) if l2 else None
            ww = float(w @ w) if l2 else 0.0
            Q = self._test_factors(state, test)
            shared = l2 * self._dots(Q, blocks).unsqueeze(1) if l2 else None  # grad m_t . l2 w
            start = 0
            for batch, parts in self._factors(state, state.train, "loss"):  # in order: 0..N-1
                block = self._gram(Q, parts)
                _, inverse_norm = self._train_scale(state, parts, blocks, ww, estimator)
                if shared is not None or inverse_norm is not None:
                    block = block.to(torch.float64)
                    if shared is not None:
                        block += shared
                    if inverse_norm is not None:
                        block *= inverse_norm
                stop = start + len(batch)
                S[:, start:stop].add_(block.cpu(), alpha=weight)  # float64 accumulation
                start = stop

    def _factored_self_scores(self, state, estimator: str) -> Tensor:
        out = torch.zeros(state.n, dtype=torch.float64)
        terms = self._terms(state)
        try:
            self._accumulate_self_scores(state, estimator, terms, out)
        finally:
            terms.close()
        return out

    def _accumulate_self_scores(self, state, estimator: str, terms, out: Tensor) -> None:
        l2 = state.l2
        for eta, w in terms:
            weight = eta * self._unit(state, estimator)
            blocks = self._blocks(state, w) if l2 else None
            ww = float(w @ w) if l2 else 0.0
            for batch, parts in self._factors(state, state.train, "loss"):
                gw, inverse_norm = self._train_scale(state, parts, blocks, ww, estimator)
                gv = self._squared_norms(parts)  # grad l_j . v_j = |grad l_j|^2 + l2 grad l_j . w
                if gw is not None:
                    gv = gv + l2 * gw
                if inverse_norm is not None:
                    gv = gv * inverse_norm
                out[batch.indices] += weight * gv.cpu()

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
        out["gradients"] = "factored" if self.layers is not None else "per-example"
        return out
