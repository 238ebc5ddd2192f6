"""Training-set attacks from input influence (Koh & Liang 2017, §5.2), checked by retraining.

``Influence.input_influence(test, indices)`` is the derivative of each test measurement, after
retraining, with respect to each training input: ``g_tj = d m_t / d x_j``
(docs/estimators.md §8). An attacker who may move k training inputs within a norm budget eps
worsens the summed test measurement ``sum_t m_t`` (the model gets the test examples wrong:
raises a loss, lowers a measurement where higher is better, such as a margin) most, to first
order, by

* choosing the k training examples whose summed derivative ``G_j = s sum_t g_tj`` has the
  largest dual norm (``||G_j||_2`` for an L2 budget, ``||G_j||_1`` for an L-infinity one), and
* moving each by ``eps G_j / ||G_j||_2`` (L2) or ``eps sign(G_j)`` (L-infinity),

where ``s`` is the task's :attr:`~infkit.task.Task.helpful_sign` (+1 for a loss, -1 where
higher is better: a tester's margin task was "attacked" towards a larger margin, +1.59 when
retrained), with the predicted change of measurement t ``sum_j <g_tj, delta_j>`` (positive for
a loss, negative for a margin). :func:`retrained_change`
retrains a copy of the model on the perturbed training set (warm start, the same objective) and
returns the actual change, the ground truth the prediction is judged against
(docs/analyses.md §10).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from infkit.data import ExampleSet, checked_indices
from infkit.errors import InvalidInputError
from infkit.influence import Influence
from infkit.options import integer_argument, real_number
from infkit.task import Task
from infkit.training import train_to_optimum

Norm = Literal["l2", "linf"]


@dataclass(frozen=True)
class Attack:
    """Perturbations of k training inputs and their predicted effect.

    Attributes:
        indices: [k] the attacked training examples.
        delta: [k, *x_shape] the perturbation of each (norm ``epsilon`` in ``norm``).
        predicted: [n_test] the predicted change of each test measurement (first order).
        n_train: N of the training set it was computed on (None: not recorded).
        originals: [k, *x_shape] the attacked examples' inputs as they were (None: not
            recorded); :meth:`apply` checks a training set against both.
    """

    indices: Tensor
    delta: Tensor
    predicted: Tensor
    n_train: int | None = None
    originals: Tensor | None = None

    def apply(self, inputs: Tensor) -> Tensor:
        """A copy of the training ``inputs`` [N, *x_shape] with the perturbations added."""
        if not isinstance(inputs, Tensor) or inputs.shape[1:] != self.delta.shape[1:]:
            raise InvalidInputError(
                "apply takes the training inputs as one tensor [N, *x_shape] shaped like the "
                f"perturbations {tuple(self.delta.shape[1:])}"
            )
        reach = int(self.indices.max()) + 1 if len(self.indices) else 0
        if self.n_train is not None and len(inputs) != self.n_train:
            raise InvalidInputError(
                f"the attack was computed on {self.n_train} training examples, and these "
                f"training inputs hold {len(inputs)}: apply it to the training set the attack "
                "was computed on"
            )
        if reach > len(inputs):
            raise InvalidInputError(
                f"the attack moves training example {reach - 1}, and these training inputs hold "
                f"{len(inputs)}: apply it to the training set the attack was computed on"
            )
        if self.originals is not None:
            mine = inputs[self.indices].to(self.originals.device)
            # compared in the coarser of the two precisions: the same data in float32 and
            # float64 is the same training set
            coarse = min(
                (mine.dtype, self.originals.dtype),
                key=lambda d: -torch.finfo(d).eps if d.is_floating_point else 0.0,
            )
            mine, originals = mine.to(coarse), self.originals.to(coarse)
            if not torch.equal(mine, originals):
                moved = (mine != originals).reshape(len(mine), -1)
                first = int(self.indices[int(moved.any(1).nonzero()[0, 0])])
                raise InvalidInputError(
                    f"training example {first} of these inputs is not the one the attack was "
                    "computed on (its input differs, beyond the rounding of the coarser of their "
                    "two precisions): apply it to the training set the attack was computed on, "
                    "in its order"
                )
        out = inputs.clone()
        out[self.indices] += self.delta.to(out.dtype)
        return out


def training_set_attack(
    inf: Influence,
    test: Any,
    k: int,
    epsilon: float,
    norm: Norm = "l2",
    candidates: Tensor | None = None,
) -> Attack:
    """The first-order attack that worsens the summed test measurement of ``test`` (module
    docstring: raises a loss, lowers a margin): ``k`` training inputs (among ``candidates``,
    default all) moved by ``epsilon`` in ``norm``."""
    if norm not in ("l2", "linf"):
        raise InvalidInputError(f"norm must be 'l2' or 'linf', got {norm!r}")
    size = real_number(epsilon)
    if size is None or not 0 < size < math.inf:
        raise InvalidInputError(
            f"epsilon must be a finite number > 0 (the perturbation's norm), got {epsilon!r}"
        )
    pool = (
        torch.arange(inf.n_train)
        if candidates is None
        else checked_indices(candidates, inf.n_train, what="candidate index", unique=True)
    )
    k = integer_argument("k", k, 1, len(pool))  # at most the candidates, or N
    g = inf.input_influence(test, pool).to(torch.float64)  # [T, n_pool, *x_shape]
    G = inf.task.helpful_sign * g.sum(0).reshape(len(pool), -1)  # the direction that harms
    strength = G.norm(dim=1) if norm == "l2" else G.abs().sum(1)
    chosen = strength.topk(k).indices
    direction = G[chosen]
    if norm == "l2":
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    else:
        direction = direction.sign()
    delta = (size * direction).reshape(k, *g.shape[2:])
    predicted = (g[:, chosen].reshape(g.shape[0], k, -1) * delta.reshape(1, k, -1)).sum((1, 2))
    indices = pool[chosen]
    originals = inf.fitted.train.take(indices).inputs
    return Attack(
        indices,
        delta,
        predicted,
        n_train=inf.n_train,
        originals=originals.detach().clone() if isinstance(originals, Tensor) else None,
    )


def retrain_attacked(task: Task, train: Any, attack: Attack, l2: float) -> Task:
    """A copy of the task's model retrained (warm start, ``mean_i l_i + (l2/2)||theta||^2``)
    on the training set with the attack applied, as a task. ``train`` is any form
    :class:`~infkit.data.ExampleSet` takes whose inputs are one tensor (a pair ``(X, y)``, a
    ``TensorDataset``)."""
    # (unpacked as a pair, a TensorDataset raised "too many values to unpack")
    whole = ExampleSet(train, name="training set")
    batch = whole.take(torch.arange(len(whole)))
    attacked = task.with_model(copy.deepcopy(task.model))
    train_to_optimum(attacked, (attack.apply(batch.inputs), batch.targets), l2, progress=False)
    return attacked


def measurement_change(task: Task, retrained: Task, test: Any) -> Tensor:
    """``m_t(retrained) - m_t(task's model)`` for every example of ``test``, [n_test]."""
    examples = ExampleSet(test, name="test set")
    batch = examples.take(torch.arange(len(examples)))
    with torch.no_grad():
        before = task.checked_measurement(task.call_model(task.model, batch.inputs), batch.targets)
        after = task.checked_measurement(
            task.call_model(retrained.model, batch.inputs), batch.targets
        )
    return (after - before).to(torch.float64)


def retrained_change(task: Task, train: Any, attack: Attack, test: Any, l2: float) -> Tensor:
    """The actual change of each test measurement when the model is retrained on the attacked
    training set (:func:`retrain_attacked`, :func:`measurement_change`)."""
    return measurement_change(task, retrain_attacked(task, train, attack, l2), test)
