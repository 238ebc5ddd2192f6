"""The demo's models: an L2 multinomial logistic regression and a small tanh MLP, and training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from infkit.demo.data import N_CLASSES, N_PIXELS
from infkit.task import Task


@dataclass(frozen=True)
class ModelSpec:
    """One model of the demo and the objective it is trained on.

    Attributes:
        name: short name used in file names (``logreg``, ``mlp``).
        hidden: width of the tanh hidden layer; ``None`` for logistic regression.
        l2: the mean-form L2 coefficient of the training objective.
        damping: extra numerical damping of the curvature (0: none needed).
        retrain_tolerance: ``||grad L||`` at which a leave-one-out retraining stops (the
            retrained parameters are then within ``tolerance / l2`` of the exact optimum);
            ``1e-8`` for the MLP changes its measured losses by under 1e-6 relative to
            ``1e-10`` and saves a third of the time.
    """

    name: str
    hidden: int | None
    l2: float
    damping: float = 0.0
    retrain_tolerance: float = 1e-10


LOGREG = ModelSpec("logreg", hidden=None, l2=1e-3, retrain_tolerance=1e-10)


MLP = ModelSpec("mlp", hidden=16, l2=1e-2, retrain_tolerance=1e-8)


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """A float64 model for ``spec``, initialised from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.hidden is None:
            model: nn.Module = nn.Linear(N_PIXELS, N_CLASSES)
        else:
            model = nn.Sequential(
                nn.Linear(N_PIXELS, spec.hidden), nn.Tanh(), nn.Linear(spec.hidden, N_CLASSES)
            )
    return model.double()


@torch.no_grad()
def predict(model: nn.Module, X: Tensor) -> Tensor:
    """Predicted classes [n]."""
    return model(X).argmax(dim=1)


@torch.no_grad()
def losses(task: Task, X: Tensor, y: Tensor) -> Tensor:
    """Per-example losses [n] of the task's model."""
    return task.loss(task.model(X), y)


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Share of correctly classified examples."""
    return float((predict(model, X) == y).double().mean())
