"""method="unrolled": metagradients, the derivative of the test measurement through training.

Where influence functions assume an optimum, this method differentiates the recorded training
run itself (:mod:`infkit.recipe`, :mod:`infkit.unroll`): with data weights ``w`` (1 when trained
normally) entering every step's loss, the score of training example j for test example t is

    scores[t, j] = - w_j d m_t(theta_T(w)) / d w_j   at the run's weights (1 when trained normally),

the first-order change of m_t when j's weight goes from w_j to 0, that is, when j is removed and
the same recipe is rerun from the same initial parameters (docs/methods/unrolled.md); 0 for an
example of weight 0, which the run leaves out. The 1/N of the
mean-form objective is inside the derivative (``normalise="retained"``: a batch's loss is the
weighted mean over its examples). A group removal ``remove(F)`` is the forward-mode derivative
of theta_T along ``-1_F``.

Cost: one reverse pass through every step per batch of ``query_batch`` queries (each step a
Hessian-vector product and per-example gradient dot products, batched over the queries); memory:
the states at ``ceil(steps / checkpoint_every)`` checkpoints plus one segment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, NotFittedError, UnsupportedError, warn
from infkit.estimators import Estimator
from infkit.fitted import Fitted
from infkit.methods.base import Fidelity, Method, register
from infkit.options import Options, option
from infkit.parameters import ParameterSpace
from infkit.plan import RunShape, Stage
from infkit.progress import track
from infkit.recipe import Recipe, Replay, TrainingRun, replay_tolerance
from infkit.task import Task
from infkit.unroll import (
    Checkpoints,
    checkpoint,
    default_interval,
    metagradients,
    not_a_function_message,
    segment_drift,
    tangent,
)


def checked_replay(name: str, run: TrainingRun | None, fitted: Fitted) -> tuple[Replay, Tensor]:
    """The run's replay on the fitted training set, after checking that the run is this
    model's (:meth:`TrainingRun.require_model`); the caller checks where the replay ends
    (:meth:`TrainingRun.require_replayed`)."""
    if run is None:
        raise InvalidInputError(
            f"method {name!r} needs run=: the recorded training run, from "
            "infkit.Recipe(...).train(task, train) (docs/methods/unrolled.md)"
        )
    run.require_model(f"method {name!r}", fitted.n, fitted.l2, fitted.space.flat().detach())
    replay = Replay(run.recipe, fitted.task, fitted.train)
    return replay, run.weights.to(fitted.space.dtype)


def positive_counts(recipe: Recipe, weights: Tensor) -> Tensor:
    """[steps] long: how many examples of positive weight each step's batch holds (one: the
    step's loss under ``normalise="retained"``, ``w_i l_i / w_i``, does not depend on that
    weight, as the last batch of an epoch when N % batch_size == 1, every step at
    batch_size=1, or zero weights beside it; none: 0 / 0)."""
    n, positive = len(weights), (weights > 0).long()
    if recipe.batch(n, 0) is None:  # full batch: every step alike
        return torch.full((recipe.steps,), int(positive.sum()))
    size, per_epoch = int(recipe.batch_size or n), recipe.batches_per_epoch(n)
    epochs = -(-recipe.steps // per_epoch)
    counts = []  # positive weights in each batch, an epoch at a time (one permutation each)
    for epoch in range(epochs):
        padded = torch.zeros(per_epoch * size, dtype=torch.long)
        padded[:n] = positive[recipe.epoch_order(n, epoch)]
        counts.append(padded.reshape(per_epoch, size).sum(1))
    return torch.cat(counts)[: recipe.steps]


def check_weight_dependence(run: TrainingRun) -> bool:
    """Refuse a run whose every step is of one weighted example under the retained mean (every
    metagradient 0: a tester's scores, all 0, with a warning that blamed the optimiser, where
    leaving an example out moved the test losses by up to 0.15); warn where some steps are (a
    reviewer's example 7, alone in an epoch's last batch: score 0, retraining moved it 0.72);
    returns whether it warned of every step (whose scores are then all 0, said)."""
    recipe = run.recipe
    if recipe.normalise != "retained":
        return False
    counts = positive_counts(recipe, run.weights)
    if not bool(counts.all()):  # (its derivative overflowed, and the error advised damping)
        step = int((counts == 0).nonzero()[0])
        raise InvalidInputError(
            f"method 'unrolled': step {step} of the run trains on a batch whose every weight is "
            "0, and under normalise='retained' its loss, sum_i w_i l_i / sum_i w_i, is then 0 / "
            "0: its metagradients have no value. Record the run with normalise='nominal' (each "
            "step's loss sum_i w_i l_i / |B_t|), or give those examples weights > 0"
        )
    single = counts == 1
    if run.n < 2 or not bool(single.any()):
        return False
    why = (
        "under normalise='retained' such a step's loss w_i l_i / w_i does not depend on the "
        "example's weight"
    )
    remedy = (
        "record the run with normalise='nominal' (each step's loss w_i l_i / |B_t|), or "
        "retrain for removals (infkit.retrain with run=)"
    )
    # (with zero weights beside it, a step's zero-weight examples have their metagradients,
    # (l_j - l_i) / w_i: a reviewer's full batch of weights [1, 0, ...] scored them right)
    if bool(single.all()) and bool((run.weights > 0).all()):
        raise InvalidInputError(
            f"method 'unrolled': every step of the run trains on one example of positive "
            f"weight (batch_size={recipe.batch_size}), and {why}: every metagradient is 0, "
            f"though leaving an example out skips its steps. To attribute, {remedy}"
        )
    steps = single.nonzero().reshape(-1).tolist()
    warn(
        f"method 'unrolled': {len(steps)} of the run's {recipe.steps} steps (the first: step "
        f"{steps[0]}) train on one example of positive weight (an epoch's last batch when N % "
        f"batch_size == 1, or zero weights), and {why}: the scores leave out what those steps "
        f"do for their example of positive weight. For scores that count them, {remedy}",
        UserWarning,
    )
    return bool(single.all())


#: the growth of an adjoint over the run (:func:`~infkit.unroll.metagradients`) beyond which
#: the run may be unstable (told so when its scores also run past ten times the measurement):
#: a tester's tanh MLP under full-batch descent grew them 0.5 and 1.3 at learning rates 0.5
#: and 1 (scores within 0.97-0.999 Pearson of retraining), 70 and 931 at 1.6 and 1.7 (scores
#: of 14.6 and 174 against removal effects below 1.4, Pearson -0.57 and -0.31: a reviewer's),
#: 6.6e5 and 8e19 at 2 and 3; stable runs from a standard initialisation 0.9-63, from a small
#: one 1.5e3-2.5e3 (scores of size 2 on losses of 2.3: the second condition keeps them quiet)
UNSTABLE_GROWTH = 10.0


def warn_unstable(growth: float, largest: float, scale: float, name: str) -> None:
    """Warn where the run amplified a perturbation of its state by more than
    :data:`UNSTABLE_GROWTH` and a predicted removal effect (the largest, ``largest``) is more
    than ten times ``scale`` (the largest |measurement| of the queries, at least 1): its
    derivatives are exact, and describe a removal only within a region that small a change
    of the weights stays in. (Growth alone also reads a stable run escaping the saddle of a
    small initialisation, a reviewer's 1.5e3-2.5e3 at Pearson 0.94-0.99 with retraining;
    an unstable run's scores run far past any change the measurement can make.)"""
    if growth > UNSTABLE_GROWTH and largest > 10 * max(scale, 1.0):
        warn(
            f"method {name!r}: the run amplifies a change of its parameters {growth:.3g}-fold "
            "from its first step to its last (the adjoint's growth), and predicts removal "
            f"effects up to {largest:.3g} on measurements of size {scale:.3g}: it is unstable "
            "(a learning rate past the edge of stability, a chaotic trajectory), and its "
            "metagradients, "
            "exact as derivatives, are no first-order prediction of a removal (a tester's "
            "scores of 1e5 where removing the example moved the test loss by 0.7). Retrain by "
            "the recipe for removals (infkit.retrain with run=), or record a stable run (a "
            "smaller learning rate)",
            UserWarning,
        )


@dataclasses.dataclass(frozen=True)
class UnrolledOptions(Options):
    """Options of ``method="unrolled"``."""

    run: TrainingRun | None = option(
        None, "the recorded training run (Recipe.train returns it): what is differentiated"
    )
    checkpoint_every: int | None = option(
        None, "keep the training state every this many steps (None: ceil(sqrt(steps)))", minimum=1
    )
    query_batch: int = option(16, "queries differentiated together in one reverse pass", minimum=1)


@register
class Unrolled(Method):
    """Exact metagradients through a recorded training run (docs/methods/unrolled.md)."""

    name = "unrolled"
    summary = (
        "metagradients: the exact derivative of each test measurement in each training "
        "example's weight through every step of a recorded training run"
    )
    Options = UnrolledOptions
    uses_training_gradients = False
    stationarity_pass = False
    fidelity = Fidelity(reference="trajectory")
    options: UnrolledOptions

    def __init__(self, options: UnrolledOptions | None = None, /, **values: Any) -> None:
        super().__init__(options, **values)
        self.replay: Replay | None = None
        self.checkpoints: Checkpoints | None = None
        self.weights: Tensor | None = None
        self.weight_steps_said = False  # (check_weight_dependence: every step one example)
        self.curvature = "trajectory"

    @property
    def assumes_optimum(self) -> bool:
        return False

    @property
    def run(self) -> TrainingRun:
        checked_run = self.options.run
        if checked_run is None:
            raise InvalidInputError(
                "method 'unrolled' needs run=: the recorded training run, from "
                "infkit.Recipe(...).train(task, train) (docs/methods/unrolled.md)"
            )
        return checked_run

    def check(self, task: Task, space: ParameterSpace) -> None:
        run = self.run
        if run.final.shape != (space.size,):
            raise InvalidInputError(
                f"method 'unrolled': the run has {run.final.numel()} parameters, the model "
                f"{space.size}: pass the run that trained this model"
            )

    # ------------------------------------------------------------------ fit
    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        if fitted.damping != 0:
            raise InvalidInputError(
                f"method 'unrolled' differentiates the run's own objective: damping must be 0, "
                f"got {fitted.damping}"
            )
        replay, weights = checked_replay(self.name, self.run, fitted)
        self.weight_steps_said = check_weight_dependence(self.run)
        initial = self.run.initial.to(fitted.space.dtype)  # (a float32 run, a float64 model)
        kept = checkpoint(replay, initial, weights, self.options.checkpoint_every)
        self.run.require_replayed(f"method {self.name!r}", kept.final)
        # (the reverse pass checks every segment it recomputes; the last one here, at once)
        drift = segment_drift(replay, kept, weights)
        if drift > replay_tolerance(weights.dtype):
            raise InvalidInputError(not_a_function_message(drift, "its last segment"))
        self.replay, self.checkpoints, self.weights = replay, kept, weights

    # ------------------------------------------------------------------ answers
    def _parts(self) -> tuple[Replay, Checkpoints, Tensor]:
        if self.replay is None or self.checkpoints is None or self.weights is None:
            raise NotFittedError("method 'unrolled' is not fitted: call fit(fitted) first")
        return self.replay, self.checkpoints, self.weights

    def _removal_effects(self, cotangents: Tensor) -> tuple[Tensor, float]:
        """-w_j d(c_q^T theta_T)/dw_j for the rows of ``cotangents`` [Q, P]: [Q, N] float64,
        the first-order change when j's weight goes from w_j to 0 (its removal, as
        :meth:`removal` takes it): -d/dw_j at a weight of 1, 0 for an example of weight 0 (not
        in the run; a tester's excluded example read a self-score of 0.28, and a weight-2
        example's column half its removal's change); and the reverse passes' largest adjoint
        growth (:func:`warn_unstable`)."""
        replay, kept, weights = self._parts()
        size = self.options.query_batch
        chunks = list(torch.split(cotangents, size))
        growth: list[float] = []
        rows = [
            -metagradients(replay, kept, weights, c, growth).to(torch.float64)
            for c in track(chunks, self.fitted.progress, "unrolled queries", len(chunks))
        ]
        largest_growth = max(growth, default=0.0)
        if not rows:
            return torch.zeros(0, self.fitted.n, dtype=torch.float64), largest_growth
        return torch.cat(rows) * weights.to(torch.float64).cpu(), largest_growth

    def _measurement_scale(self, examples: ExampleSet, which: str = "measurement") -> float:
        """The largest |measurement| (or loss) of ``examples``: what a removal's predicted
        change is set beside (:func:`warn_unstable`)."""
        engine, largest = self.fitted.engine, 0.0
        with torch.no_grad():
            for batch in examples.batches(self.fitted.batch_size):
                values = (
                    engine.measurements(batch) if which == "measurement" else engine.losses(batch)
                )
                largest = max(largest, float(values.abs().max()))
        return largest

    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        gradients = self.fitted.query_gradients(queries, "measurement")  # warns where it is 0
        S, growth = self._removal_effects(gradients)
        if growth > UNSTABLE_GROWTH and S.numel():
            largest = float(S.abs().max())
            warn_unstable(growth, largest, self._measurement_scale(queries), self.name)
        flat = (gradients != 0).any(dim=1).cpu() & ~(S != 0).any(dim=1)
        if bool(flat.any()) and not self.weight_steps_said:  # (those steps said, at fit)
            k, count = int(flat.nonzero()[0, 0]), int(flat.sum())
            more = f" and {count - 1} more" if count > 1 else ""
            warn(
                f"{queries.name} {queries.example(k)}{more}: the metagradients in every training "
                "example's weight are 0 though the measurement's gradient is not: the run's "
                "updates do not change with the data weights (an update that is piecewise "
                "constant in the gradient, as sign() in Lion, has derivative 0 almost "
                "everywhere). The scores are exact and say nothing of removals: retrain by the "
                "recipe for them (infkit.retrain with run=), or train with a smooth optimiser",
                UserWarning,
            )
        return S

    def self_scores(self, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        out = torch.empty(fitted.n, dtype=torch.float64)
        size = self.options.query_batch
        growth = 0.0
        for start in range(0, fitted.n, size):
            idx = torch.arange(start, min(start + size, fitted.n))
            effects, grown = self._removal_effects(fitted.loss_grads(fitted.train.take(idx)))
            out[idx] = effects[torch.arange(len(idx)), idx]
            growth = max(growth, grown)
        if growth > UNSTABLE_GROWTH and out.numel():
            scale = self._measurement_scale(fitted.train, "loss")
            warn_unstable(growth, float(out.abs().max()), scale, self.name)
        return out

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        replay, _, weights = self._parts()
        direction = torch.zeros_like(weights)
        direction[indices] = -weights[indices]
        initial = self.run.initial.to(weights.dtype)
        change = tangent(replay, initial, weights, direction).to(torch.float64)
        # (forward mode reads no adjoint: a first-order change of the parameters ten times
        # their size for a removal is the unstable run's, a reviewer's 8e4 on a test loss)
        final = float(self.run.final.double().norm())
        if float(change.norm()) > 10 * max(final, 1.0):
            warn(
                f"method {self.name!r}: the first-order change of the parameters for removing "
                f"these {len(indices)} examples is {float(change.norm()):.3g}, against "
                f"parameters of norm {final:.3g}: the run is unstable (a learning rate past "
                "the edge of stability, a chaotic trajectory), and its derivatives are no "
                "prediction of a removal. Retrain by the recipe (infkit.retrain with run=), or "
                "record a stable run (a smaller learning rate)",
                UserWarning,
            )
        return change

    def state(self) -> dict[str, Any]:
        raise UnsupportedError(
            "method 'unrolled' is not saved with Influence.save: its state is the training run "
            "itself. keep the TrainingRun (its initial and final parameters, the recipe) and fit "
            "again, which replays the run once"
        )

    # ------------------------------------------------------------------ plans and records
    def stages(self, shape: RunShape, task: Task, space: ParameterSpace) -> list[Stage]:
        run = self.run
        steps = run.recipe.steps
        every = self.options.checkpoint_every or default_interval(steps)
        states = (steps // every + every) * space.size * shape.itemsize * 3
        passes = -(-shape.n_queries // self.options.query_batch)
        return [
            Stage("replay with checkpoints", 1, states, ("states", states)),
            Stage("reverse passes", passes, states, ("states", states)),
        ]

    def describe(self) -> dict[str, Any]:
        record = super().describe()
        record["recipe"] = self.run.recipe.record()
        if self.checkpoints is not None:
            record["checkpoints"] = self.checkpoints.count
        return record
