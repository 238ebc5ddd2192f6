"""Ground truth by actual retraining: leave-one-out, group removal and random subsets (LDS).

Removing a set F means retraining on ``mean_{i not in F} l_i + (l2/2)||theta||^2`` (the core
convention) to a tight optimum, with full-batch L-BFGS warm-started from the trained parameters.
With ``run=`` (a :class:`~infkit.recipe.TrainingRun`, the model trained by a
:class:`~infkit.recipe.Recipe`), retraining is instead the same recipe replayed from the same
initial parameters with the removed examples' weights set to 0: the ground truth of networks
trained by SGD, and what ``method="unrolled"`` differentiates. The model passed in is never
modified: retraining happens on a copy.

Long runs can be resumed: with ``cache_dir``, each retrained result is committed atomically to an
artifact store (:mod:`infkit.store`), keyed by everything it depends on, and found again by the
next call that depends on exactly the same things; a damaged file raises an error naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infkit.data import ExampleSet, checked_indices, kept_masks
from infkit.errors import InvalidInputError, NonFiniteError, NotConvergedWarning, warn
from infkit.example_checks import check_examples
from infkit.fingerprint import (
    data_fingerprint,
    model_fingerprint,
    task_fingerprint,
)
from infkit.fitted import probe_forward_writes
from infkit.gradients import PerExample, check_finite_rows
from infkit.options import integer_argument
from infkit.parameters import ParameterSpace
from infkit.progress import resolve, track
from infkit.recipe import Replay, TrainingRun
from infkit.serial import one_at_a_time
from infkit.store import ArtifactStore
from infkit.task import Task
from infkit.training import check_tolerance, checked_l2, checked_max_iter, train_to_optimum

#: How far retraining on all the data may move the model passed in, as a fraction of the median
#: removal's change, before :func:`leave_one_out` and :func:`without` say it was not at its
#: optimum (:func:`_base`).
START_MOVE = 0.01
#: How many times the largest objective of the run itself (and 1) a retraining's replay of it
#: may reach before it counts as diverged (:func:`_replay`): a removal changes a step's batch by
#: a factor of its size at most, and gradient descent that grows its objective a million-fold
#: beyond its run's is not training.
DIVERGED = 1e6


@dataclass
class Retrained:
    """A model retrained without ``removed``.

    Attributes:
        theta: retrained flat parameters [P]; ``delta``: theta - theta-hat [P], theta-hat the
            model passed in retrained on all the data the same way (itself at its optimum;
            without nothing removed, theta-hat - theta, the model's own step to it).
        gradient_norm: ||grad L_R|| at the end (how tight the optimum is).
        target: the gradient norm the retraining had to reach (``tolerance`` times the norm at
            the warm start, or times 1 when that is smaller); NaN for a replayed recipe, which
            seeks no optimum.
        converged: whether it reached ``target``, or a float32 (or coarser) retraining its
            precision's floor (:attr:`~infkit.training.TrainResult.done`); always True for a
            replayed recipe. A result that did not is not the retrained optimum, so not ground
            truth.
        start_move: ``||theta-hat - theta||``, how far retraining on all the data moved the
            model passed in (0 at its optimum; a warning says when it is not small).
        cached: whether the result was read from ``cache_dir`` rather than computed.
    """

    task: Task
    removed: Tensor
    theta: Tensor
    delta: Tensor
    gradient_norm: float
    evaluations: int
    target: float = float("nan")
    converged: bool = True
    start_move: float = 0.0
    cached: bool = False

    @property
    def description(self) -> str:
        """What was removed, for messages: ``"without example 4"``, ``"without 3 examples"``,
        ``"on all the data"``."""
        k = len(self.removed)
        if k == 0:
            return "on all the data"
        return f"without example {int(self.removed[0])}" if k == 1 else f"without {k} examples"

    def model(self) -> torch.nn.Module:
        clone = copy.deepcopy(self.task.model)
        ParameterSpace(clone).assign_(self.theta)
        return clone

    def _evaluate(self, data: Any, which: str) -> Tensor:
        examples = data if isinstance(data, ExampleSet) else ExampleSet(data, name="data")
        if which == "outputs":  # the outputs read no label: their inputs alone are checked
            examples.check_finite(targets=False)
        else:
            checked_queries(self.task, examples, measured=which == "measurement")
        return self.values(examples, which)

    def values(self, examples: ExampleSet, which: str) -> Tensor:
        """The retrained model's ``which`` (``"outputs"``, ``"loss"``, ``"measurement"``) on
        ``examples`` as they are (checked by the caller, :func:`checked_queries`); a value
        that is not finite names this retraining."""
        model = self.model()
        task = Task(
            model,
            self.task.loss,
            self.task.measurement,
            output_fn=self.task.output_fn,
            higher_is_better=self.task.higher_is_better,
        )
        engine = PerExample(task, ParameterSpace(model))
        fn = {"outputs": engine.outputs, "loss": engine.losses, "measurement": engine.measurements}[
            which
        ]
        parts = []
        for batch in examples.batches(1024):
            part = fn(batch)
            check_finite_rows(part, batch, f"{which} by the model retrained {self.description}")
            parts.append(part.reshape(part.shape[0], -1) if which == "outputs" else part)
        return torch.cat(parts)

    def outputs(self, data: Any) -> Tensor:
        """Outputs of the retrained model, [n, C]."""
        return self._evaluate(data, "outputs")

    def losses(self, data: Any) -> Tensor:
        """Per-example losses of the retrained model, [n]."""
        return self._evaluate(data, "loss")

    def measurements(self, data: Any) -> Tensor:
        """Task measurements of the retrained model, [n]."""
        return self._evaluate(data, "measurement")


class RetrainCache:
    """Retraining results of one experiment in an artifact store (``cache_dir``).

    Each result is keyed by everything it depends on: the model's parameters and architecture
    (the warm start), the task's loss, the full training data, the removed examples, ``l2`` and
    the stopping rule; a result from another experiment sharing the directory is never read
    (docs/evaluation.md §1). Results are verified (checksums) when loaded.
    """

    KIND = "retrain"

    def __init__(
        self,
        cache_dir: str | Path,
        task: Task,
        examples: ExampleSet,
        l2: float,
        tolerance: float,
        max_iter: int,
        run: TrainingRun | None = None,
    ) -> None:
        self.store = ArtifactStore(cache_dir)
        self.base = {
            # (converged counts a float32 retraining at its precision's floor since 0.2.0: a
            # result cached before, flagged otherwise, is computed again)
            "result": "theta, gradient_norm, evaluations, target, converged at precision",
            "model": model_fingerprint(task.model),
            "task": task_fingerprint(task),
            "data": data_fingerprint(examples),
            "l2": float(l2),
            "tolerance": float(tolerance),
            "max_iter": int(max_iter),
        }
        if run is not None:
            self.base["recipe"] = run.recipe.record()
            self.base["initial"] = _digest(run.initial)
            self.base["weights"] = _digest(run.weights)

    def identity(self, removed: Tensor) -> dict[str, Any]:
        ordered = removed.sort().values.to(torch.int64).numpy().tobytes()
        return {
            **self.base,
            "removed": hashlib.sha256(ordered).hexdigest()[:32],
            "n_removed": len(removed),
        }

    def load(self, removed: Tensor) -> dict[str, Tensor] | None:
        identity = self.identity(removed)
        # (no overwrite option here: a tester was told to pass one, which no caller takes)
        remedy = (
            f"Delete {self.store.path(self.KIND, identity)}: that retraining then runs again "
            "(the other results in the cache are kept)"
        )
        artifact = self.store.load(self.KIND, identity, remedy)
        return None if artifact is None else artifact.tensors()

    def save(self, removed: Tensor, values: dict[str, Tensor]) -> None:
        self.store.save(self.KIND, self.identity(removed), tensors={"tensors": values})


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().cpu().contiguous().to(torch.float64).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def _cache(
    cache_dir: str | Path | None,
    task: Task,
    examples: ExampleSet,
    l2: float,
    tolerance: float,
    max_iter: int,
    run: TrainingRun | None,
) -> RetrainCache | None:
    """The retraining cache of an experiment (None without ``cache_dir``), once its data is
    checked as fit checks it: each retraining's train_to_optimum then finds it checked."""
    check_tolerance(tolerance)
    engine = PerExample(task, ParameterSpace(task.model))
    check_examples(engine, examples)
    if run is not None:
        _check_run(run, task, examples, l2)
    if cache_dir is None:
        return None
    # what a forward pass writes (kept activations, a counter) is no part of the key
    probe_forward_writes(engine, examples)
    return RetrainCache(cache_dir, task, examples, l2, tolerance, max_iter, run)


def checked_queries(task: Task, test: Any, measured: bool = False) -> ExampleSet:
    """The test set as checked examples, before a retraining measures on it: NaN or Inf in
    its data, inputs the model refuses and labels the task cannot read, each named
    (:func:`~infkit.example_checks.check_examples`; ``measured``: read through the measurement
    alone), as ``scores`` checks its queries."""
    queries = test if isinstance(test, ExampleSet) else ExampleSet(test, name="test set")
    if not queries._checked:
        check_examples(PerExample(task, ParameterSpace(task.model)), queries, measured=measured)
    return queries


def _check_run(run: TrainingRun, task: Task, examples: ExampleSet, l2: float) -> None:
    """Refuse a run that is not the one that trained ``task``'s model on ``examples``: its N,
    l2 and parameter count, the model at the run's final parameters, and the recipe replayed
    on ``examples`` ending there (a training set with the run's N but other examples or
    labels would otherwise be retrained on silently)."""
    if not isinstance(run, TrainingRun):
        raise InvalidInputError(
            f"run must be the TrainingRun that Recipe.train returned, got {type(run).__name__}"
        )
    owner = "retraining by the run"
    run.require_model(owner, len(examples), l2, ParameterSpace(task.model).flat())
    replay = Replay(run.recipe, task.with_model(copy.deepcopy(task.model)), examples)
    final, _ = replay.final(run.initial.to(replay.space.dtype), run.weights.to(replay.space.dtype))
    run.require_replayed(owner, final)


@one_at_a_time
def without(
    task: Task,
    train: Any,
    indices: Sequence[int] | Tensor,
    l2: float,
    *,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
    cache_dir: str | Path | None = None,
    run: TrainingRun | None = None,
) -> Retrained:
    """Retrain without the training examples ``indices`` (warm start from the trained model).

    ``delta`` is measured from theta-hat, the model retrained on all the data the same way
    (the model itself at its optimum; a warning says when it moved, :func:`_base`); without
    any example removed it is theta-hat - theta, the model's own step to its optimum. With
    ``run`` (the model's :class:`~infkit.recipe.TrainingRun`), the recipe is replayed from
    its initial parameters with the removed examples' weights set to 0 instead. With
    ``cache_dir`` the result is kept in an artifact store and reused by the next call that
    depends on exactly the same model, task, data, removed examples and settings. A retraining
    that stops at ``max_iter`` short of ``tolerance`` is flagged (``converged``) and warned about.
    """
    examples = ExampleSet(train, name="training set")
    l2, max_iter = checked_l2(l2), checked_max_iter(max_iter)
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    r = _retrain(task, examples, indices, l2, tolerance, max_iter, cache, run)
    done = [r]
    if len(r.removed):  # without nothing: the step to theta-hat itself, asked for
        base = _base(task, examples, l2, tolerance, max_iter, cache, run)
        r = dataclasses.replace(r, delta=r.theta - base.theta, start_move=float(base.delta.norm()))
        _warn_if_moved(base, [r.delta], "group-removal")
        done.append(base)
    _warn_late("group-removal", [(x.description, x) for x in done], max_iter)
    return r


def _retrain(
    task: Task,
    examples: ExampleSet,
    indices: Sequence[int] | Tensor,
    l2: float,
    tolerance: float,
    max_iter: int,
    cache: RetrainCache | None,
    run: TrainingRun | None = None,
) -> Retrained:
    n = len(examples)
    removed = checked_indices(indices, n, what="removed index", unique=True, allow_empty=True)
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    if not bool(keep.any()):
        raise InvalidInputError("cannot retrain without every training example")
    theta0 = ParameterSpace(task.model).flat().clone()
    saved = None if cache is None else cache.load(removed)
    if saved is not None:
        return Retrained(
            task,
            removed,
            saved["theta"],
            saved["theta"] - theta0,
            float(saved["gradient_norm"]),
            int(saved["evaluations"]),
            float(saved["target"]),
            bool(saved["converged"]),
            cached=True,
        )
    clone = copy.deepcopy(task.model)
    clone_task = task.with_model(clone)
    if run is not None:
        theta, gradient_norm, evaluations = _replay(clone_task, examples, run, keep)
        target, converged = float("nan"), True
    else:
        result = train_to_optimum(
            clone_task,
            examples,
            l2,
            indices=keep.nonzero().squeeze(1),
            max_iter=max_iter,
            tolerance=tolerance,
            warn_unconverged=False,  # the retrainings are reported together (warn_unconverged)
            progress=False,  # (their own count is shown)
        )
        theta, gradient_norm, evaluations = result.theta, result.gradient_norm, result.evaluations
        # (a float32 retraining at its precision's floor went as far as it goes, as
        # train_to_optimum counts it: a tester's matched float64's to 2e-5, "not ground truth")
        target, converged = result.target, result.done
    if cache is not None:
        cache.save(
            removed,
            {
                "theta": theta,
                "gradient_norm": torch.tensor(gradient_norm, dtype=torch.float64),
                "evaluations": torch.tensor(evaluations),
                "target": torch.tensor(target, dtype=torch.float64),
                "converged": torch.tensor(converged),
            },
        )
    return Retrained(
        task, removed, theta, theta - theta0, gradient_norm, evaluations, target, converged
    )


def _warn_late(what: str, named: list[tuple[str, Retrained]], max_iter: int) -> None:
    """:func:`warn_unconverged` for those of the ``(description, result)`` retrainings that
    did not converge (nothing when all did)."""
    late = [(name, r) for name, r in named if not r.converged]
    warn_unconverged(
        what,
        [name for name, _ in late],
        [r.gradient_norm for _, r in late],
        [r.target for _, r in late],
        max_iter,
    )


def warn_unconverged(
    what: str, removed: list[str], norms: list[float], targets: list[float], max_iter: int
) -> None:
    """Warn that the retrainings of ``removed`` (descriptions, one per retraining) stopped
    short of their target gradient norms: their changes are not ground truth."""
    if not removed:
        return

    def shortfall(k: int) -> float:  # how many times its target the final norm is
        ratio = norms[k] / targets[k] if targets[k] > 0 else inf
        return ratio if ratio == ratio else inf  # a NaN norm is the worst

    worst = max(range(len(norms)), key=shortfall)
    shown = ", ".join(removed[:5]) + (", ..." if len(removed) > 5 else "")
    warn(
        f"{len(removed)} {what} retraining(s) stopped short of the optimum, at max_iter="
        f"{max_iter} or where L-BFGS and the Newton polish could not progress ({shown}; the "
        f"worst ended at ||grad L|| = {norms[worst]:.3g} against a target of "
        f"{targets[worst]:.3g}): their changes are not those of a retrained optimum, "
        "so they are not ground truth. Raise max_iter; if the gradient norm stalls instead, "
        "loosen tolerance (a float32 model stops near its precision, and so does a float64 "
        "model that computes parts in float32, as Hugging Face's RMSNorm and eager attention "
        "do) or train the model closer to its optimum (retraining starts from it)",
        NotConvergedWarning,
    )


def _base(
    task: Task,
    examples: ExampleSet,
    l2: float,
    tolerance: float,
    max_iter: int,
    cache: RetrainCache | None,
    run: TrainingRun | None,
) -> Retrained:
    """theta-hat, what the changes are measured from: the model passed in retrained on all the
    data, warm-started and stopped as every removal's retraining is (docs/evaluation.md §2).

    At the optimum the model passed in is theta-hat (the retraining stops at once, or polishes
    rounding). Off it, each retraining would also carry the model's own step to the optimum,
    which no removal causes: measured from theta-hat, the changes are the removals' own
    (a ridge model at 0.9 theta* read changes 10x off the closed form's from theta, and equal
    to it from theta-hat). A replayed recipe ends at the model passed in (:func:`_check_run`):
    theta itself."""
    theta = ParameterSpace(task.model).flat()
    if run is not None:
        return Retrained(
            task, torch.zeros(0, dtype=torch.long), theta, torch.zeros_like(theta), 0.0, 0
        )
    return _retrain(task, examples, [], l2, tolerance, max_iter, cache)


def moved_ratio(base: Retrained, changes: list[Tensor]) -> float:
    """How far :func:`_base` moved the model passed in, over the median removal's change
    (``||theta-hat - theta||`` over it; 0 where the move is rounding, 1e300 where every
    removal's change is 0): above :data:`START_MOVE`, the model was not at its optimum."""
    move = float(base.delta.norm())
    rounding = 1e3 * torch.finfo(base.theta.dtype).eps * float(base.theta.norm())
    if move <= rounding:
        return 0.0
    sizes = sorted(float(c.norm()) for c in changes)
    median = sizes[len(sizes) // 2] if sizes else 0.0
    return move / median if median > 0 else 1e300  # (a JSON record has no infinity)


def _warn_if_moved(base: Retrained, changes: list[Tensor], what: str) -> float:
    """Warn when :func:`moved_ratio` is above :data:`START_MOVE`: the model passed in was not
    at its optimum, so answers computed at it (scores) describe another point than the
    retrainings'. Returns the ratio."""
    ratio = moved_ratio(base, changes)
    if ratio <= START_MOVE:
        return ratio
    move = float(base.delta.norm())
    times = f"{ratio:.3g} times" if ratio < 1e300 else "more than"
    coarse = (
        f"; a {str(base.theta.dtype).removeprefix('torch.')} model may go no closer than its "
        "precision: compute the ground truth in float64 (model.double())"
        if base.theta.dtype != torch.float64
        else ""
    )
    warn(
        f"the model passed in is not at the optimum of its objective on the training set (mean "
        f"loss + (l2/2)||theta||^2): retraining on all of it, warm-started as each {what} "
        f"retraining is, moved the parameters by {move:.3g}, {times} the median removal's "
        "change. The changes are measured from that optimum, so they are the removals' own, "
        "but answers computed at the model passed in (its scores) describe another point. "
        "Train it to the optimum first (infkit.train_to_optimum(task, train, l2)), or "
        f"retrain by the recipe that trained it (run=){coarse}",
        NotConvergedWarning,
    )
    return ratio


def _replay(
    task: Task, examples: ExampleSet, run: TrainingRun, keep: Tensor
) -> tuple[Tensor, float, int]:
    """The run's recipe replayed from its initial parameters with the removed weights at 0:
    theta_T, nan (no optimum is sought) and the number of steps. A replay whose objective
    leaves the finite numbers, or grows :data:`DIVERGED` times beyond the largest the run's own
    reached (and 1), is refused: it is no ground truth (a tester's ended at parameters of 1e180
    without a word)."""
    replay = Replay(run.recipe, task, examples)
    weights = run.weights.to(replay.space.dtype) * keep.to(replay.space.dtype)
    # the run's own objectives bound a replay's: a step's batch may lose most of its examples
    # (under the retained mean, a batch of one outlier; the ridge alone, 0, when all go), so
    # the replay's own first objective is no scale (a reviewer's stable runs were refused)
    largest = max(float(run.losses.abs().max()) if len(run.losses) else 0.0, 1.0)
    theta = theta0 = run.initial.to(replay.space.dtype)
    for t, state, _buffers, objective in replay.trajectory(theta0, weights):
        theta = state  # the last item is the state after the final step
        if objective is not None and not abs(objective) <= DIVERGED * largest:  # (NaN too)
            reached = f"the training objective is {objective:.4g} before step {t}"
            raise _diverged_replay(
                run, keep, f"{reached}, where the run's stayed within {largest:.4g}"
            )
    if not bool(torch.isfinite(theta).all()):
        raise _diverged_replay(run, keep, "its final parameters hold NaN or Inf")
    return theta.detach().clone(), float("nan"), run.recipe.steps


def _diverged_replay(run: TrainingRun, keep: Tensor, what: str) -> NonFiniteError:
    """The error of a retraining by the run that diverged, naming what it left out."""
    removed = (~keep).nonzero().squeeze(1).tolist()
    named = ", ".join(str(i) for i in removed[:8]) + (", ..." if len(removed) > 8 else "")
    return NonFiniteError(
        f"retraining by the run without training example(s) [{named}] ({len(removed)} of "
        f"{len(keep)}) diverged: {what}. The recipe is unstable on the data left, so this "
        "retraining is no ground truth: lower the recipe's lr (now "
        f"{run.recipe.lr}) or add warm-up steps, train the model by it again and retrain (or "
        "retrain to the optimum, without run=)"
    )


@dataclass
class LeaveOneOut:
    """Actual leave-one-out changes for a list of training indices.

    Attributes:
        indices: [k] the training examples removed one at a time.
        params: [k, P] actual Delta theta for each.
        measurement: [n_test, k] actual change of each test measurement (``scores``' layout).
        loss: [n_test, k] actual change of each test loss.
        gradient_norms: [k] ||grad L_R|| at each retrained optimum.
        targets: [k] the gradient norm each retraining had to reach (NaN for a replayed recipe).
        converged: [k] bool, whether it did; the warning :func:`leave_one_out` gives names those
            that did not.
        start_move: ``||theta-hat - theta||``: the changes are measured from theta-hat, the
            model passed in retrained on all the data (0 at its optimum; see :func:`_base`).
        start_converged, start_gradient_norm, start_target: that retraining's
            ``converged``, ``gradient_norm`` and ``target``.
        start_move_ratio: ``start_move`` over the median removal's change (:func:`moved_ratio`;
            above :data:`START_MOVE` the call warned).
        reused: how many of the k retrainings were read from ``cache_dir``, not computed.
    """

    indices: Tensor
    params: Tensor
    measurement: Tensor
    loss: Tensor
    gradient_norms: Tensor
    targets: Tensor
    converged: Tensor
    start_move: float = 0.0
    start_converged: bool = True
    start_gradient_norm: float = 0.0
    start_target: float = float("nan")
    start_move_ratio: float = 0.0
    reused: int = 0


@one_at_a_time
def leave_one_out(
    task: Task,
    train: Any,
    test: Any,
    indices: Sequence[int] | Tensor,
    l2: float,
    *,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
    cache_dir: str | Path | None = None,
    progress: bool | None = False,
    run: TrainingRun | None = None,
) -> LeaveOneOut:
    """Retrain once per index without that example; measure parameter and test changes, from
    theta-hat, the model retrained on all the data the same way (the model itself at its
    optimum; a warning says when it moved, :func:`_base`).

    With ``run``, each retraining replays the model's recipe (see :func:`without`). Retrainings
    that stop at ``max_iter`` short of ``tolerance`` are flagged in ``converged`` and named in a
    warning: their changes are not ground truth.
    """
    examples = ExampleSet(train, name="training set")
    idx = checked_indices(indices, len(examples), what="training index", unique=True)
    l2, max_iter = checked_l2(l2), checked_max_iter(max_iter)
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    # checked before any retraining, as scores checks its queries (read through the
    # measurement: a query scores accept has the losses its labels give, 0 where none is read)
    test = checked_queries(task, test, measured=True)
    base = _base(task, examples, l2, tolerance, max_iter, cache, run)
    base_meas, base_loss = base.values(test, "measurement"), base.values(test, "loss")
    params, meas, loss, results = [], [], [], []
    for j in track(idx.tolist(), resolve(progress), "leave-one-out"):
        r = _retrain(task, examples, [j], l2, tolerance, max_iter, cache, run)
        params.append(r.theta - base.theta)
        meas.append(r.values(test, "measurement") - base_meas)
        loss.append(r.values(test, "loss") - base_loss)
        results.append(r)
    ratio = _warn_if_moved(base, params, "leave-one-out")
    converged = torch.tensor([r.converged for r in results], dtype=torch.bool)
    _warn_late("leave-one-out", [(r.description, r) for r in [base, *results]], max_iter)
    return LeaveOneOut(
        idx,
        torch.stack(params),
        torch.stack(meas, 1),
        torch.stack(loss, 1),
        torch.tensor([r.gradient_norm for r in results], dtype=torch.float64),
        torch.tensor([r.target for r in results], dtype=torch.float64),
        converged,
        float(base.delta.norm()),
        base.converged,
        base.gradient_norm,
        base.target,
        ratio,
        sum(r.cached for r in results),
    )


@dataclass
class SubsetRetraining:
    """Models retrained on random subsets: the ground truth of the LDS (docs/evaluation.md §4).

    Attributes:
        masks: [m, N] bool, True where the example was kept.
        measurements: [m, n_test] test measurements of each retrained model.
        converged: [m] bool, whether each retraining reached its optimum (see
            :class:`Retrained`); :func:`subsets` warns about those that did not. None for a
            bank built by hand from measurements made elsewhere.
    """

    masks: Tensor
    measurements: Tensor
    converged: Tensor | None = None


def random_masks(n: int, n_subsets: int, alpha: float, seed: int = 0) -> Tensor:
    """``n_subsets`` random subsets of size floor(alpha * n), as a bool mask [m, n]."""
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must lie in (0, 1), got {alpha}")
    n_subsets = integer_argument("n_subsets", n_subsets, 1)  # (numpy's integers too)
    size = int(alpha * n)
    if size == 0:
        raise InvalidInputError(
            f"alpha = {alpha:g} of N = {n} training examples keeps none (subsets of size "
            f"floor(alpha N) = 0): raise alpha to at least {1 / n:.3g}"
        )
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for k in range(n_subsets):
        masks[k, torch.randperm(n, generator=gen)[:size]] = True
    return masks


@one_at_a_time
def subsets(
    task: Task,
    train: Any,
    test: Any,
    l2: float,
    *,
    n_subsets: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    masks: Tensor | None = None,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
    cache_dir: str | Path | None = None,
    progress: bool | None = False,
    run: TrainingRun | None = None,
) -> SubsetRetraining:
    """Retrain on random subsets and record each model's test measurements.

    Warm-started L-BFGS to the subset's optimum by default; with ``run``, the model's recipe
    replayed from its initial parameters on the subset (see :func:`without`). With
    ``cache_dir``, every retrained model is committed to the artifact store as it finishes, so an
    interrupted bank resumes where it stopped.
    """
    examples = ExampleSet(train, name="training set")
    n = len(examples)
    hint = "random_masks(N, m, alpha) draws them"
    masks = random_masks(n, n_subsets, alpha, seed) if masks is None else kept_masks(masks, hint)
    if masks.dim() != 2 or masks.shape[1] != n:
        raise InvalidInputError(
            f"masks must be [m, N] (True or 1 = kept) with N = {n}, got shape {tuple(masks.shape)}"
        )
    empty = (~masks.any(dim=1)).nonzero().squeeze(1)
    if len(masks) == 0 or len(empty):
        raise InvalidInputError(
            "masks has no subsets"
            if len(masks) == 0
            else f"mask {int(empty[0])} keeps no "
            "training example (True = kept); a retraining needs at least one"
        )
    l2, max_iter = checked_l2(l2), checked_max_iter(max_iter)
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    test = checked_queries(task, test, measured=True)  # before any retraining
    rows, results = [], []
    for mask in track(masks, resolve(progress), "subsets", len(masks)):
        removed = (~mask).nonzero().squeeze(1)
        r = _retrain(task, examples, removed, l2, tolerance, max_iter, cache, run)
        rows.append(r.values(test, "measurement"))
        results.append(r)
    _warn_late("subset", [(f"subset {k}", r) for k, r in enumerate(results)], max_iter)
    converged = torch.tensor([r.converged for r in results], dtype=torch.bool)
    return SubsetRetraining(masks, torch.stack(rows), converged)
