"""Poisoning that the influence function underrates and RIF does not (Rubinstein & Hopkins 2025).

The attack (docs/analyses.md §11). To move a binary classifier's logit on a target test example
``(x_t, y_t)``, the attacker adds to the training set ``copies`` points with the target's
features and the flipped label ``1 - y_t``, and the model is retrained. Optionally each poison
is moved by ``delta``, ``||delta|| = epsilon ||x_t||``, in the direction that raises its
leverage (the paper's "embedding augmentation"): the quadratic form
``q(x) = J(x) (H + ridge)^{-1} J(x)^T``, J the gradient of the logit with respect to the
parameters (``[x, 1]`` for logistic regression on features ``x``), moving only orthogonally to
the clean logit's input gradient at ``x_t`` so that the clean model finds the flipped label as
wrong for the poison as for an exact copy. :func:`plant_poison` poisons one target;
:func:`plant_poisons` poisons several at once in one training set, raising each poison's
leverage against the clean examples' curvature plus that of the poisons planted before it (so
that the poisons do not crowd into one low-curvature direction and share it), and retrains
once. The leverage of a planted point in the poisoned model is about ``a q / N``, up to its own
share of the curvature, with ``a = p (1 - p)`` (docs/estimators.md §3).

Why it hides. The influence function inverts a curvature that still contains the removed
point's own share, which resists its removal: for one logit the true removal effect is about the
IF's divided by ``1 - h_j`` (docs/estimators.md §4). A high-leverage poison therefore looks much
weaker to the IF than it is, while RIF, which divides by ``1 - h_j``, sees its real size.
Identical copies share their curvature: each one's leverage is lower, and only the joint Newton
step (``estimator="newton"`` on the group) predicts removing them together.

Detection, two ways.

* Knowing the target (:func:`detect_poison`): rank the poisoned training set by the absolute
  score of each estimator (``"if"``, ``"rif"``, ``"newton"``) on the target's logit
  (:func:`logit`), report where the planted points land (rank, ROC AUC, top-k hits) and set each
  estimator's predicted effect of removing them beside the actual change after retraining
  without them (:func:`infkit.retrain.without`).
* Not knowing the targets (:func:`detect_by_self_influence`): rank the training set by
  self-influence, each example's removal effect on its own loss
  (:meth:`~infkit.Influence.self_scores`), per estimator, beside the training loss and the
  leverage as baselines, and report the ROC AUC and top-k recall of the planted points. For one
  logit the loss gradient is parallel to ``J_j``, so RIF's self-score is exactly the IF's
  divided by ``1 - h_j``: the leverage-raised poison, which the model fits through its own
  leverage (small loss, small IF self-score), is what RIF lifts above the clean examples.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.errors import InvalidInputError, UnsupportedError, warn
from infkit.evaluate import detection_auc
from infkit.influence import Influence
from infkit.methods.base import methods_answering, methods_with_estimator
from infkit.options import integer_argument, nonnegative_number
from infkit.parameters import ParameterSpace, evaluation_mode
from infkit.retrain import without
from infkit.task import Task
from infkit.training import train_to_optimum

#: the estimators that predict a removal effect, in the order they are reported
ESTIMATORS: tuple[str, ...] = ("if", "rif", "newton")
#: the estimators whose self-scores :func:`detect_by_self_influence` can rank by
SELF_ESTIMATORS: tuple[str, ...] = ("if", "rif", "newton", "relatif")
#: the baselines :func:`detect_by_self_influence` reports beside the estimators
BASELINES: tuple[str, ...] = ("loss", "leverage")
#: the default perturbation budget of :func:`plant_poisons` (relative to ``||x_t||``)
DEFAULT_EPSILON = 1.0


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
        train: the poisoned training set ``(X, y)``: the clean examples first, then the poison,
            target by target (``copies`` points each).
        planted: [k] indices of the planted points in ``train`` (the last k).
        owners: [k] for each planted point, the index of the target it serves (into
            :attr:`targets`).
        leverages: [N + k] float64 leverages of every training example in the poisoned model
            (``Influence.leverages``); the planted points' are :attr:`planted_leverages`.
        deltas: [T, ...] the perturbation added to each target's features (zeros when
            ``epsilon=0``).
        targets: the T target test examples ``(x [T, ...], y [T])``.
        task: the poisoned model (retrained to the optimum on ``train``) with the logit as its
            measurement.
        influence: an :class:`~infkit.Influence` fitted on ``task`` and ``train`` (estimator
            ``"if"``; :meth:`~infkit.Influence.with_estimator` gives the others).
        l2: the training objective's L2 coefficient (mean form).
        gradient_norm: ``||grad L||`` of the poisoned model at the end of training.
    """

    train: tuple[Tensor, Tensor]
    planted: Tensor
    owners: Tensor
    leverages: Tensor
    deltas: Tensor
    targets: tuple[Tensor, Tensor]
    task: Task
    influence: Influence
    l2: float
    gradient_norm: float

    @property
    def n_targets(self) -> int:
        """The number T of poisoned targets."""
        return len(self.targets[0])

    @property
    def target(self) -> tuple[Tensor, Tensor]:
        """The target test example ``(x [1, ...], y [1])`` of a one-target poisoning."""
        self._one("target", "targets")
        return self.targets

    @property
    def delta(self) -> Tensor:
        """The perturbation of a one-target poisoning, shaped like one input."""
        self._one("delta", "deltas")
        return self.deltas[0]

    def _one(self, name: str, instead: str) -> None:
        if self.n_targets != 1:
            raise InvalidInputError(
                f"this poisoning has {self.n_targets} targets: use .{instead} (one row per "
                f"target) instead of .{name}"
            )

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

    @property
    def is_planted(self) -> Tensor:
        """[N + k] bool: True for the planted points."""
        flags = torch.zeros(len(self.leverages), dtype=torch.bool)
        flags[self.planted] = True
        return flags


