"""method="source": segmented unrolled differentiation (SOURCE, Bae et al. 2024).

Between the exact metagradients of ``unrolled`` and an influence function at the final
parameters: the recorded run (:mod:`infkit.recipe`) is cut into L segments; within segment l the
curvature ``H_l`` (the GGN of the step objective, l2 included) and the per-example gradients
``g_{l,j}`` are held at their values at the segment's middle step, so the K_l steps of gradient
descent with learning rates eta_t have a closed form. With ``S_l = prod_{t in l} (I - eta_t H_l)``
for SGD (the steps as taken) and ``S_l = exp(-c_l H_l)``, ``c_l = sum_{t in l} eta_t / (1 - mu)``,
for momentum mu (gradient flow at the effective rate; :class:`SegmentSteps`):

    d theta_T / d w_j = -(1/N) sum_l (S_L ... S_{l+1}) (I - S_l) H_l^{-1} (g_{l,j} - g_l_bar)

(``g_l_bar``: the mean gradient, from the retained-mean normaliser; 0 with ``"nominal"``), and
``scores[t, j] = -grad m_t(theta_T)^T d theta_T / d w_j``. One segment at a converged run is the
influence function (``(I - S) H^{-1} -> H^{-1}``). Functions of ``H_l`` are applied by block
Lanczos on GGN-vector products (``segment_curvature="krylov"``, matrix-free, the default), in
EK-FAC's Kronecker eigenbasis (``"ekfac"``) or in the dense GGN's (``"exact"``, small models)
(docs/methods/unrolled.md §8).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from infkit.curvature import CurvatureOperator, product_work_bytes
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, UnsupportedError, warn
from infkit.estimators import Estimator
from infkit.fitted import Fitted
from infkit.gradients import PerExample
from infkit.kfac.curvature import KroneckerCurvature, KroneckerOptions
from infkit.methods.base import Fidelity, Method, register
from infkit.methods.exact import Exact
from infkit.methods.unrolled import checked_replay
from infkit.options import option
from infkit.parameters import ParameterSpace
from infkit.progress import track
from infkit.recipe import SGD, Momentum, TrainingRun

#: a function of the eigenvalues (ridge included), applied elementwise
Spectral = Callable[[Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class SourceOptions(KroneckerOptions):
    """Options of ``method="source"`` (and the Kronecker options of its EK-FAC curvature)."""

    run: TrainingRun | None = option(
        None, "the recorded training run (Recipe.train returns it): what is approximated"
    )
    segments: int = option(3, "segments L the run is cut into (curvature held in each)", minimum=1)
    segment_curvature: Literal["krylov", "ekfac", "exact"] = option(
        "krylov",
        "each segment's curvature: the GGN through Krylov products (matrix-free), EK-FAC's "
        "Kronecker eigenbasis, or the dense GGN (small models)",
    )
    krylov_steps: int = option(
        20, "Lanczos steps per block of vectors for segment_curvature='krylov'", minimum=1
    )


class SegmentCurvature:
    """H_l of one segment and its per-example gradients, at the segment's middle parameters."""

    def __init__(self, fitted: Fitted, options: SourceOptions) -> None:
        self.fitted = fitted
        self.kronecker: KroneckerCurvature | None = None
        self.basis: Tensor | None = None
        self.values: Tensor | None = None
        self.operator: CurvatureOperator | None = None
        self.krylov_steps = options.krylov_steps
        if options.segment_curvature == "krylov":
            self.operator = CurvatureOperator(
                fitted.engine,
                fitted.train,
                "ggn",
                batch_size=8 * fitted.batch_size,
                work_bytes=product_work_bytes(fitted.memory_limit),
            )
        elif options.segment_curvature == "ekfac":
            self.kronecker = KroneckerCurvature(fitted, options, corrected=True, owner="source")
        else:
            exact = Exact()
            exact.fit(fitted)
            assert exact.data_curvature is not None
            values, self.basis = torch.linalg.eigh(exact.data_curvature)
            self.values = values.clamp_min(0.0) + fitted.ridge

    def apply_many(self, V: Tensor, fns: list[Spectral]) -> list[Tensor]:
        """[fn(H_l) V for fn in fns] for V [k, P] (float64); one Krylov space for all."""
        if self.operator is None:
            return [self.apply(V, fn) for fn in fns]
        operator, ridge = self.operator, self.fitted.ridge

        def product(X: Tensor) -> Tensor:
            return operator.matmat(X).to(torch.float64) + ridge * X

        return krylov_functions(product, V.to(torch.float64), self.krylov_steps, fns)

    def apply(self, V: Tensor, fn: Spectral) -> Tensor:
        """fn(H_l) V for V [k, P] (float64)."""
        V = V.to(torch.float64)
        if self.operator is not None:
            return self.apply_many(V, [fn])[0]
        if self.basis is not None and self.values is not None:
            return ((V @ self.basis) * fn(self.values)) @ self.basis.T
        assert self.kronecker is not None
        curvature = self.kronecker
        ridges = curvature.ridges()
        coords = curvature.to_eigenbasis(V)
        for t in curvature.tracked:
            coords[t.name] = coords[t.name] * fn(curvature.eigenvalues(t.name) + ridges[t.name])
        out = curvature.from_eigenbasis(coords, V.shape[0])
        if curvature.layers.others:
            idx = curvature.layers.layout.other_index
            ridge = torch.tensor(self.fitted.ridge, dtype=torch.float64)
            out[:, idx] = V[:, idx] * fn(ridge)
        return out


