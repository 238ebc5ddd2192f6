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
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infkit.data import ExampleSet, checked_indices
from infkit.errors import InvalidInputError, NotConvergedWarning, warn
from infkit.fingerprint import data_fingerprint, model_fingerprint, task_fingerprint
from infkit.gradients import PerExample
from infkit.parameters import ParameterSpace, evaluation_mode
from infkit.progress import resolve, track
from infkit.recipe import Replay, TrainingRun
from infkit.store import ArtifactStore
from infkit.task import Task
from infkit.training import objective_and_gradient, train_to_optimum

#: How large the trained model's own objective gradient may be, as a fraction of a removal's
#: (:func:`warn_unless_optimum`), before the retrained changes are said to include the model's
#: own step to the optimum.
START_RESIDUAL = 0.01


@dataclass
class Retrained:
    """A model retrained without ``removed``.

    Attributes:
        theta: retrained flat parameters [P]; ``delta``: theta - theta* [P].
        gradient_norm: ||grad L_R|| at the end (how tight the optimum is).
        target: the gradient norm the retraining had to reach (``tolerance`` times the norm at
            the warm start, or times 1 when that is smaller); NaN for a replayed recipe, which
            seeks no optimum.
        converged: whether it reached ``target`` (always True for a replayed recipe). A result
            that did not is not the retrained optimum, so not ground truth.
    """

    task: Task
    removed: Tensor
    theta: Tensor
    delta: Tensor
    gradient_norm: float
    evaluations: int
    target: float = float("nan")
    converged: bool = True

    def model(self) -> torch.nn.Module:
        clone = copy.deepcopy(self.task.model)
        ParameterSpace(clone).assign_(self.theta)
        return clone

    def _evaluate(self, data: Any, which: str) -> Tensor:
        model = self.model()
        task = Task(model, self.task.loss, self.task.measurement, output_fn=self.task.output_fn)
        engine = PerExample(task, ParameterSpace(model))
        examples = ExampleSet(data, name="data")
        fn = {"outputs": engine.outputs, "loss": engine.losses, "measurement": engine.measurements}[
            which
        ]
        parts = [fn(b) for b in examples.batches(1024)]
        return torch.cat([p.reshape(p.shape[0], -1) if which == "outputs" else p for p in parts])

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
            "result": "theta, gradient_norm, evaluations, target, converged",
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
        artifact = self.store.load(self.KIND, self.identity(removed))
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
    if run is not None:
        _check_run(run, task, examples, l2)
    if cache_dir is None:
        return None
    return RetrainCache(cache_dir, task, examples, l2, tolerance, max_iter, run)


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

    With ``run`` (the model's :class:`~infkit.recipe.TrainingRun`), the recipe is replayed from
    its initial parameters with the removed examples' weights set to 0 instead. With
    ``cache_dir`` the result is kept in an artifact store and reused by the next call that
    depends on exactly the same model, task, data, removed examples and settings. A retraining
    that stops at ``max_iter`` short of ``tolerance`` is flagged (``converged``) and warned about.
    """
    examples = ExampleSet(train, name="training set")
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    r = _retrain(task, examples, indices, l2, tolerance, max_iter, cache, run)
    if run is None and len(r.removed):
        warn_unless_optimum(task, examples, l2, [r.removed], "group-removal")
    if not r.converged:
        removed = f"without {len(r.removed)} example(s)"
        warn_unconverged("group-removal", [removed], [r.gradient_norm], [r.target], max_iter)
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
        )
        theta, gradient_norm, evaluations = result.theta, result.gradient_norm, result.evaluations
        target, converged = result.target, result.converged
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


def warn_unless_optimum(
    task: Task,
    examples: ExampleSet,
    l2: float,
    removals: list[Tensor],
    what: str = "leave-one-out",
    chunk: int = 4096,
) -> float:
    """Warn when ``task``'s model is not at the optimum of ``L = mean_i l_i + (l2/2)||theta||^2``
    on ``examples`` closely enough for the changes of retrainings without ``removals`` to be
    the removals' own; returns the worst ratio below.

    Warm-started at theta, a retraining without F (k examples of N) starts from the gradient
    ``grad L_R(theta) = (N grad L(theta) - k g_F) / (N - k)``, where ``g_F`` is the mean over F of
    ``grad l_j + l2 theta``: the removal's own part is ``k g_F``, the model's distance from its
    optimum ``N grad L(theta)``. Their norms' ratio above :data:`START_RESIDUAL` means the change
    ``theta_R - theta`` (and every change measured from theta) holds the model's own step to the
    optimum besides the removal's effect. One pass over the data, and one over each removed set.
    """
    space = ParameterSpace(task.model)
    engine = PerExample(task, space)
    n = len(examples)
    with evaluation_mode(task.model):
        _, full = objective_and_gradient(task, space, examples, l2, None, chunk, engine)
        own = n * float(full.norm())
        ratios = []
        for removed in removals:
            _, g_removed = objective_and_gradient(task, space, examples, l2, removed, chunk, engine)
            ratios.append(own / max(len(removed) * float(g_removed.norm()), 1e-300))
    worst = max(ratios, default=0.0)
    if worst > START_RESIDUAL:
        coarse = (
            f"; a {str(space.dtype).removeprefix('torch.')} model's gradient may go no lower "
            "than its precision: compute the ground truth in float64 (model.double())"
            if space.dtype != torch.float64
            else ""
        )
        k = ratios.index(worst)
        named = (
            f"example {int(removals[k][0])}"
            if len(removals[k]) == 1
            else f"the {len(removals[k])} removed examples"
        )
        warn(
            f"the model is not at the optimum of its objective on the training set "
            f"(mean loss + (l2/2)||theta||^2, l2 = {l2:g}): its gradient there, times N = {n}, "
            f"is {worst:.3g} times the removal's own (without {named}, the largest of "
            f"{len(ratios)}), so each {what} change, measured from the model passed in, holds "
            "the model's own step to the optimum as well as the removal's effect and is not "
            "the removal's ground truth. Train it to the optimum first "
            "(infkit.train_to_optimum(task, train, l2)), or retrain by the recipe that trained "
            f"it (run=){coarse}",
            NotConvergedWarning,
        )
    return worst


def _replay(
    task: Task, examples: ExampleSet, run: TrainingRun, keep: Tensor
) -> tuple[Tensor, float, int]:
    """The run's recipe replayed from its initial parameters with the removed weights at 0:
    theta_T, nan (no optimum is sought) and the number of steps."""
    replay = Replay(run.recipe, task, examples)
    weights = run.weights.to(replay.space.dtype) * keep.to(replay.space.dtype)
    theta, _ = replay.final(run.initial.to(replay.space.dtype), weights)
    return theta.detach().clone(), float("nan"), run.recipe.steps


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
    """

    indices: Tensor
    params: Tensor
    measurement: Tensor
    loss: Tensor
    gradient_norms: Tensor
    targets: Tensor
    converged: Tensor


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
    """Retrain once per index without that example; measure parameter and test changes.

    With ``run``, each retraining replays the model's recipe (see :func:`without`). Retrainings
    that stop at ``max_iter`` short of ``tolerance`` are flagged in ``converged`` and named in a
    warning: their changes are not ground truth.
    """
    examples = ExampleSet(train, name="training set")
    idx = checked_indices(indices, len(examples), what="training index", unique=True)
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    base = Retrained(task, idx[:0], ParameterSpace(task.model).flat(), torch.zeros(0), 0.0, 0)
    base_meas, base_loss = base.measurements(test), base.losses(test)
    if run is None:
        warn_unless_optimum(task, examples, l2, [idx[k : k + 1] for k in range(len(idx))])
    params, meas, loss, results = [], [], [], []
    for j in track(idx.tolist(), resolve(progress), "leave-one-out"):
        r = _retrain(task, examples, [j], l2, tolerance, max_iter, cache, run)
        params.append(r.delta)
        meas.append(r.measurements(test) - base_meas)
        loss.append(r.losses(test) - base_loss)
        results.append(r)
    converged = torch.tensor([r.converged for r in results], dtype=torch.bool)
    late = [r for r in results if not r.converged]
    warn_unconverged(
        "leave-one-out",
        [f"without example {int(r.removed[0])}" for r in late],
        [r.gradient_norm for r in late],
        [r.target for r in late],
        max_iter,
    )
    return LeaveOneOut(
        idx,
        torch.stack(params),
        torch.stack(meas, 1),
        torch.stack(loss, 1),
        torch.tensor([r.gradient_norm for r in results], dtype=torch.float64),
        torch.tensor([r.target for r in results], dtype=torch.float64),
        converged,
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
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < 1:
        raise InvalidInputError(f"n_subsets must be a whole number >= 1, got {n_subsets!r}")
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
    masks = random_masks(n, n_subsets, alpha, seed) if masks is None else torch.as_tensor(masks)
    if masks.dim() != 2 or masks.shape[1] != n or masks.dtype != torch.bool:
        raise InvalidInputError(
            f"masks must be a boolean [m, N] tensor (True = kept) with N = {n}, got "
            f"{masks.dtype} of shape {tuple(masks.shape)}"
        )
    empty = (~masks.any(dim=1)).nonzero().squeeze(1)
    if len(masks) == 0 or len(empty):
        raise InvalidInputError(
            "masks has no subsets"
            if len(masks) == 0
            else f"mask {int(empty[0])} keeps no "
            "training example (True = kept); a retraining needs at least one"
        )
    cache = _cache(cache_dir, task, examples, l2, tolerance, max_iter, run)
    rows, results = [], []
    for mask in track(masks, resolve(progress), "subsets", len(masks)):
        removed = (~mask).nonzero().squeeze(1)
        r = _retrain(task, examples, removed, l2, tolerance, max_iter, cache, run)
        rows.append(r.measurements(test))
        results.append(r)
    late = [k for k, r in enumerate(results) if not r.converged]
    warn_unconverged(
        "subset",
        [f"subset {k}" for k in late],
        [results[k].gradient_norm for k in late],
        [results[k].target for k in late],
        max_iter,
    )
    converged = torch.tensor([r.converged for r in results], dtype=torch.bool)
    return SubsetRetraining(masks, torch.stack(rows), converged)