@dataclass(frozen=True)
class Detection:
    """Where one target's planted points rank under each estimator, and their predicted removal
    effect on that target's logit.

    Attributes:
        scores: estimator -> [N + k] float64 predicted change of the target's logit when each
            training example is removed (``Influence.scores``).
        ranks: estimator -> [k_t] position of each of the target's planted points when the
            training set is sorted by |score|, largest first: 1 is the top; ties put clean
            examples first; the points planted for other targets are left out of the ranking.
        auc: estimator -> ROC AUC of |score| separating the target's planted points from the
            clean examples.
        predicted: estimator -> predicted change of the target's logit when the target's
            planted points are removed together (``Influence.remove(planted).measurement``).
        actual: the change of the target's logit after retraining without those points, from
            the poisoned model (None when :func:`detect_poison` did not retrain).
        planted_leverages: [k_t] the target's planted points' leverages in the poisoned model.
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
        k = integer_argument("k", k, 1)
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


@dataclass(frozen=True)
class SelfInfluenceDetection:
    """How well ranking the poisoned training set by a suspicion score finds the planted points,
    without knowing the targets.

    Attributes:
        scores: name -> [N + k] float64 suspicion scores, higher is more suspicious: for each
            estimator its self-scores (:meth:`~infkit.Influence.self_scores`, the predicted
            rise of each example's own loss when it is removed), for ``"loss"`` the poisoned
            model's training loss, for ``"leverage"`` the leverage.
        auc: name -> ROC AUC of the score separating the planted points from the clean ones
            (:func:`infkit.evaluate.detection_auc`; ties count one half).
        recall: name -> top-k recall for k the number of planted points: the share of them
            among the k highest scores (ties put clean examples first); with that k it is also
            the precision.
        is_planted: [N + k] True for the planted points.
    """

    scores: dict[str, Tensor]
    auc: dict[str, float]
    recall: dict[str, float]
    is_planted: Tensor

    def recall_at(self, name: str, k: int) -> float:
        """The share of the planted points among the ``k`` training examples with the highest
        score ``name``.

        Args:
            name: an estimator of the detection or a baseline (``"loss"``, ``"leverage"``).
            k: how many of the top-ranked training examples are inspected (>= 1).

        Returns:
            A number in [0, 1]: top-k recall of the planted points (ties put clean examples
            first).
        """
        if name not in self.scores:
            raise InvalidInputError(
                f"{name!r} was not part of this detection; it has {', '.join(self.scores)}"
            )
        k = integer_argument("k", k, 1)
        ranks = _ranks(self.scores[name], self.is_planted)[self.is_planted]
        return float((ranks <= k).double().mean())


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
    """Plant label-flipped, optionally leverage-raised copies of one ``target`` and retrain.

    The paper's poisoning experiment: one target at a time, by default one exact label-flipped
    copy (``epsilon=0``), detected on the target's logit by :func:`detect_poison`. It is
    :func:`plant_poisons` with one target; see there for the attack.

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
        retrained, fitted model (one target: :attr:`Poisoning.target` and
        :attr:`Poisoning.delta` apply).
    """
    X, _ = _checked_train(train)
    x_t, y_t = _checked_targets(target, X, one=True)
    return plant_poisons(
        task,
        train,
        (x_t, y_t),
        l2,
        epsilon=epsilon,
        copies=copies,
        steps=steps,
        method=method,
        damping=damping,
        tolerance=tolerance,
        max_iter=max_iter,
    )


def plant_poisons(
    task: Task,
    train: tuple[Tensor, Tensor],
    targets: tuple[Tensor, Tensor],
    l2: float,
    *,
    epsilon: float = DEFAULT_EPSILON,
    copies: int = 1,
    steps: int = 20,
    method: str = "exact",
    damping: float = 0.0,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
) -> Poisoning:
    """Poison several targets at once: plant leverage-raised, label-flipped copies of each
    target in one training set and retrain once.

    For target t the poison is ``x_t + delta_t`` with the label ``1 - y_t``, ``copies`` times,
    appended target by target after the clean examples. With ``epsilon > 0``, ``delta_t``
    (``||delta_t|| = epsilon ||x_t||``) is found by ``steps`` rounds of the
    minorise-maximise ascent ``delta <- epsilon ||x_t|| grad q / ||grad q||`` of
    ``q(x) = J(x) (H + ridge)^{-1} J(x)^T`` at ``x_t + delta``, with ``grad q`` projected
    orthogonally to the clean logit's input gradient at ``x_t`` (each round never lowers a
    convex q, such as logistic regression's); the best point seen is kept. H is the curvature
    of the clean model on the clean examples and the poisons planted for the earlier targets,
    so that each poison seeks a direction that the earlier ones have not taken. The poisoned
    model is a copy of ``task``'s, retrained (warm start) on
    ``mean_i l_i + (l2/2)||theta||^2`` over the poisoned set. docs/analyses.md §11.

    The default ``epsilon=1`` is the paper's leverage-raising variant ("embedding
    augmentation"), applied to the model's own inputs: it raises the poisons' leverage as far
    as the budget reaches (not always far: :attr:`Poisoning.leverages` says which took), making
    them points that the model fits through their own share of the curvature, which is what
    self-influence by the IF underrates and RIF does not (:func:`detect_by_self_influence`).
    Exact label-flipped copies (``epsilon=0``) have a large loss and a moderate leverage, and
    the IF's self-influence ranks them as well as RIF's (docs/analyses.md §11 has the numbers).

    Args:
        task: a :meth:`~infkit.Task.binary_classification` task on the clean model, trained to
            the optimum of the same objective on ``train``; it is not modified.
        train: the clean training set, a pair of tensors ``(X [N, ...], y [N])`` with
            floating-point inputs and labels 0 or 1.
        targets: the T target test examples ``(x [T, ...], y [T])`` (one example may be given
            as ``x`` shaped like one input and one label), labels 0 or 1.
        l2: the training objective's L2 coefficient (mean form).
        epsilon: each perturbation's L2 norm relative to its target's ``||x_t||`` (0: exact
            label-flipped copies of the targets).
        copies: how many poison points are planted per target (identical copies).
        steps: rounds of the leverage ascent per target (only with ``epsilon > 0``).
        method: the influence method for the curvature (``"exact"`` by default); it must
            supply leverages and the ``"rif"`` and ``"newton"`` estimators to detect later.
        damping: extra numerical damping of the curvature (not part of the objective).
        tolerance: relative gradient tolerance of the retraining (:func:`infkit.train_to_optimum`).
        max_iter: the most L-BFGS iterations of the retraining.

    Returns:
        The poisoned data, the planted indices and the target each serves, the leverages, the
        perturbations and the retrained, fitted model.
    """
    X, y = _checked_train(train)
    xs, ys = _checked_targets(targets, X)
    if isinstance(task, Task):  # float32 data for a float64 model, as Influence takes it
        dtype = ParameterSpace(task.model).dtype  # (the model's call raised on it)
        X, y, xs, ys = (t.to(dtype) if t.is_floating_point() else t for t in (X, y, xs, ys))
    _check_task(task, xs[:1])
    l2, epsilon, damping = (
        nonnegative_number(name, value)
        for name, value in (("l2", l2), ("epsilon", epsilon), ("damping", damping))
    )
    copies = integer_argument("copies", copies, 1)
    steps = integer_argument("steps", steps, 1)
    able = sorted(
        set(methods_answering("leverages"))
        & set(methods_with_estimator("rif"))
        & set(methods_with_estimator("newton"))
    )
    if method not in able:
        raise InvalidInputError(
            f"method {method!r} cannot plant and detect poisons: the ascent needs leverages and "
            f"the detection the 'rif' and 'newton' estimators; methods with all three: "
            f"{', '.join(able)}"
        )

    deltas = torch.zeros_like(xs)
    poison_x: list[Tensor] = []
    poison_y: list[Tensor] = []
    stuck = 0
    for t in range(len(xs)):
        if epsilon > 0:
            base = (torch.cat([X, *poison_x]), torch.cat([y, *poison_y]))
            deltas[t] = _leverage_ascent(
                task, base, xs[t : t + 1], l2, epsilon, steps, method, damping
            )
            stuck += not bool(deltas[t].abs().sum() > 0)
        poison_x.append((xs[t] + deltas[t]).expand(copies, *xs.shape[1:]).clone())
        poison_y.append((1 - ys[t]).to(y.dtype).expand(copies).clone())
    if stuck:
        warn(
            f"the leverage ascent found no direction that raises the poison's leverage for "
            f"{stuck} of {len(xs)} targets (the logit's parameter gradient does not depend on "
            "the input here); those poisons are unperturbed copies of their targets"
        )
    poisoned_train = (torch.cat([X, *poison_x]), torch.cat([y, *poison_y]))
    planted = torch.arange(len(X), len(poisoned_train[0]))
    owners = torch.arange(len(xs)).repeat_interleave(copies)

    poisoned = task.with_model(copy.deepcopy(task.model)).with_measurement(
        logit, higher_is_better=True
    )
    result = train_to_optimum(
        poisoned,
        poisoned_train,
        l2,
        tolerance=tolerance,
        max_iter=max_iter,
        warn_unconverged=False,
        progress=False,
    )
    if not result.done:
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
        owners=owners,
        leverages=leverages,
        deltas=deltas,
        targets=(xs, ys),
        task=poisoned,
        influence=inf,
        l2=float(l2),
        gradient_norm=result.gradient_norm,
    )


def detect_poison(
    poisoning: Poisoning,
    estimators: Sequence[str] = ESTIMATORS,
    *,
    target: int | None = None,
    retrain: bool = True,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
) -> Detection:
    """Rank the poisoned training set by |score| on a target's logit, per estimator, and
    compare the predicted effect of removing that target's planted points with retraining.

    Args:
        poisoning: the result of :func:`plant_poison` or :func:`plant_poisons`.
        estimators: which of ``"if"``, ``"rif"`` and ``"newton"`` to rank and predict with.
        target: which target (an index into :attr:`Poisoning.targets`); None for a one-target
            poisoning. The points planted for the other targets are left out of the ranking
            and the AUC, and stay in the training set when retraining.
        retrain: retrain without the target's planted points (warm start from the poisoned
            model, :func:`infkit.retrain.without`) for the actual change; False leaves
            :attr:`Detection.actual` None.
        tolerance: relative gradient tolerance of that retraining.
        max_iter: the most L-BFGS iterations of that retraining.

    Returns:
        Ranks, AUCs, predicted and actual changes of the target's logit.
    """
    _check_poisoning(poisoning)
    names = _checked_estimators(estimators, ESTIMATORS)
    index = _target_index(poisoning, target)
    mine = poisoning.planted[poisoning.owners == index]
    others = poisoning.planted[poisoning.owners != index]
    n = len(poisoning.leverages)
    keep = torch.ones(n, dtype=torch.bool)
    keep[others] = False
    is_mine = torch.zeros(n, dtype=torch.bool)
    is_mine[mine] = True
    is_mine = is_mine[keep]
    x_t = (poisoning.targets[0][index : index + 1], poisoning.targets[1][index : index + 1])
    scores: dict[str, Tensor] = {}
    ranks: dict[str, Tensor] = {}
    auc: dict[str, float] = {}
    predicted: dict[str, float] = {}
    for name in names:
        inf = poisoning.influence
        if inf.estimator != name:
            inf = inf.with_estimator(name)
        s = inf.scores(x_t)[0].to(torch.float64)
        strength = s.abs()[keep]
        ranks[name] = _ranks(strength, is_mine)[is_mine]
        auc[name] = detection_auc(strength, is_mine)
        scores[name] = s
        predicted[name] = float(inf.remove(mine).measurement(x_t)[0])
    actual = None
    before = _logit_of(poisoning.task, x_t[0])
    if retrain:
        retrained = without(
            poisoning.task,
            poisoning.train,
            mine,
            poisoning.l2,
            tolerance=tolerance,
            max_iter=max_iter,
        )
        actual = float(retrained.measurements(x_t)[0]) - before
    return Detection(
        scores, ranks, auc, predicted, actual, poisoning.leverages[mine].clone(), before
    )


def detect_by_self_influence(
    poisoning: Poisoning,
    estimators: Sequence[str] = ESTIMATORS,
    *,
    batch_size: int = 1024,
) -> SelfInfluenceDetection:
    """Rank the poisoned training set by self-influence, as a defender who does not know the
    targets would, and measure how well each ranking finds the planted points.

    Each estimator's score is :meth:`~infkit.Influence.self_scores` of the poisoned model: the
    predicted rise of each example's own loss when it is removed and the model retrained. For
    one logit the loss gradient is parallel to ``J_j``, so RIF's self-score is the IF's divided
    by ``1 - h_j`` exactly (docs/estimators.md §4), whatever the l2 share. The training loss
    and the leverage are reported beside them as baselines.

    Args:
        poisoning: the result of :func:`plant_poisons` (or :func:`plant_poison`).
        estimators: which of ``"if"``, ``"rif"``, ``"newton"`` and ``"relatif"`` to rank by.
        batch_size: examples per forward pass when computing the training loss.

    Returns:
        Per estimator and baseline: the scores, the ROC AUC and the top-k recall of the
        planted points against the clean ones.
    """
    _check_poisoning(poisoning)
    names = _checked_estimators(estimators, SELF_ESTIMATORS)
    batch_size = integer_argument("batch_size", batch_size, 1)
    is_planted = poisoning.is_planted
    scores: dict[str, Tensor] = {}
    for name in names:
        inf = poisoning.influence
        if inf.estimator != name:
            inf = inf.with_estimator(name)
        scores[name] = inf.self_scores().to(torch.float64)
    scores["loss"] = _training_loss(poisoning.task, poisoning.train, batch_size)
    scores["leverage"] = poisoning.leverages.clone()
    k = len(poisoning.planted)
    auc = {name: detection_auc(s, is_planted) for name, s in scores.items()}
    recall = {
        name: float((_ranks(s, is_planted)[is_planted] <= k).double().mean())
        for name, s in scores.items()
    }
    return SelfInfluenceDetection(scores, auc, recall, is_planted)


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


def _checked_targets(targets: Any, X: Tensor, *, one: bool = False) -> tuple[Tensor, Tensor]:
    what = "target" if one else "targets"
    if (
        not isinstance(targets, (tuple, list))
        or len(targets) != 2
        or not isinstance(targets[0], Tensor)
    ):
        raise InvalidInputError(
            f"{what} must be a pair (x, y): x a tensor of test inputs, each shaped like one "
            f"training input {tuple(X.shape[1:])} (x [T, ...] for T targets), y their labels "
            "0 or 1"
        )
    x, y = targets
    if x.shape == X.shape[1:]:
        x = x.unsqueeze(0)
    if x.dim() != X.dim() or x.shape[1:] != X.shape[1:] or len(x) == 0:
        raise InvalidInputError(
            f"{what} x must be examples shaped like a training input {tuple(X.shape[1:])}: "
            f"one such input or [T, ...]; got {tuple(x.shape)}"
        )
    if one and len(x) != 1:
        raise InvalidInputError(
            f"target x must be one example shaped like a training input {tuple(X.shape[1:])} "
            f"(or [1, ...]); got {tuple(x.shape)}: plant_poison poisons one target at a time, "
            "plant_poisons several"
        )
    y = torch.as_tensor(y).reshape(-1)
    if y.numel() != len(x) or bool(((y != 0) & (y != 1)).any()):
        count = "one label" if one else f"{len(x)} labels, one per target,"
        raise InvalidInputError(f"{what} y must be {count} 0 or 1; got {targets[1]!r}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"{what} x holds NaN or Inf")
    return x.to(X.dtype), y.to(X.device)


def _check_poisoning(poisoning: Any) -> None:
    if not isinstance(poisoning, Poisoning):
        raise InvalidInputError(
            "poisoning must be the result of plant_poison or plant_poisons, got "
            f"{type(poisoning).__name__}"
        )


def _checked_estimators(estimators: Any, allowed: tuple[str, ...]) -> list[str]:
    names = [estimators] if isinstance(estimators, str) else list(estimators)
    unknown = [e for e in names if e not in allowed]
    if not names or unknown or len(set(names)) != len(names):
        raise InvalidInputError(
            f"estimators must be distinct names among {', '.join(allowed)}, got {estimators!r}"
        )
    return names


def _target_index(poisoning: Poisoning, target: Any) -> int:
    count = poisoning.n_targets
    if target is None:
        if count != 1:
            raise InvalidInputError(
                f"this poisoning has {count} targets: say which one to detect on, "
                f"detect_poison(poisoning, target=i) with 0 <= i < {count}"
            )
        return 0
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < count:
        raise InvalidInputError(
            f"target must be an integer index 0 <= target < {count} (the poisoning's targets), "
            f"got {target!r}"
        )
    return target


def _training_loss(task: Task, train: tuple[Tensor, Tensor], batch_size: int) -> Tensor:
    """[N] float64 per-example training loss of ``task``'s model."""
    X, y = train
    parts = []
    with torch.no_grad(), evaluation_mode(task.model):
        for start in range(0, len(X), batch_size):
            stop = start + batch_size
            parts.append(task.loss(task.call_model(task.model, X[start:stop]), y[start:stop]))
    return torch.cat(parts).to(torch.float64).reshape(-1)


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
    model's ``q(x) = J(x) (H + ridge)^{-1} J(x)^T``, H its curvature on ``train`` (the clean
    examples and the poisons planted so far; module docstring)."""
    with warnings.catch_warnings():
        # With earlier poisons in ``train`` the clean model is not at that set's optimum, and
        # need not be: only its curvature is used here.
        warnings.filterwarnings(
            "ignore", message="(process [0-9]+ of [0-9]+: )?the model is not at a stationary point"
        )
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
    return best[0].detach()