def krylov_functions(
    product: Callable[[Tensor], Tensor], V: Tensor, steps: int, fns: list[Spectral]
) -> list[Tensor]:
    """[fn(A) V for fn in fns] by block Lanczos from the rows of V [k, P] (A symmetric PSD,
    given by ``product``): the functions of the projected matrix T = Q A Q^T, mapped back
    (exact when the Krylov space holds V's whole reach; fully re-orthogonalised)."""
    scale = V.norm(dim=1).max().clamp_min(1e-300)
    rows: list[Tensor] = []
    block = V
    for _ in range(steps):
        for _twice in range(2):
            for previous in rows:
                block = block - (block @ previous.T) @ previous
        # the block's row space from its singular vectors: QR without pivoting orthogonalises
        # each row against an arbitrary direction where an earlier row is 0 or dependent (a
        # group removal's first segment starts from [0, g]: 2% of g was lost)
        _, sizes, directions = torch.linalg.svd(block, full_matrices=False)
        keep = sizes > 1e-10 * scale
        if not bool(keep.any()):
            break
        rows.append(directions[keep])
        block = product(rows[-1])
        scale = max(float(scale), float(block.norm(dim=1).max()))
    if not rows:  # every vector 0 (a saturated query's gradient): so is every function of it
        return [torch.zeros_like(V) for _ in fns]
    basis = torch.cat(rows)
    T = basis @ product(basis).T
    values, vectors = torch.linalg.eigh(0.5 * (T + T.T))
    coords = vectors.T @ (basis @ V.T)
    return [(basis.T @ (vectors @ (fn(values.clamp_min(0.0))[:, None] * coords))).T for fn in fns]


#: how many times a segment's held product may grow along an eigenvalue beyond 2 / eta before
#: gradient flow's form replaces it (:class:`SegmentSteps`)
GROWTH = 2.0
#: |eta lambda| up to which log prod_t (1 - eta_t lambda) is summed as its power series in
#: lambda (the rates' moments: one term per power, whatever the number of distinct rates);
#: 60 terms leave 0.5**60 / 60 of it out
SERIES_REACH = 0.5
SERIES_TERMS = 60


