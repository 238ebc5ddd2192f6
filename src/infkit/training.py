"""Training to a tight optimum of the mean-form objective, full batch with L-BFGS.

Influence functions describe an optimum of ``L(theta) = mean_i l_i + (l2/2) ||theta||^2``;
:func:`train_to_optimum` gets there (and is what the retraining ground truth uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.errors import NonFiniteError
from infkit.gradients import PerExample, evaluation_mode
from infkit.parameters import ParameterSpace
from infkit.task import Task


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_optimum`."""

    theta: Tensor  # [P], the final flat parameters (model dtype)
    objective: float
    gradient_norm: float  # ||grad L(theta)|| at the end
    iterations: int
    converged: bool


def objective_and_gradient(
    task: Task,
    space: ParameterSpace,
    examples: ExampleSet,
    l2: float,
    indices: Tensor | None = None,
    chunk: int = 4096,
    engine: PerExample | None = None,
) -> tuple[float, Tensor]:
    """L(theta) = mean over ``indices`` of l_i + (l2/2)||theta||^2 and its gradient [P]."""
    engine = engine or PerExample(task, space)
    params = list(dict(task.model.named_parameters())[n] for n in space.names)
    idx = torch.arange(len(examples)) if indices is None else indices
    n = len(idx)
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    for batch in examples.batches(chunk, idx):
        inputs, targets = engine.prepare(batch)
        with torch.enable_grad():
            out = task.call_model(task.model, inputs)
            loss = task.checked_loss(out, targets).sum() / n
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        total += float(loss.detach())
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
    flat_theta = torch.cat([p.detach().reshape(-1) for p in params])
    total += 0.5 * l2 * float(flat_theta.pow(2).sum())
    grad = torch.cat([g.reshape(-1) for g in grads]) + l2 * flat_theta
    return total, grad


def train_to_optimum(
    task: Task,
    train: Any,
    l2: float,
    *,
    indices: Tensor | None = None,
    max_iter: int = 2000,
    tolerance: float = 1e-10,
    history_size: int = 50,
    chunk: int = 4096,
) -> TrainResult:
    """Minimise ``mean_{i in indices} l_i + (l2/2) ||theta||^2`` in place, full batch, L-BFGS.

    Starts from the model's current parameters (a warm start when retraining). Stops when
    ``||grad L||`` falls below ``tolerance`` times its value at the start (or at 1.0 if that is
    smaller), or after ``max_iter`` iterations.
    """
    examples = ExampleSet(train, name="training set")
    space = ParameterSpace(task.model)
    engine = PerExample(task, space)
    params = [dict(task.model.named_parameters())[n] for n in space.names]
    idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    with evaluation_mode(task.model):
        _, g0 = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
        target = tolerance * max(float(g0.norm()), 1.0) if tolerance > 0 else 0.0
        iterations = 0

        def closure() -> Tensor:
            nonlocal iterations
            iterations += 1
            value, grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
            if not torch.isfinite(grad).all() or value != value:
                raise NonFiniteError(
                    "the training objective became NaN/Inf during L-BFGS; check the data and l2"
                )
            for p, g in zip(params, space.unflatten(grad).values()):
                p.grad = g.clone()
            if float(grad.norm()) <= target:
                # Converged: report a zero gradient so L-BFGS stops without another line search.
                for p in params:
                    p.grad.zero_()
            return torch.tensor(value, dtype=space.dtype)

        for _ in range(4):  # L-BFGS can stop early on a flat line search; restart a few times
            optimizer.step(closure)
            value, grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
            if float(grad.norm()) <= target or iterations >= max_iter:
                break
    for p in params:
        p.grad = None
    norm = float(grad.norm())
    return TrainResult(space.flat().clone(), value, norm, iterations, norm <= target)
