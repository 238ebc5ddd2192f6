"""Poisoning that the influence function underrates and RIF does not (Rubinstein & Hopkins 2025).

The attack (docs/analyses.md §11). To move a binary classifier's logit on one target test
example ``(x_t, y_t)``, the attacker adds to the training set ``copies`` points with the target's
features and the flipped label ``1 - y_t``, and the model is retrained. Optionally each poison
is moved by ``delta``, ``||delta|| = epsilon ||x_t||``, in the direction that raises its
leverage: the quadratic form ``q(x) = J(x) (H + ridge)^{-1} J(x)^T`` of the clean model, J the
gradient of the logit with respect to the parameters (``[x, 1]`` for logistic regression on
features ``x``), moving only orthogonally to the clean logit's input gradient at ``x_t`` so that
the clean model finds the flipped label as wrong for the poison as for an exact copy. The
leverage of the planted point in the poisoned model is ``a q / N``, up to the point's own share
of the curvature, with ``a = p (1 - p)`` (docs/estimators.md §3).

Why it hides. The influence function inverts a curvature that still contains the removed
point's own share, which resists its removal: for one logit the true removal effect is about the
IF's divided by ``1 - h_j`` (docs/estimators.md §4). A high-leverage poison therefore looks much
weaker to the IF than it is, while RIF, which divides by ``1 - h_j``, sees its real size.
Identical copies share their curvature: each one's leverage is lower, and only the joint Newton
step (``estimator="newton"`` on the group) predicts removing them together.

Detection (:func:`detect_poison`) measures the target's logit (:func:`logit`), ranks the
poisoned training set by the absolute score of each estimator (``"if"``, ``"rif"``,
``"newton"``), reports where the planted points land (rank, ROC AUC, top-k hits) and sets each
estimator's predicted effect of removing them beside the actual change after retraining without
them (:func:`infkit.retrain.without`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.errors import InvalidInputError, UnsupportedError, warn
from infkit.evaluate import detection_auc
from infkit.influence import Influence
from infkit.parameters import evaluation_mode
from infkit.retrain import without
from infkit.task import Task
from infkit.training import train_to_optimum

#: the estimators that predict a removal effect, in the order they are reported
ESTIMATORS: tuple[str, ...] = ("if", "rif", "newton")


def logit(outputs: Tensor, targets: Any) -> Tensor:
    """The logit of a one-logit classifier, [B]: the measurement the poisoning analysis scores.

    Args:
        outputs: the model's outputs, [B] or [B, 1].
        targets: the labels (unused: the logit does not depend on them).

    Returns:
        The logits, [B].
    """
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.dim() == 1:
        return outputs
    raise InvalidInputError(
        f"the poisoning analysis measures one logit per example (outputs [B] or [B, 1]); got "
        f"outputs of shape {tuple(outputs.shape)}: use a binary classifier with one output"
    )


@dataclass(frozen=True)
class Poisoning:
    """A training set with planted poison and the model retrained on it.

    Attributes:
        train: the poisoned training set ``(X, y)``: the clean examples first, then the poison.
        planted: [k] indices of the planted points in ``train`` (the last k).
        leverages: [N + k] float64 leverages of every training example in the poisoned model
            (``Influence.leverages``); the planted points' are :attr:`planted_leverages`.
        delta: the perturbation added to the target's features (zeros when ``epsilon=0``),
            shaped like one input.
        target: the target test example ``(x [1, ...], y [1])``.
        task: the poisoned model (retrained to the optimum on ``train``) with the logit as its
            measurement.
        influence: an :class:`~infkit.Influence` fitted on ``task`` and ``train`` (estimator
            ``"if"``; :meth:`~infkit.Influence.with_estimator` gives the others).
        l2: the training objective's L2 coefficient (mean form).
        gradient_norm: ``||grad L||`` of the poisoned model at the end of training.
    """

    train: tuple[Tensor, Tensor]
    planted: Tensor
    leverages: Tensor
    delta: Tensor
    target: tuple[Tensor, Tensor]
    task: Task
    influence: Influence
    l2: float
    gradient_norm: float

    @property
    def planted_leverages(self) -> Tensor:
        """[k] leverages of the planted points in the poisoned model."""
        return self.leverages[self.planted]

    @property
    def leverage_share(self) -> Tensor:
        """[k] for each planted point, the share of the clean training examples whose leverage
        is below its own (1.0: above every clean example)."""
        clean = self.leverages[: len(self.leverages) - len(self.planted)]
        return (clean.unsqueeze(0) < self.planted_leverages.unsqueeze(1)).double().mean(1)


@dataclass(frozen=True)
class Detection:
    """Where the planted points rank under each estimator, and their predicted removal effect.

    Attributes:
        scores: estimator -> [N + k] float64 predicted change of the target's logit when each
            training example is removed (``Influence.scores``).
        ranks: estimator -> [k] position of each planted point when the training set is sorted
            by |score|, largest first: 1 is the top; ties put clean examples first.
        auc: estimator -> ROC AUC of |score| separating the planted points from the clean ones.
        predicted: estimator -> predicted change of the target's logit when all the planted
            points are removed together (``Influence.remove(planted).measurement``).
        actual: the change of the target's logit after retraining without the planted points,
            from the poisoned model (None when :func:`detect_poison` did not retrain).
        planted_leverages: [k] the planted points' leverages in the poisoned model.
        logit: the target's logit in the poisoned model.
    """

    scores: dict[str, Tensor]
    ranks: dict[str, Tensor]
    auc: dict[str, float]
    predicted: dict[str, float]
    actual: float | None
    planted_leverages: Tensor
    logit: float

    def _check(self, estimator: str) -> None:
        if estimator not in self.scores:
            raise InvalidInputError(
                f"estimator {estimator!r} was not part of this detection; it has "
                f"{', '.join(self.scores)}: pass it to detect_poison(..., estimators=...)"
            )

    def hit_rate(self, estimator: str, k: int) -> float:
        """The share of the planted points among the ``k`` training examples with the largest
        |score| of ``estimator``.

        Args:
            estimator: one of the estimators of the detection (``"if"``, ``"rif"``, ...).
            k: how many of the top-ranked training examples are inspected (>= 1).

        Returns:
            A number in [0, 1]: top-k recall of the planted points.
        """
        self._check(estimator)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
        return float((self.ranks[estimator] <= k).double().mean())

    def ratio(self, estimator: str) -> float:
        """The predicted over the actual change of the target's logit when the planted points
        are removed (1: exact; IF about ``1 - h`` for one high-leverage point).

        Args:
            estimator: one of the estimators of the detection.

        Returns:
            ``predicted[estimator] / actual``.
        """
        self._check(estimator)
        return self.predicted[estimator] / self._actual()

    def _actual(self) -> float:
        if self.actual is None:
            raise InvalidInputError(
                "this detection did not retrain (retrain=False): call detect_poison(poisoning) "
                "with retrain=True to compare predicted and actual changes"
            )
        return self.actual

    def recovers(self, estimator: str) -> bool | None:
        """Whether ``estimator`` predicts that removing the planted points changes the
        target's predicted class, when retraining without them does: the question a defender
        asks of a suspect ("would removing it undo the flip?").

        Args:
            estimator: one of the estimators of the detection.

        Returns:
            None when retraining without the planted points leaves the target's class as it is
            (nothing to recover); otherwise whether ``logit + predicted`` has the sign of
            ``logit + actual``.
        """
        self._check(estimator)
        after = self.logit + self._actual()
        if (after > 0) == (self.logit > 0):
            return None
        return (self.logit + self.predicted[estimator] > 0) == (after > 0)


def plant_poison(
    task: Task,
    train: tuple[Tensor, Tensor],
    target: tuple[Tensor, Tensor],
    l2: float,
    *,
    epsilon: float = 0.0,
    copies: int = 1,
    steps: int = 20,
    method: str = "exact",
    damping: float = 0.0,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
) -> Poisoning:
    """Plant label-flipped, optionally leverage-raised copies of ``target`` and retrain.

    The poison is ``x_t + delta`` with the label ``1 - y_t``, ``copies`` times. With
    ``epsilon > 0``, ``delta`` (``||delta|| = epsilon ||x_t||``) is found by ``steps`` rounds
    of the minorise-maximise ascent ``delta <- epsilon ||x_t|| grad q / ||grad q||`` of the
    clean model's quadratic form ``q(x) = J(x) (H + ridge)^{-1} J(x)^T`` at ``x_t + delta``,
    with ``grad q`` projected orthogonally to the clean logit's input gradient at ``x_t`` (each
    round never lowers a convex q, such as logistic regression's); the best point seen is
    kept. The poisoned model is a copy of ``task``'s, retrained (warm start) on
    ``mean_i l_i + (l2/2)||theta||^2`` over the poisoned set. docs/analyses.md §11.

    Args:
        task: a :meth:`~infkit.Task.binary_classification` task on the clean model, trained to
            the optimum of the same objective on ``train``; it is not modified.
        train: the clean training set, a pair of tensors ``(X [N, ...], y [N])`` with
            floating-point inputs and labels 0 or 1.
        target: the target test example ``(x, y)``: ``x`` shaped like one input (or
            ``[1, ...]``) and one label 0 or 1.
        l2: the training objective's L2 coefficient (mean form).
        epsilon: the perturbation's L2 norm relative to ``||x_t||`` (0: exact copies of the
            target's features, as in the paper's label-flip attack).
        copies: how many poison points are planted (identical copies).
        steps: rounds of the leverage ascent (only with ``epsilon > 0``).
        method: the influence method for the curvature (``"exact"`` by default); it must
            supply leverages and the ``"rif"`` and ``"newton"`` estimators to detect later.
        damping: extra numerical damping of the curvature (not part of the objective).
        tolerance: relative gradient tolerance of the retraining (:func:`infkit.train_to_optimum`).
        max_iter: the most L-BFGS iterations of the retraining.

    Returns:
        The poisoned data, the planted indices, the leverages, the perturbation and the
        retrained, fitted model.
    """
    X, y = _checked_train(train)
    x_t, y_t = _checked_target(target, X)
    _check_task(task, x_t)
    for name, value in (("l2", l2), ("epsilon", epsilon), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
        if math.isinf(value):
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, count in (("copies", copies), ("steps", steps)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {count!r}")

    delta = torch.zeros_like(x_t[0])
    if epsilon > 0:
        delta = _leverage_ascent(task, (X, y), x_t, l2, epsilon, steps, method, damping)
    poison = (x_t[0] + delta).expand(copies, *x_t.shape[1:]).clone()
    flipped = (1 - y_t).to(y.dtype).expand(copies).clone()
    poisoned_train = (torch.cat([X, poison]), torch.cat([y, flipped]))
    planted = torch.arange(len(X), len(X) + copies)

    poisoned = _logit_task(task, copy.deepcopy(task.model))
    result = train_to_optimum(poisoned, poisoned_train, l2, tolerance=tolerance, max_iter=max_iter)
    if not result.converged:
        warn(
            f"the poisoned model did not reach the optimum (||grad L|| = "
            f"{result.gradient_norm:.2e}); raise max_iter or loosen tolerance: the influence "
            "estimates assume an optimum"
        )
    inf = Influence(poisoned, method, "if", l2=l2, damping=damping, progress=False)
    inf.fit(poisoned_train)
    leverages = inf.leverages().to(torch.float64)
    return Poisoning(
        train=poisoned_train,
        planted=planted,
        leverages=leverages,
        delta=delta,
        target=(x_t, y_t),
        task=poisoned,
        influence=inf,
        l2=float(l2),
        gradient_norm=result.gradient_norm,
    )


def detect_poison(
    poisoning: Poisoning,
    estimators: Sequence[str] = ESTIMATORS,
    *,
    retrain: bool = True,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
) -> Detection:
    """Rank the poisoned training set by |score| on the target's logit, per estimator, and
    compare the predicted effect of removing the planted points with retraining.

    Args:
        poisoning: the result of :func:`plant_poison`.
        estimators: which of ``"if"``, ``"rif"`` and ``"newton"`` to rank and predict with.
        retrain: retrain without the planted points (warm start from the poisoned model,
            :func:`infkit.retrain.without`) for the actual change; False leaves
            :attr:`Detection.actual` None.
        tolerance: relative gradient tolerance of that retraining.
        max_iter: the most L-BFGS iterations of that retraining.

    Returns:
        Ranks, AUCs, predicted and actual changes of the target's logit.
    """
    if not isinstance(poisoning, Poisoning):
        raise InvalidInputError(
            f"poisoning must be the result of plant_poison, got {type(poisoning).__name__}"
        )
    names = [estimators] if isinstance(estimators, str) else list(estimators)
    unknown = [e for e in names if e not in ESTIMATORS]
    if not names or unknown or len(set(names)) != len(names):
        raise InvalidInputError(
            f"estimators must be distinct names among {', '.join(ESTIMATORS)}, got {estimators!r}"
        )
    planted = poisoning.planted
    n = len(poisoning.leverages)
    is_planted = torch.zeros(n, dtype=torch.bool)
    is_planted[planted] = True
    scores: dict[str, Tensor] = {}
    ranks: dict[str, Tensor] = {}
    auc: dict[str, float] = {}
    predicted: dict[str, float] = {}
    for name in names:
        inf = poisoning.influence
        if inf.estimator != name:
            inf = inf.with_estimator(name)
        s = inf.scores(poisoning.target)[0].to(torch.float64)
        strength = s.abs()
        ranks[name] = _ranks(strength, is_planted)[planted]
        auc[name] = detection_auc(strength, is_planted)
        scores[name] = s
        predicted[name] = float(inf.remove(planted).measurement(poisoning.target)[0])
    actual = None
    before = _logit_of(poisoning.task, poisoning.target[0])
    if retrain:
        retrained = without(
            poisoning.task,
            poisoning.train,
            planted,
            poisoning.l2,
            tolerance=tolerance,
            max_iter=max_iter,
        )
        actual = float(retrained.measurements(poisoning.target)[0]) - before
    return Detection(
        scores, ranks, auc, predicted, actual, poisoning.planted_leverages.clone(), before
    )


def summarise(
    detections: Sequence[Detection], top: Sequence[int] = (1, 10)
) -> dict[str, dict[str, float]]:
    """Aggregate detections over targets, per estimator.

    Args:
        detections: one :class:`Detection` per target, made with the same estimators.
        top: the k of the top-k hit rates to report.

    Returns:
        estimator -> ``{"auc": mean AUC, "top<k>": mean top-k hit rate for each k,
        "median_rank": median rank of the planted points}``, plus, when every detection was
        retrained, the quartiles ``"ratio_q1"``, ``"ratio_median"``, ``"ratio_q3"`` of
        predicted / actual, ``"flipped"``, the share of targets whose class removing the planted
        points changes back, and, when there are such targets, ``"recovered"``, the share of them
        for which the estimator predicts the change (:meth:`Detection.recovers`).
    """
    if not detections or not all(isinstance(d, Detection) for d in detections):
        raise InvalidInputError("detections must be a non-empty sequence of Detection results")
    names = list(detections[0].scores)
    if any(list(d.scores) != names for d in detections):
        raise InvalidInputError(
            "the detections were made with different estimators; summarise like with like"
        )
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row = {"auc": sum(d.auc[name] for d in detections) / len(detections)}
        for k in top:
            row[f"top{k}"] = sum(d.hit_rate(name, k) for d in detections) / len(detections)
        ranks = torch.cat([d.ranks[name] for d in detections]).double()
        row["median_rank"] = float(ranks.quantile(0.5))
        if all(d.actual is not None for d in detections):
            ratios = torch.tensor([d.ratio(name) for d in detections], dtype=torch.float64)
            q = ratios.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            row |= {"ratio_q1": float(q[0]), "ratio_median": float(q[1]), "ratio_q3": float(q[2])}
            outcomes = [d.recovers(name) for d in detections]
            flips = [o for o in outcomes if o is not None]
            row["flipped"] = len(flips) / len(detections)
            if flips:
                row["recovered"] = sum(flips) / len(flips)
        out[name] = row
    return out


# ------------------------------------------------------------------------------ helpers
def _checked_train(train: Any) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(train, (tuple, list))
        or len(train) != 2
        or not all(isinstance(t, Tensor) for t in train)
    ):
        raise InvalidInputError(
            "train must be a pair of tensors (X [N, ...], y [N]): the poison is appended to "
            f"them; got {type(train).__name__}"
        )
    X, y = train
    if X.dim() < 2 or len(X) < 2 or y.shape != (len(X),):
        raise InvalidInputError(
            f"train must be (X [N, ...], y [N]) with N >= 2; got X {tuple(X.shape)} and y "
            f"{tuple(y.shape)}"
        )
    if not X.is_floating_point():
        raise InvalidInputError(
            f"the training inputs must be floating point to be perturbed, got {X.dtype}: "
            "pass X.double()"
        )
    if bool(((y != 0) & (y != 1)).any()):
        raise InvalidInputError("the training labels must be 0 or 1 (binary classification)")
    return X, y


def _checked_target(target: Any, X: Tensor) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(target, (tuple, list))
        or len(target) != 2
        or not isinstance(target[0], Tensor)
    ):
        raise InvalidInputError(
            "target must be one test example as a pair (x, y): x a tensor shaped like one "
            f"training input {tuple(X.shape[1:])}, y its label 0 or 1"
        )
    x, y = target
    if x.shape == X.shape[1:]:
        x = x.unsqueeze(0)
    if x.shape != (1, *X.shape[1:]):
        raise InvalidInputError(
            f"target x must be one example shaped like a training input {tuple(X.shape[1:])} "
            f"(or [1, ...]); got {tuple(x.shape)}: poison one target at a time"
        )
    y = torch.as_tensor(y).reshape(-1)
    if y.numel() != 1 or float(y[0]) not in (0.0, 1.0):
        raise InvalidInputError(f"target y must be one label 0 or 1, got {target[1]!r}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError("target x holds NaN or Inf")
    return x.to(X.dtype), y.to(X.device)


def _check_task(task: Task, x: Tensor) -> None:
    if not isinstance(task, Task):
        raise InvalidInputError(
            "task must be an infkit.Task made with Task.binary_classification(model), got "
            f"{type(task).__name__}"
        )
    if task.name != "binary_classification":
        raise UnsupportedError(
            f"the poisoning attack flips a binary label: build the task with "
            f"Task.binary_classification(model) (one logit, labels 0/1); got a {task.name!r} task"
        )
    with torch.no_grad(), evaluation_mode(task.model):
        out = task.call_model(task.model, x)
    if out.numel() != 1:
        raise UnsupportedError(
            f"the model returns {out.numel()} outputs for one example; the poisoning analysis "
            "needs one logit per example (a binary classifier)"
        )


def _ranks(strength: Tensor, is_planted: Tensor) -> Tensor:
    """1-based positions in the order of decreasing ``strength``; ties go to the clean
    examples first (a planted point never profits from a tie)."""
    order = sorted(range(len(strength)), key=lambda i: (-float(strength[i]), bool(is_planted[i])))
    ranks = torch.empty(len(strength), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(1, len(strength) + 1)
    return ranks


def _logit_task(task: Task, model: torch.nn.Module) -> Task:
    """``task`` on ``model``, measuring the logit instead of the loss."""
    return Task(
        model,
        task.loss,
        logit,
        output_hessian=task.output_hessian,
        output_hessian_factor=task.output_hessian_factor,
        output_fn=task.output_fn,
        name=task.name,
        check_targets=task.check_targets,
        check_outputs=task.check_outputs,
        autocast=task.autocast,
    )


def _logit_of(task: Task, x: Tensor) -> float:
    with torch.no_grad(), evaluation_mode(task.model):
        return float(logit(task.call_model(task.model, x), None)[0])


def _leverage_ascent(
    task: Task,
    train: tuple[Tensor, Tensor],
    x_t: Tensor,
    l2: float,
    epsilon: float,
    steps: int,
    method: str,
    damping: float,
) -> Tensor:
    """The perturbation ``delta`` (``||delta|| = epsilon ||x_t||``) that raises the clean
    model's ``q(x) = J(x) (H + ridge)^{-1} J(x)^T`` (module docstring)."""
    clean = Influence(task, method, "if", l2=l2, damping=damping, progress=False).fit(train)
    inverse = clean.method.inverse()
    space = clean.fitted.space
    named = dict(task.model.named_parameters())
    params = [named[name] for name in space.names]
    radius = epsilon * float(x_t.norm())

    def form_and_gradient(point: Tensor) -> tuple[float, Tensor]:
        x = point.detach().clone().requires_grad_(True)
        with torch.enable_grad(), evaluation_mode(task.model):
            out = logit(task.call_model(task.model, x), None)[0]
            jac = torch.autograd.grad(out, params, create_graph=True, allow_unused=True)
            flat = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(jac, params)
                ]
            )
            u = inverse(flat.detach().to(torch.float64).unsqueeze(0))[0].to(flat)
            form = (flat * u).sum()
            if not form.requires_grad:
                return float(form.detach()), torch.zeros_like(x)
            (grad,) = torch.autograd.grad(form, x, allow_unused=True)
        return float(form.detach()), (torch.zeros_like(x) if grad is None else 2 * grad)

    # The clean logit's input gradient at the target: steps orthogonal to it leave the clean
    # model's logit of the poison at the target's (to first order), so the flipped label stays
    # as wrong for the clean model as an exact copy's is.
    x = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad(), evaluation_mode(task.model):
        (slope,) = torch.autograd.grad(logit(task.call_model(task.model, x), None)[0], x)
    slope = slope / slope.norm().clamp_min(1e-300)

    delta = torch.zeros_like(x_t)
    best_value, best = -math.inf, delta
    for _ in range(steps + 1):
        value, grad = form_and_gradient(x_t + delta)
        if value > best_value:
            best_value, best = value, delta
        grad = grad - (grad * slope).sum() * slope
        norm = float(grad.norm())
        if norm == 0 or not math.isfinite(norm):
            break
        step = radius * grad / norm
        if torch.allclose(step, delta, rtol=1e-10, atol=1e-12 * radius):
            break
        delta = step
    if not bool(best.abs().sum() > 0):
        warn(
            "the leverage ascent found no direction that raises the poison's leverage (the "
            "logit's parameter gradient does not depend on the input here); the poison is an "
            "unperturbed copy of the target"
        )
    return best[0].detach()
