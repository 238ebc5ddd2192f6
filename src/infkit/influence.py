"""The facade: ``Influence(task, method, estimator, l2, damping).fit(train)`` and its questions.

Units and sign (design.md): every score is the predicted change of a measured quantity when a
training example is removed and the model retrained, in that quantity's own units, 1/N included.
``scores[t, j] > 0`` means removing j would raise test example t's loss: j helped t.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from infkit import methods as method_registry
from infkit.data import ExampleSet, check_compatible
from infkit.errors import InvalidInputError, NotFittedError, UnsupportedError
from infkit.estimators import (
    ESTIMATORS,
    RELATIF_NORMS,
    FittedState,
    cache_dtype,
    check_estimator,
    group_delta,
    leverages,
    removal_deltas,
)
from infkit.gradients import PerExample, directional_derivatives
from infkit.kfac.scores import TokenScores, per_module_scores, per_token_scores
from infkit.methods.base import DirectMethod, FitContext
from infkit.parameters import ParameterSpace
from infkit.removal import RemovalEffect
from infkit.task import Task

#: Fit warns when ||grad L(theta)|| exceeds this fraction of the typical per-example gradient.
STATIONARITY_TOLERANCE = 1e-3
#: Training gradients are cached in memory up to this many bytes.
GRADIENT_CACHE_BYTES = 1 << 30


def default_memory_limit() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


@dataclass
class TopK:
    """The k most helpful (proponents) and most harmful (opponents) training examples per query.

    ``*_indices`` and ``*_scores`` are [n_test, k]; scores are removal effects on the measurement,
    so a proponent of a loss measurement has a positive score (removing it raises the loss).
    """

    proponent_indices: Tensor
    proponent_scores: Tensor
    opponent_indices: Tensor
    opponent_scores: Tensor


class Influence:
    """Influence of training examples on a trained model, by one method and one estimator.

    Args:
        task: the model, its per-example loss and the measured quantity.
        method: a registered method (``infkit.methods()`` lists them) or ``"auto"``.
        estimator: ``"if"``, ``"rif"``, ``"newton"`` or ``"relatif"``.
        l2: the training objective's own L2 coefficient, mean form: the model was trained on
            ``mean_i l_i + (l2/2) ||theta||^2``.
        damping: extra, purely numerical, added to the curvature; ``"auto"`` for the methods
            with a heuristic (``kfac``, ``ekfac``: 0.1 x the mean eigenvalue of each module's
            curvature, methods.md §4.3).
        relatif: ``"theta"`` or ``"loss"`` normalisation for ``estimator="relatif"``.
        batch_size: examples per batch for per-example gradients.
        per_example: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`infkit.gradients.PerExample`).
        progress: show progress bars (default: when stderr is a terminal).
        memory_limit: bytes dense objects may take (default: half the machine's memory).
        **method_options: passed to the method, e.g. ``curvature="hessian"`` for ``"exact"``.
    """

    def __init__(
        self,
        task: Task,
        method: str = "exact",
        estimator: str = "if",
        l2: float = 0.0,
        damping: float | str = 0.0,
        *,
        relatif: str = "theta",
        batch_size: int = 64,
        per_example: str = "auto",
        progress: bool | None = None,
        memory_limit: int | None = None,
        **method_options: Any,
    ) -> None:
        if not isinstance(task, Task):
            raise InvalidInputError(
                f"task must be an infkit.Task (e.g. Task.classification(model)), got "
                f"{type(task).__name__}"
            )
        if estimator not in ESTIMATORS:
            raise UnsupportedError(
                f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}"
            )
        if relatif not in RELATIF_NORMS:
            raise UnsupportedError(f"unknown relatif norm {relatif!r}; use one of {RELATIF_NORMS}")
        self.auto_damping = damping == "auto"
        if self.auto_damping:
            damping = 0.0
            if "damping_scale" in method_options:
                raise InvalidInputError(
                    "damping='auto' sets the method's damping_scale; pass one or the other"
                )
        for label, value in (("l2", l2), ("damping", damping)):
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                allowed = "a finite number >= 0" + (" or 'auto'" if label == "damping" else "")
                raise InvalidInputError(f"{label} must be {allowed}, got {value!r}")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        if method != "auto":
            method_registry.method_class(method)  # unknown method: fail now, listing valid ones
        self.task = task
        self.method_name = method
        self.estimator = estimator
        self.l2 = float(l2)
        self.damping = float(damping)
        self.relatif = relatif
        self.batch_size = batch_size
        self.per_example_mode = per_example
        self.progress = progress
        self.memory_limit = memory_limit or default_memory_limit()
        self.method_options = method_options
        self.stationarity: float | None = None
        self._state: FittedState | None = None
        self._space: ParameterSpace | None = None

    # ------------------------------------------------------------------ fit
    def fit(self, train: Any) -> Influence:
        """Prepare the inverse curvature on the training set; returns ``self``."""
        examples = ExampleSet(train, name="training set")
        examples.check_finite()
        space = ParameterSpace(self.task.model)
        engine = PerExample(self.task, space, self.per_example_mode)
        progress = self.progress if self.progress is not None else None
        show = bool(progress) if progress is not None else _stderr_is_tty()
        name = self._resolve_method(space, examples, engine)
        method = method_registry.create(name, self._options_for(name))
        check_estimator(method, self.estimator)
        theta = space.flat().to(torch.float64)
        direct = isinstance(method, DirectMethod)
        # Direct (kernel) methods never use parameter-space training gradients: do not cache them.
        cache, summary = (None, None)
        if not direct:
            cache, summary = self._train_gradients(examples, engine, space, show)
        context = FitContext(
            task=self.task,
            space=space,
            per_example=engine,
            train=examples,
            l2=self.l2,
            damping=self.damping,
            batch_size=self.batch_size,
            progress=show,
            memory_limit=self.memory_limit,
            train_gradients=cache,
        )
        method.fit(context)
        anchor = method.regulariser_anchor()
        anchor = None if anchor is None else anchor.to(theta)
        reg_theta = theta if anchor is None else theta - anchor
        # Trajectory/surrogate methods (TracInCP, TRAK) neither assume an optimum nor offer the
        # Newton step that uses grad L(theta*): skip that pass over the data for them.
        gradient = None
        if method.assumes_optimum:
            gradient = self._check_stationarity(examples, engine, space, reg_theta, summary)
        self._space = space
        self._state = FittedState(
            method=method,
            engine=engine,
            train=examples,
            theta=theta,
            l2=self.l2,
            batch_size=self.batch_size,
            train_grad_cache=cache,
            objective_gradient=gradient,
            anchor=anchor,
        )
        return self

    def _options_for(self, name: str) -> dict[str, Any]:
        """The method options, with ``damping_scale="auto"`` when damping="auto" was asked."""
        if not self.auto_damping:
            return self.method_options
        if not getattr(method_registry.method_class(name), "supports_auto_damping", False):
            able = [
                n
                for n, cls in sorted(method_registry.registered().items())
                if getattr(cls, "supports_auto_damping", False)
            ]
            raise UnsupportedError(
                f"damping='auto' is a heuristic of the Kronecker-factored methods "
                f"({', '.join(able)}); method {name!r} needs a number: try l2 + damping around "
                "1e-3 x the mean curvature eigenvalue, or damping=0 when l2 > 0"
            )
        return {**self.method_options, "damping_scale": "auto"}

    def _resolve_method(
        self, space: ParameterSpace, examples: ExampleSet, engine: PerExample
    ) -> str:
        if self.method_name != "auto":
            return self.method_name
        p, n = space.size, len(examples)
        c = engine.outputs(examples.take([0]))[0].numel()
        registry = method_registry.registered()
        exact_bytes = registry["exact"].memory_estimate(n, p, c)
        if exact_bytes <= self.memory_limit and p <= 20_000:
            return "exact"
        if (
            "dual" in registry
            and 20 * n * c <= p
            and registry["dual"].memory_estimate(n, p, c) <= self.memory_limit
        ):
            return "dual"
        for candidate in ("ekfac", "cg"):
            if candidate in registry:
                return candidate
        raise UnsupportedError(
            f"method='auto' found no registered method for P={p:,}, N={n:,}, C={c}: 'exact' needs "
            f"a dense P x P curvature; registered methods: {', '.join(sorted(registry))}"
        )

    def _train_gradients(
        self, examples: ExampleSet, engine: PerExample, space: ParameterSpace, show: bool
    ) -> tuple[Tensor | None, tuple[Tensor, float] | None]:
        """The [N, P] training-loss gradients when they fit in memory (else None), and a summary.

        The cache is kept in :func:`cache_dtype` of the model (float32 for a float32 model: half
        the memory and twice the speed of the score products; the gradients carry no more
        precision than that). The summary, accumulated in float64 on the way, is
        ``(sum_i grad l_i / N, mean_i ||grad l_i||)`` for the stationarity check.
        """
        n, p = len(examples), space.size
        dtype = cache_dtype(space.dtype)
        if n * p * dtype.itemsize > min(GRADIENT_CACHE_BYTES, self.memory_limit // 4):
            return None, None
        out = torch.empty(n, p, dtype=dtype, device=space.device)
        total_gradient = torch.zeros(p, dtype=torch.float64, device=space.device)
        total_norm = 0.0
        batches = -(-n // self.batch_size)
        for batch in tqdm(
            examples.batches(self.batch_size), total=batches, desc="gradients", disable=not show
        ):
            g = engine.grads(batch, "loss")
            out[batch.indices] = g.to(dtype)
            total_gradient += g.sum(0).to(torch.float64)
            total_norm += float(g.norm(dim=1).sum())
        return out, (total_gradient / n, total_norm / n)

    def _check_stationarity(
        self,
        examples: ExampleSet,
        engine: PerExample,
        space: ParameterSpace,
        reg_theta: Tensor,
        summary: tuple[Tensor, float] | None,
    ) -> Tensor:
        """grad L(theta*) [P] float64; warns when it is far from 0 (not a trained optimum).

        ``reg_theta`` is theta* - theta' (theta' the regulariser's anchor, 0 by default);
        ``summary`` is the gradient cache's (mean gradient, mean gradient norm), if any.
        """
        if summary is not None:
            data_gradient, typical = summary
        else:
            from infkit.gradients import evaluation_mode
            from infkit.training import objective_and_gradient

            with evaluation_mode(self.task.model):
                _, full = objective_and_gradient(self.task, space, examples, 0.0, engine=engine)
            data_gradient = full.to(torch.float64)
            if not bool(torch.isfinite(data_gradient).all()):
                for batch in examples.batches(self.batch_size):
                    engine.grads(batch)  # raises NonFiniteError naming the example
            first = next(examples.batches(self.batch_size))
            typical = float(engine.grads(first).to(torch.float64).norm(dim=1).mean())
        gradient = data_gradient + self.l2 * reg_theta
        scale = typical + self.l2 * float(reg_theta.norm())
        self.stationarity = float(gradient.norm()) / max(scale, 1e-300)
        if self.stationarity > STATIONARITY_TOLERANCE:
            warnings.warn(
                f"the model is not at a stationary point of mean_i l_i + (l2/2)||theta||^2 with "
                f"l2={self.l2:g}: ||grad L|| is {self.stationarity:.1e} of the typical "
                "per-example gradient. Influence estimates assume a trained optimum: train longer "
                "(e.g. infkit.train_to_optimum), or pass the l2 (mean-form weight decay) the model "
                "was trained with",
                UserWarning,
                stacklevel=3,
            )
        return gradient

    def with_estimator(self, estimator: str, relatif: str | None = None) -> Influence:
        """The same fitted curvature with another estimator (no refit).

        ``inf.with_estimator("newton").scores(test)`` reuses the factorisation, the cached
        training gradients and everything else ``fit`` computed.
        """
        state = self.state
        check_estimator(state.method, estimator)
        other = copy.copy(self)
        other.estimator = estimator
        if relatif is not None:
            if relatif not in RELATIF_NORMS:
                raise UnsupportedError(
                    f"unknown relatif norm {relatif!r}; use one of {RELATIF_NORMS}"
                )
            other.relatif = relatif
        return other

    # ------------------------------------------------------------------ helpers
    @property
    def state(self) -> FittedState:
        if self._state is None:
            raise NotFittedError("call .fit(train) before asking for scores")
        return self._state

    @property
    def n_train(self) -> int:
        return self.state.n

    @property
    def n_params(self) -> int:
        return self.state.theta.numel()

    def _examples(self, data: Any, name: str) -> ExampleSet:
        examples = ExampleSet(data, name=name)
        examples.check_finite()
        check_compatible(self.state.train, examples)
        return examples

    def _indices(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = self.n_train
        if idx.numel() == 0:
            raise InvalidInputError("no training indices given; pass at least one index")
        if bool(((idx < 0) | (idx >= n)).any()):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise InvalidInputError(f"training index {bad} is out of range [0, {n})")
        if len(torch.unique(idx)) != len(idx):
            raise InvalidInputError("training indices contain duplicates; pass each index once")
        if len(idx) >= n:
            raise InvalidInputError(
                "cannot remove every training example: the retained objective would be empty"
            )
        return idx

    def _query_gradients(self, examples: ExampleSet, which: str = "measurement") -> Tensor:
        engine = self.state.engine
        return torch.cat(
            [engine.grads(b, which).to(torch.float64) for b in examples.batches(self.batch_size)]
        )

    def _out(self, x: Tensor) -> Tensor:
        return x.to(self._space.dtype).cpu()

    def _show(self) -> bool:
        return self.state.method.context.progress if self.state.method.context else False

    # ------------------------------------------------------------------ questions
    def scores(self, test: Any) -> Tensor:
        """Removal effect of each training example on each test measurement, [n_test, n_train].

        ``scores[t, j]`` predicts ``m_t(theta without j) - m_t(theta)``.
        """
        examples = self._examples(test, "test set")
        state = self.state
        if isinstance(state.method, DirectMethod):
            return self._out(state.method.scores(state, examples, self.estimator, self.relatif))
        Q = self._query_gradients(examples)  # [T, P]
        if self.estimator == "if":
            U = state.method.solve(Q)  # H^{-1} grad m_t, one solve per query
            return self._out(state.attributed_products(U) / state.n)
        S = torch.empty(Q.shape[0], state.n, dtype=torch.float64)
        deltas = removal_deltas(state, self.estimator, relatif=self.relatif)
        total = -(-state.n // self.batch_size)
        for batch, delta in tqdm(
            deltas, total=total, desc=self.estimator, disable=not self._show()
        ):
            S[:, batch.indices] = (Q @ delta.T).cpu()
        return self._out(S)

    def module_scores(self, test: Any) -> dict[str, Tensor]:
        """IF scores split by layer: layer name -> [n_test, n_train], summing to ``scores``.

        See :func:`infkit.kfac.per_module_scores` (methods.md §4.4, §6.8).
        """
        return {name: self._out(s) for name, s in per_module_scores(self, test).items()}

    def token_scores(
        self,
        test: Any,
        indices: Sequence[int] | Tensor | None = None,
        positions: int | None = None,
    ) -> TokenScores:
        """Per-position contributions of training sequences to the IF scores (methods.md §4.4).

        ``result.tokens[t, j, s]`` is position s of training sequence ``indices[j]``;
        ``result.total`` equals ``scores(test)[:, indices]``. See
        :func:`infkit.kfac.per_token_scores`.
        """
        return per_token_scores(self, test, indices, positions)

    def self_scores(self) -> Tensor:
        """Removal effect of each training example on its own loss, [n_train].

        Large values flag examples the model needs to fit them: mislabelled points and outliers.
        """
        state = self.state
        if isinstance(state.method, DirectMethod):
            return self._out(state.method.self_scores(state, self.estimator, self.relatif))
        out = torch.empty(state.n, dtype=torch.float64)
        deltas = removal_deltas(state, self.estimator, relatif=self.relatif)
        total = -(-state.n // self.batch_size)
        for batch, delta in tqdm(deltas, total=total, desc="self", disable=not self._show()):
            out[batch.indices] = (state.loss_grads(batch) * delta).sum(1).cpu()
        return self._out(out)

    def remove(self, indices: Sequence[int] | Tensor) -> RemovalEffect:
        """Predicted effect of removing the training examples ``indices`` jointly."""
        idx = self._indices(indices)
        if self.estimator == "relatif":
            group_delta(self.state, "relatif", idx)  # raises: no counterfactual units
        if isinstance(self.state.method, DirectMethod):
            delta = self.state.method.group_delta(self.state, idx, self.estimator)
        else:
            delta = group_delta(self.state, self.estimator, idx)
        return RemovalEffect(self, idx, self._out(delta))

    def top_k(self, test: Any, k: int = 10) -> TopK:
        """The k strongest proponents and opponents of each test example."""
        S = self.scores(test)
        k = min(k, S.shape[1])
        helpful = -S if self.task.higher_is_better else S
        pro = helpful.topk(k, dim=1)
        con = (-helpful).topk(k, dim=1)
        return TopK(
            proponent_indices=pro.indices,
            proponent_scores=S.gather(1, pro.indices),
            opponent_indices=con.indices,
            opponent_scores=S.gather(1, con.indices),
        )

    def leverages(self) -> Tensor:
        """Generalised leverages h_j = tr(Lambda_j J_j H^{-1} J_j^T) / N, [n_train]."""
        return self._out(leverages(self.state))

    def input_influence(self, test: Any, indices: Sequence[int] | Tensor) -> Tensor:
        """Koh & Liang's input-perturbation influence, [n_test, len(indices), *x_shape].

        Entry [t, j] is the gradient of test measurement m_t, after retraining, with respect to
        training input x_j: ``-(1/N) d/dx_j (H^{-1} grad m_t)^T grad_theta l_j(x_j)``. Moving x_j
        by a small delta changes m_t by about ``<entry, delta>``: the basis of training-set
        attacks. It is the first-order (IF) derivative, whatever the estimator.
        """
        examples = self._examples(test, "test set")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        state = self.state
        U = state.method.solve(self._query_gradients(examples))
        parts = [
            state.engine.input_gradients(batch, U).to(torch.float64)
            for batch in state.train.batches(self.batch_size, idx)
        ]
        grads = torch.cat(parts)  # [n_idx, T, *x_shape]
        return self._out(-grads.transpose(0, 1) / state.n)

    def predicted_change(
        self, data: Any, delta: Tensor, which: str, indices: Tensor | None = None
    ) -> Tensor:
        """First-order change of ``which`` (outputs / loss / measurement) on ``data`` under delta."""
        examples = self._examples(data, "data")
        method = self.state.method
        if indices is not None and isinstance(method, DirectMethod):
            own = method.removal_change(examples, indices, self.estimator, which)
            if own is not None:
                return own.to(self._space.dtype).cpu()
        engine = self.state.engine
        parts = [
            directional_derivatives(engine, b, delta, which)
            for b in examples.batches(self.batch_size)
        ]
        return torch.cat(parts).to(self._space.dtype)

    def describe(self) -> dict[str, Any]:
        """The settings and diagnostics of this fit, for reports."""
        state = self.state
        return {
            **state.method.describe(),
            "estimator": self.estimator,
            "l2": self.l2,
            "damping": "auto" if self.auto_damping else self.damping,
            "n_train": state.n,
            "n_params": self.n_params,
            "stationarity": self.stationarity,
        }


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())