@dataclasses.dataclass
class SegmentSteps:
    """The steps of one segment as functions of an eigenvalue lambda of H_l.

    ``rates``: each step's learning rate eta_t (over 1 - mu under momentum mu). ``discrete``:
    the steps as gradient descent takes them, ``S_l = prod_t (1 - eta_t lambda)``, exact where
    the curvature and the gradients are those of the segment's middle (SGD); else gradient
    flow, ``S_l = exp(-c_l lambda)`` with ``c_l`` the rates' sum (momentum, whose steps are not
    a function of lambda alone and are taken at their effective rate). Along an eigenvalue
    beyond 2 / eta of a segment of several steps the held curvature's product can grow (a run
    at the edge of stability: 1e18-1e46 over segments of 50-100 steps), where the run, whose
    curvature moves, stayed bounded: where it grows more than :data:`GROWTH`-fold over the
    segment the flow's form is taken, and ``beyond`` records the largest eta lambda met (0:
    none), for a warning. (One step beyond 2 / eta among small ones, a warm-up's last, leaves
    the product near 1: it is kept.)
    """

    rates: tuple[float, ...]
    discrete: bool
    beyond: float = 0.0
    #: the last eigenvalues and their parts: a segment asks decay and integrated of the same
    #: eigenvalues in turn, which share the products
    _last: tuple[Tensor, tuple[Tensor, Tensor]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rates = torch.tensor(self.rates, dtype=torch.float64)
        self.top = float(rates.max()) if len(self.rates) else 0.0
        #: sum_t eta_t^k for k = 1 .. SERIES_TERMS
        self.moments = torch.stack([(rates**k).sum() for k in range(1, SERIES_TERMS + 1)])
        self.counted = sorted(collections.Counter(self.rates).items())

    @property
    def total(self) -> float:
        """c_l, the rates summed."""
        return float(sum(self.rates))

    def _log_product(self, values: Tensor) -> Tensor:
        """sum_t log(1 - eta_t lambda) where every factor is positive (max eta lambda < 1): a
        power series in the rates' moments up to ``SERIES_REACH``, a sum over the distinct
        rates beyond it (few eigenvalues)."""
        out = torch.empty_like(values)
        near = (self.top * values).abs() <= SERIES_REACH
        small = values[near]
        power, total = torch.ones_like(small), torch.zeros_like(small)
        for k in range(1, SERIES_TERMS + 1):  # log(1 - x) = -sum_k x^k / k, x = eta lambda
            power = power * small
            total = total - power * (self.moments[k - 1] / k)
        out[near] = total
        far = values[~near]
        total = torch.zeros_like(far)
        for rate, count in self.counted:
            total = total + count * torch.log1p(-rate * far)
        out[~near] = total
        return out

    def _product(self, values: Tensor) -> Tensor:
        """prod_t (1 - eta_t lambda), directly (where a factor is not positive)."""
        out = torch.ones_like(values)
        for rate, count in self.counted:
            out = out * (1.0 - rate * values) ** count
        return out

    def _parts(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(S_l(lambda), 1 - S_l(lambda)), elementwise (the last call's, for its eigenvalues)."""
        last = self._last
        if last is not None and last[0].shape == values.shape and torch.equal(last[0], values):
            return last[1]
        parts = self._computed_parts(values)
        self._last = (values.clone(), parts)
        return parts

    def _computed_parts(self, values: Tensor) -> tuple[Tensor, Tensor]:
        flow = torch.exp(-self.total * values), -torch.expm1(-self.total * values)
        if not self.discrete:
            return flow
        reach = self.top * values
        unstable = (
            reach > 2.0 if len(self.rates) > 1 else torch.zeros_like(values, dtype=torch.bool)
        )
        if bool(unstable.any()):  # of those, the ones whose product grows (|S_l| > 2)
            beyond = values[unstable]
            grows = torch.zeros_like(beyond)
            for rate, count in self.counted:
                grows = grows + count * torch.log((1.0 - rate * beyond).abs())
            unstable[unstable.clone()] = grows > math.log(GROWTH)
        if bool(unstable.any()):
            self.beyond = max(self.beyond, float(reach[unstable].max()))
        positive = reach < 1.0
        decay, gone = flow[0].clone(), flow[1].clone()
        logs = self._log_product(values[positive])
        decay[positive], gone[positive] = torch.exp(logs), -torch.expm1(logs)
        other = ~positive & ~unstable
        product = self._product(values[other])
        decay[other], gone[other] = product, 1.0 - product
        return decay, gone

    def decay(self, values: Tensor) -> Tensor:
        """S_l(lambda): how the segment carries what came before."""
        return self._parts(values)[0]

    def integrated(self, values: Tensor) -> Tensor:
        """(1 - S_l(lambda)) / lambda (c_l at lambda = 0): the steps' summed effect. Where
        every factor 1 - eta_t lambda is positive, ``1 - S_l`` is ``-expm1`` of the factors'
        summed logarithms: no cancellation at small lambda."""
        gone = self._parts(values)[1]
        nonzero = values.abs() > 1e-300
        out = gone / torch.where(nonzero, values, torch.ones_like(values))
        return torch.where(nonzero, out, torch.full_like(values, self.total))


@register
class Source(Method):
    """SOURCE: the run cut into segments of constant curvature (module docstring)."""

    name = "source"
    summary = (
        "SOURCE: the recorded run cut into segments, curvature and gradients held in each, "
        "closed form per segment (GGN by block Lanczos, EK-FAC or exact curvature)"
    )
    Options = SourceOptions
    uses_training_gradients = False
    stationarity_pass = False
    fidelity = Fidelity(reference="trajectory")
    options: SourceOptions

    def __init__(self, options: SourceOptions | None = None, /, **values: Any) -> None:
        super().__init__(options, **values)
        self.curvature = "trajectory"
        self.parts: list[tuple[SegmentCurvature, SegmentSteps]] = []
        self.mean_gradients: list[Tensor] = []

    @property
    def assumes_optimum(self) -> bool:
        return False

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        run = self.options.run
        if run is None:
            raise InvalidInputError(
                "method 'source' needs run=: the recorded training run, from "
                "infkit.Recipe(...).train(task, train) (docs/methods/unrolled.md)"
            )
        update = run.recipe.update
        if isinstance(update, SGD):
            scale = 1.0
        elif isinstance(update, Momentum):
            scale = 1.0 / (1.0 - update.momentum)
        else:
            raise UnsupportedError(
                f"method 'source' has a closed form for SGD and momentum runs, not for "
                f"{type(update).__name__}; use method='unrolled' (exact for any optimiser)"
            )
        if fitted.damping != 0:  # (it moved a tester's scores by 34-43% without a word)
            raise InvalidInputError(
                f"method 'source' approximates the run's own objective, whose curvature is the "
                f"step objective's (l2 included): damping must be 0, got {fitted.damping}"
            )
        replay, weights = checked_replay(self.name, run, fitted)
        if not bool((weights == 1).all()):
            # the segments' curvature and pushes are the unweighted set's: a tester's run with
            # weights 0 and 2.5 read 0.06-0.23 from the metagradients where one step a segment
            # is exact
            raise UnsupportedError(
                "method 'source' holds each segment's curvature and gradients of the training "
                "set as it is, and this run was trained with data weights other than 1 "
                f"({int((weights != 1).sum())} of {len(weights)}): use method='unrolled', exact "
                "for any weights, or record the run without weights (a subset as its own "
                "training set)"
            )
        steps = run.recipe.steps
        bounds = [
            round(k * steps / self.options.segments) for k in range(self.options.segments + 1)
        ]
        bounds = sorted(set(bounds))
        middles = {(a + b) // 2: (a, b) for a, b in itertools.pairwise(bounds)}
        states: dict[int, Tensor] = {}
        final = initial = run.initial.to(weights.dtype)  # (a float32 run, a float64 model)
        for t, theta, _buffers, _loss in replay.trajectory(initial, weights):
            if t in middles:
                states[t] = theta
            final = theta
        run.require_replayed(f"method {self.name!r}", final)
        self.parts, self.mean_gradients = [], []
        for middle in sorted(middles):
            a, b = middles[middle]
            rates = tuple(scale * run.recipe.learning_rate(t) for t in range(a, b))
            plain = isinstance(update, SGD) or scale == 1.0  # momentum 0 is SGD
            steps_of = SegmentSteps(rates, discrete=plain)
            segment = self._record_at(fitted, states[middle])
            self.parts.append((SegmentCurvature(segment, self.options), steps_of))
            self.mean_gradients.append(self._mean_gradient(segment, run))

    def _record_at(self, fitted: Fitted, theta: Tensor) -> Fitted:
        """The fitted record with the model at ``theta`` (a copy; factors never saved)."""
        model = copy.deepcopy(fitted.task.model)
        space = ParameterSpace(model, fitted.space.names)
        space.assign_(theta)
        task = fitted.task.with_model(model)
        return dataclasses.replace(
            fitted,
            task=task,
            space=space,
            engine=PerExample(task, space),
            theta=space.flat(),
            train_gradients=None,
            objective_gradient=None,
            stationarity=None,
            workdir=None,
        )

    def _mean_gradient(self, segment: Fitted, run: TrainingRun) -> Tensor:
        """g_l_bar: the (weighted) mean training-loss gradient, for the retained normaliser."""
        total = torch.zeros(segment.space.size, dtype=torch.float64)
        if run.recipe.normalise != "retained":
            return total
        weights = run.weights.to(torch.float64)
        for batch in segment.train.batches(segment.training_gradient_batch_size):
            total += weights[batch.indices] @ segment.loss_grads(batch)
        return total / weights.sum()

    # ------------------------------------------------------------------ answers
    def _effects(self, U: Tensor) -> Tensor:
        """-d(u_q^T theta_T)/dw for the rows u_q of U [Q, P]: [Q, N] float64."""
        fitted = self.fitted
        U = U.to(torch.float64)
        out = torch.zeros(U.shape[0], fitted.n, dtype=torch.float64)
        for (part, steps), mean in zip(reversed(self.parts), reversed(self.mean_gradients)):
            V, carried = part.apply_many(U, [steps.integrated, steps.decay])
            for batch in part.fitted.train.batches(part.fitted.training_gradient_batch_size):
                out[:, batch.indices] += V @ part.fitted.loss_grads(batch).T
            out -= (V @ mean)[:, None]
            U = carried
        self._warn_beyond_stability()
        return out / fitted.n

    def _warn_beyond_stability(self) -> None:
        """Say where a segment's held curvature had eigenvalues beyond 2 / eta (taken as
        gradient flow's there, :class:`SegmentSteps`)."""
        beyond = [(k, steps.beyond) for k, (_, steps) in enumerate(self.parts) if steps.beyond]
        if beyond:
            named = ", ".join(f"{k} (eta lambda up to {reach:.3g})" for k, reach in beyond[:4])
            named += f" and {len(beyond) - 4} more" if len(beyond) > 4 else ""
            warn(
                f"method 'source': the curvature held in segment(s) {named} has eigenvalues "
                "beyond 2 / eta: gradient descent with it held diverges along them over the "
                "segment's steps, where the run, whose curvature moves, stayed bounded (the "
                "edge of stability). Those directions are taken as gradient flow's, an "
                "approximation of the run's oscillation there: use more segments (one step "
                "each is exact) or method='unrolled'"
            )

    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        return self._effects(self.fitted.query_gradients(queries, "measurement"))

    def self_scores(self, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        out = torch.empty(fitted.n, dtype=torch.float64)
        size = max(1, fitted.batch_size)
        starts = list(range(0, fitted.n, size))
        for start in track(starts, fitted.progress, "source self-scores", len(starts)):
            idx = torch.arange(start, min(start + size, fitted.n))
            effects = self._effects(fitted.loss_grads(fitted.train.take(idx)))
            out[idx] = effects[torch.arange(len(idx)), idx]
        return out

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        delta = torch.zeros(1, fitted.space.size, dtype=torch.float64)
        for (part, steps), mean in zip(self.parts, self.mean_gradients):
            removed = part.fitted.loss_grads(part.fitted.train.take(indices)).sum(0)
            push = (removed - len(indices) * mean)[None] / fitted.n
            both = torch.cat([delta, push])
            decayed, integrated = part.apply_many(both, [steps.decay, steps.integrated])
            delta = decayed[:1] + integrated[1:]
        self._warn_beyond_stability()
        return delta[0]

    def state(self) -> dict[str, Any]:
        raise UnsupportedError(
            "method 'source' is not saved with Influence.save: its state is the training run "
            "and one curvature per segment. keep the TrainingRun and fit again"
        )

    def describe(self) -> dict[str, Any]:
        record = super().describe()
        run = self.options.run
        if run is not None:
            record["recipe"] = run.recipe.record()
        record["segment_learning_rates"] = [round(steps.total, 6) for _, steps in self.parts]
        return record
