"""method="identity": no curvature (H = I), i.e. the gradient dot product; and TracInCP.

Without checkpoints, scores are ``(1/N) grad m(z_t)^T grad l~_j``: what influence would be if the
curvature were the identity. With estimator ``"relatif"`` this becomes the gradient cosine
(docs/estimators.md §7). ``l2`` still enters the attributed training gradient
(``grad l~_j = grad l_j + l2 theta``) but not the curvature; ``damping`` is ignored.

With ``checkpoints`` (and their ``learning_rates``), this is **TracInCP** (Pruthi et al. 2020;
docs/methods/identity.md §3), in infkit's units:

    scores[t, j] = (1/N) sum_k eta_k  grad m_t(w_k)^T (grad l_j(w_k) + l2 w_k).

Full-batch gradient descent on ``mean_i l_i + (l2/2)||w||^2`` moves the parameters at step k by
``-eta_k (1/N) sum_i grad l~_i(w_k)``; dropping example j from that step changes the test
measurement, to first order, by ``eta_k (1/N) grad m_t(w_k)^T grad l~_j(w_k)``. The score is
that first-order removal effect *summed over the listed steps*, ignoring how an early change
propagates through later steps (not the counterfactual of the final model; the Adam
preconditioner is ignored). It is the paper's TracInCP divided by N, with the regulariser share
added; if checkpoints are saved every c steps, pass ``c * eta`` as the learning rate.

Computation: for Linear models, the products are factored per layer without per-example
gradients (:mod:`infkit.layers.factored`); ``fit`` checks the factors on a few examples, and any
other model, or a check that fails, uses per-example gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from infkit.checkpoints import Checkpoint, checkpoint_vector, is_the_models, parameters_at
from infkit.data import Batch, ExampleSet
from infkit.errors import CurvatureError, InvalidInputError
from infkit.estimators import Estimator
from infkit.fitted import Fitted, warn_about_still_queries
from infkit.gradients import directional_derivatives
from infkit.layers.factored import (
    CHECK_EXAMPLES,
    FactoredGradients,
    Factors,
    NotFactoredError,
    factorable_layers,
    factored_check_bytes,
    factored_layers,
    factored_row_bytes,
)
from infkit.layers.tracked import find_modules
from infkit.memory import FLOAT64_BYTES, default_memory_limit, row_chunks
from infkit.methods.base import BASIC, PRIMAL, Fidelity, PrimalMethod, register
from infkit.options import Options, option
from infkit.parameters import ParameterSpace, product_dtype
from infkit.plan import RunShape, Stage
from infkit.task import Task


@dataclasses.dataclass(frozen=True)
class IdentityOptions(Options):
    """Options of ``method="identity"``."""

    checkpoints: Sequence[Checkpoint] | None = option(
        None,
        "checkpoints w_k (state dicts or flat [P] vectors): makes the method TracInCP; a "
        "TrainingRun's checkpoints are (step, theta) pairs: pass their thetas, [theta for _, "
        "theta in run.checkpoints] (docs/methods/identity.md §3)",
    )
    learning_rates: Sequence[float] | float | None = option(
        None, "eta_k, one per checkpoint (a single number is used for all)"
    )

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            if self.learning_rates is not None:
                raise InvalidInputError(
                    "method 'identity': learning_rates given without checkpoints"
                )
            return
        if not list(self.checkpoints):
            raise InvalidInputError(
                "method 'identity': checkpoints is empty; pass at least one, or None"
            )
        if self.learning_rates is None:
            raise InvalidInputError(
                "method 'identity': TracInCP needs the learning rate of each checkpoint: pass "
                "learning_rates"
            )
        if not isinstance(self.learning_rates, (int, float)) and len(self.learning_rates) != len(
            self.checkpoints
        ):
            raise InvalidInputError(
                f"method 'identity': {len(self.checkpoints)} checkpoints but "
                f"{len(self.learning_rates)} learning rates"
            )
        for k, rate in enumerate(self.rates()):
            if not 0 <= rate < math.inf:
                raise InvalidInputError(
                    f"method 'identity': the learning rate of checkpoint {k} is {rate}; each "
                    "must be a finite number >= 0 (the step size that checkpoint stands for)"
                )

    def rates(self) -> list[float]:
        """eta_k for every checkpoint."""
        checkpoints = list(self.checkpoints or [])
        if isinstance(self.learning_rates, (int, float)):
            return [float(self.learning_rates)] * len(checkpoints)
        return [float(r) for r in self.learning_rates or []]


@register
class Identity(PrimalMethod):
    """The identity as inverse curvature: gradient similarity, or TracInCP over checkpoints."""

    name = "identity"
    estimators = ("if", "relatif")
    summary = (
        "gradient dot product (H = I); with relatif, gradient cosine; TracInCP over checkpoints"
    )
    Options = IdentityOptions
    scales = True
    curvature = "identity"
    #: the factored path and the streamed path need no [N, P] cache
    uses_training_gradients = False
    #: every chunk of queries is a pass over the training data (no cache): chunks up to a
    #: quarter of memory_limit (a tester's 32 language-model queries took 33 passes, one each)
    solves_together = True
    fidelity = Fidelity(reference="identity", rtol=1e-8)
    #: nothing but whether the factored products apply (:meth:`state`)
    fitted_state = ()
    options: IdentityOptions

    def __init__(self, options: IdentityOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        #: the factored products (set by ``fit``; None: per-example gradients)
        self.factored: FactoredGradients | None = None

    @property
    def tracin(self) -> bool:
        """Whether the method is TracInCP (checkpoints given)."""
        return self.options.checkpoints is not None

    @property
    def assumes_optimum(self) -> bool:
        # TracInCP sums over a trajectory: it does not assume a trained optimum
        return not self.tracin

    def answers(self, question: str) -> bool:
        if self.tracin:  # a sum over checkpoints has no single inverse curvature to decompose
            return question in BASIC
        return super().answers(question)

    def _why_not(self, question: str) -> str:
        if not self.tracin or question not in PRIMAL - BASIC - {"leverages"}:
            return super()._why_not(question)
        return " with checkpoints (TracInCP sums over a trajectory; without them it does)"

    def check(self, task: Task, space: ParameterSpace) -> None:
        for k, w in enumerate(self.options.checkpoints or []):
            checkpoint_vector(space, w, k)

    def fit_passes(self) -> float:
        return 0.0  # H = I: nothing to fit beyond the layers' shapes

    def query_row_bytes(self, n: int, p: int, estimator: Estimator | None = None) -> int:
        """A query's bytes on the factored path (its factors and its float64 score row), the
        generic path's elsewhere."""
        if self.factored is None:
            return super().query_row_bytes(n, p, estimator)
        item = product_dtype(self.factored.engine.space.dtype).itemsize
        return factored_row_bytes(self.factored.layers, item) + n * FLOAT64_BYTES

    def stages(self, shape: RunShape, task: Task, space: ParameterSpace) -> list[Stage]:
        """The generic outline, with the queries and scores of the factored products where
        every attributed parameter belongs to a Linear layer and each example is one position
        (fit then checks them on a few examples; a model that fails the check takes the
        per-example gradients the generic outline counts, several times the bytes)."""
        out = super().stages(shape, task, space)
        layers = None if self.tracin or shape.tokens != 1 else factorable_layers(task.model, space)
        if layers is None:
            return out
        n, q, b = shape.n_train, shape.n_queries, shape.batch_size
        item = product_dtype(space.dtype).itemsize
        width = factored_row_bytes(layers, item)
        limit = shape.memory_limit or default_memory_limit()
        chunks = row_chunks(
            q, width + n * FLOAT64_BYTES, q * n * FLOAT64_BYTES, limit, together=True
        )
        rows = max(stop - start for start, stop in chunks)
        held = rows * width  # a chunk's query factors, through its pass over the training data
        scores = q * n * FLOAT64_BYTES
        note = "if the factored products pass their check at fit (else per-example gradients)"
        generic = [s for s in out if s.name not in ("queries", "scores")]
        check = factored_check_bytes(layers, shape.parameters, shape.itemsize)
        generic.append(
            Stage(
                "factored products' check",
                0,
                check,
                (f"per-example gradients [{CHECK_EXAMPLES}, P] of the checked examples", check),
                "fit compares the factored gradients with them on a few examples",
            )
        )
        factors = ("a chunk's query factors [Q, sum(d_in + d_out)]", held)
        return [
            *generic,
            Stage("queries", 0, held, factors, note),
            Stage(
                "scores",
                len(chunks),
                scores + held + b * width + rows * b * FLOAT64_BYTES,
                ("[Q, N] scores, float64", scores),
                f"{len(chunks)} chunks of {rows} queries, a pass each" if len(chunks) > 1 else "",
                flops=2.0 * q * n * width / item,
            ),
        ]

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        layers = factored_layers(fitted.engine, fitted.train)
        self.factored = (
            None if layers is None else FactoredGradients(fitted.engine, layers, fitted.batch_size)
        )

    def state(self) -> dict[str, Any]:
        layers = None if self.factored is None else [t.name for t in self.factored.layers]
        return {**super().state(), "factored_layers": layers}

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        """The factored products without their check on a few examples: fit made it."""
        super().restore(fitted, state)
        names = state["factored_layers"]
        self.factored = None
        if names is not None:
            tracked, _ = find_modules(fitted.task.model, fitted.space)
            by_name = {t.name: t for t in tracked}
            layers = [by_name[name] for name in names]
            self.factored = FactoredGradients(fitted.engine, layers, fitted.batch_size)

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return V.to(torch.float64)

    # ------------------------------------------------------------------ answers
    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        if self.factored is not None:
            with contextlib.suppress(NotFactoredError):
                S, moved = self._factored_scores(self.factored, queries, estimator)
                if bool(torch.isfinite(S.sum())):  # NaN/Inf propagate through the sum
                    warn_about_still_queries(queries, moved, self.fitted.engine.precision)
                    return S
        # Per-example gradients: other models, and non-finite values (whose example they name).
        if not self.tracin:
            return super().scores(queries, estimator)
        fitted = self.fitted
        S = torch.zeros(len(queries), fitted.n, dtype=torch.float64)
        moved = torch.zeros(len(queries), dtype=torch.bool)  # a gradient not 0 at some term
        for eta, theta, at_fit in self._checkpoint_terms():
            Q = torch.cat(
                [
                    fitted.engine.grads(b, "measurement")
                    for b in queries.batches(fitted.gradient_batch_size)
                ]
            )
            moved |= (Q != 0).any(dim=1).cpu()
            parts = []
            for batch in self._batches(at_fit):  # in order: 0, 1, ..., N-1
                g = self._loss_grads(batch, at_fit)
                parts.append(Q @ self._train_side(g, theta, estimator, batch).T)
            weight = eta * self._unit(estimator)
            S += weight * torch.cat(parts, dim=1).to(torch.float64).cpu()
        warn_about_still_queries(queries, moved, fitted.engine.precision)
        return S

    def self_scores(self, estimator: Estimator) -> Tensor:
        if self.factored is not None:
            with contextlib.suppress(NotFactoredError):
                out = self._factored_self_scores(self.factored, estimator)
                if bool(torch.isfinite(out).all()):
                    return out
        if not self.tracin:
            return super().self_scores(estimator)
        fitted = self.fitted
        out = torch.zeros(fitted.n, dtype=torch.float64)
        for eta, theta, at_fit in self._checkpoint_terms():
            weight = eta * self._unit(estimator)
            for batch in self._batches(at_fit):
                g = self._loss_grads(batch, at_fit)
                side = self._train_side(g, theta, estimator, batch)
                out[batch.indices] += weight * (g * side).sum(1).to(torch.float64).cpu()
        return out

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        if not self.tracin:
            return super().removal(indices, estimator)
        estimator.require_counterfactual()
        total = self.fitted.zeros()
        for eta, theta, at_fit in self._checkpoint_terms():
            total += self._checkpoint_step(eta, theta, at_fit, indices, estimator)
        return total

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: Estimator, which: str
    ) -> Tensor | None:
        """With checkpoints, the change of ``which`` summed over the checkpoints as the scores
        sum: ``sum_k J(w_k) Delta theta_k``, ``Delta theta_k = (eta_k/N) sum_{j in F} grad
        l~_j(w_k)`` (docs/methods/identity.md §3); for the measurement, the sum of the group's
        scores. ``J(theta*)`` times the summed step would mix each step with another point's
        gradient."""
        if not self.tracin:
            return None
        estimator.require_counterfactual()
        fitted = self.fitted
        parts = []
        for eta, theta, at_fit in self._checkpoint_terms():
            step = self._checkpoint_step(eta, theta, at_fit, indices, estimator)
            batches = data.batches(fitted.gradient_batch_size)
            parts.append(
                torch.cat([directional_derivatives(fitted.engine, b, step, which) for b in batches])
            )
        return torch.stack(parts).sum(0)

    def _checkpoint_step(
        self, eta: float, theta: Tensor, at_fit: bool, indices: Tensor, estimator: Estimator
    ) -> Tensor:
        """The change of checkpoint k's step without ``indices``: ``(eta_k/N) sum_{j in F} grad
        l~_j(w_k)`` [P] float64, with the model at w_k."""
        fitted = self.fitted
        step = fitted.zeros()
        for batch in self._batches(at_fit, indices):
            g = self._loss_grads(batch, at_fit).to(torch.float64)
            step += eta / fitted.n * self._train_side(g, theta, estimator, batch).sum(0)
        return step

    # ------------------------------------------------------------------ TracInCP pieces
    def _checkpoint_terms(self) -> Generator[tuple[float, Tensor, bool], None, None]:
        """(eta_k, w_k as float64, whether w_k is the fitted model) with the model at w_k."""
        fitted = self.fitted
        checkpoints = list(self.options.checkpoints or [])
        for k, (w, eta) in enumerate(zip(checkpoints, self.options.rates())):
            vector = checkpoint_vector(fitted.space, w, k).to(torch.float64)
            if is_the_models(fitted.space, w, vector):  # the fitted model: its cache
                yield eta, vector, True
                continue
            with parameters_at(fitted.space, w, k) as theta:
                yield eta, theta, False

    def _batches(self, at_fit: bool, indices: Tensor | None = None) -> Iterator[Batch]:
        """The training batches of checkpoint terms: the run's batch size where the gradients
        are read from the cache, else :attr:`~infkit.fitted.Fitted.gradient_batch_size`."""
        fitted = self.fitted
        size = fitted.training_gradient_batch_size if at_fit else fitted.gradient_batch_size
        return fitted.train.batches(size, indices)

    def _loss_grads(self, batch: Batch, at_fit: bool) -> Tensor:
        """grad l_j(w_k) [B, P] in the model's dtype (float32 products are twice as fast)."""
        fitted = self.fitted
        if at_fit and fitted.train_gradients is not None:
            return fitted.train_gradients[batch.indices].to(fitted.space.dtype)
        return fitted.engine.grads(batch, "loss")

    def _train_side(self, g: Tensor, theta: Tensor, estimator: Estimator, batch: Batch) -> Tensor:
        """grad l~_j(w_k) ([B, P], g's dtype) from the loss gradients g; unit length for relatif.

        The 1/N of the "if" scores is applied by the callers, to the (smaller) results.
        """
        l2 = self.fitted.l2
        v = g + l2 * theta.to(g.dtype) if l2 else g
        if estimator.name == "relatif":
            norms = v.norm(dim=1, keepdim=True)
            zero = norms[:, 0] <= torch.finfo(v.dtype).tiny
            if bool(zero.any()):
                i = int(batch.indices[zero.nonzero()[0, 0]])
                raise CurvatureError(
                    f"training example {i} has a zero attributed gradient at a checkpoint, so "
                    "its gradient cosine is 0/0; it has no influence at all (exclude it)"
                )
            return v / norms
        return v

    def _unit(self, estimator: Estimator) -> float:
        return 1.0 if estimator.name == "relatif" else 1.0 / self.fitted.n

    def _terms(self) -> Generator[tuple[float, Tensor], None, None]:
        """(eta_k, w_k float64) with the model at w_k; (1, theta - theta') without checkpoints.

        Callers close it in ``finally``: the model gets its own parameters back before any
        fallback runs, not whenever the generator happens to be collected.
        """
        if not self.tracin:
            yield 1.0, self.fitted.regularised_theta
            return
        inner = self._checkpoint_terms()
        try:
            for eta, theta, _ in inner:
                yield eta, theta
        finally:
            inner.close()

    # ------------------------------------------------------------------ factored products
    def _train_scale(
        self,
        products: FactoredGradients,
        parts: Factors,
        blocks: list[Tensor] | None,
        ww: float,
        estimator: Estimator,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(grad l_j . w, 1/||v_j|| for relatif) of a training batch, float64 [B] (or None)."""
        l2 = self.fitted.l2
        gw = products.dots(parts, blocks) if l2 and blocks is not None else None
        if estimator.name != "relatif":
            return gw, None
        sq = products.squared_norms(parts)
        if gw is not None:
            sq = sq + 2 * l2 * gw + l2 * l2 * ww
        norm = sq.clamp_min(0).sqrt()
        if bool((norm <= torch.finfo(norm.dtype).tiny).any()):
            raise NotFactoredError  # a zero attributed gradient: the per-example path names it
        return gw, 1.0 / norm

    def _factored_scores(
        self, products: FactoredGradients, queries: ExampleSet, estimator: Estimator
    ) -> tuple[Tensor, Tensor]:
        """The scores [Q, N] from the layers' factors, and whether each query's gradient is
        not 0 at some term (checkpoint)."""
        fitted = self.fitted
        l2 = fitted.l2
        S = torch.zeros(len(queries), fitted.n, dtype=torch.float64)
        moved = torch.zeros(len(queries), dtype=torch.bool)  # a gradient not 0 at some term
        terms = self._terms()
        try:
            for eta, w in terms:
                weight = eta * self._unit(estimator)
                blocks = products.blocks(w) if l2 else None
                ww = float(w @ w) if l2 else 0.0
                Q = products.all_factors(queries, "measurement")
                moved |= (products.squared_norms(Q) > 0).cpu()
                # grad m_t . l2 w
                shared = l2 * products.dots(Q, blocks).unsqueeze(1) if blocks is not None else None
                start = 0
                for batch, parts in products.factors(fitted.train, "loss"):  # in order: 0..N-1
                    block = products.gram(Q, parts)
                    _, inverse_norm = self._train_scale(products, parts, blocks, ww, estimator)
                    if shared is not None or inverse_norm is not None:
                        block = block.to(torch.float64)
                        if shared is not None:
                            block += shared
                        if inverse_norm is not None:
                            block *= inverse_norm
                    stop = start + len(batch)
                    S[:, start:stop].add_(block.cpu(), alpha=weight)  # float64 accumulation
                    start = stop
        finally:
            terms.close()
        return S, moved

    def _factored_self_scores(self, products: FactoredGradients, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        l2 = fitted.l2
        out = torch.zeros(fitted.n, dtype=torch.float64)
        terms = self._terms()
        try:
            for eta, w in terms:
                weight = eta * self._unit(estimator)
                blocks = products.blocks(w) if l2 else None
                ww = float(w @ w) if l2 else 0.0
                for batch, parts in products.factors(fitted.train, "loss"):
                    gw, inverse_norm = self._train_scale(products, parts, blocks, ww, estimator)
                    # grad l_j . v_j = |grad l_j|^2 + l2 grad l_j . w
                    gv = products.squared_norms(parts)
                    if gw is not None:
                        gv = gv + l2 * gw
                    if inverse_norm is not None:
                        gv = gv * inverse_norm
                    out[batch.indices] += weight * gv.cpu()
        finally:
            terms.close()
        return out

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        if self.tracin:
            out.update(
                variant="tracincp",
                checkpoints=len(list(self.options.checkpoints or [])),
                learning_rates=self.options.rates(),
            )
        out["gradients"] = "factored" if self.factored is not None else "per-example"
        return out
