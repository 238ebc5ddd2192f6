"""Training to a tight optimum of the mean-form objective, full batch with L-BFGS.

Influence functions describe an optimum of ``L(theta) = mean_i l_i + (l2/2) ||theta||^2``;
:func:`train_to_optimum` gets there (and is what the retraining ground truth uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.curvature import CurvatureOperator
from infkit.data import ExampleSet
from infkit.errors import CurvatureError, NonFiniteError, NotConvergedWarning, warn
from infkit.gradients import PerExample, check_finite_rows
from infkit.linalg import conjugate_gradients
from infkit.parameters import ParameterSpace, evaluation_mode
from infkit.progress import Mode, track
from infkit.task import Task

#: L-BFGS hands over to Newton-CG polishing below this relative gradient norm.
POLISH_FROM = 1e-6
#: a stalled float64 run measures the objective's slope along its gradient over a step that
#: changes it by this share of its value: float64's rounding is far below it, float32's above
SLOPE_PROBE = 1e-9
#: ... and calls the objective rounded coarser than float64 where that slope is this far off
SLOPE_MISMATCH = 0.1


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_optimum`."""

    theta: Tensor  # [P], the final flat parameters (model dtype)
    objective: float
    gradient_norm: float  # ||grad L(theta)|| at the end
    evaluations: int  # objective-and-gradient evaluations by L-BFGS (passes over the data)
    converged: bool  # gradient_norm <= target
    target: float  # the gradient norm it had to reach: tolerance * max(||grad L(theta_0)||, 1)
    #: a float64 run that stalled short of ``target`` on an objective whose own changes along
    #: its gradient disagree with it there (parts of the model compute in float32)
    coarse_objective: bool = False


def objective_and_gradient(
    task: Task,
    space: ParameterSpace,
    examples: ExampleSet,
    l2: float,
    indices: Tensor | None = None,
    chunk: int = 4096,
    engine: PerExample | None = None,
    progress: Mode = "off",
) -> tuple[float, Tensor]:
    """L(theta) = mean over ``indices`` of l_i + (l2/2)||theta||^2 and its gradient [P].

    ``chunk`` examples per forward and backward pass (a fit passes its ``batch_size``: a
    language model's sequences cannot all go through at once); ``progress`` shows the pass.
    """
    engine = engine or PerExample(task, space)
    params = list(dict(task.model.named_parameters())[n] for n in space.names)
    idx = torch.arange(len(examples)) if indices is None else indices
    n = len(idx)
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    batches = track(examples.batches(chunk, idx), progress, "objective gradient", -(-n // chunk))
    for batch in batches:
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


def _name_non_finite_outputs(
    engine: PerExample, examples: ExampleSet, indices: Tensor | None, chunk: int
) -> None:
    """Raise NonFiniteError naming the first example whose model outputs are not finite (with
    a hint when it is padded): outputs that the loss skips (a padding position's logits) still
    spread NaN into the gradient, as 0 x NaN."""
    with torch.no_grad():
        for batch in examples.batches(chunk, indices):
            check_finite_rows(engine.outputs(batch), batch, "model output", engine.precision)


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
    newton_polish: int = 8,
) -> TrainResult:
    """Minimise ``mean_{i in indices} l_i + (l2/2) ||theta||^2`` in place, full batch, L-BFGS.

    Starts from the model's current parameters (a warm start when retraining). Stops when
    ``||grad L||`` falls below ``tolerance`` times its value at the start (or at 1.0 if that is
    smaller), or after ``max_iter`` iterations. When L-BFGS stalls at float precision, up to
    ``newton_polish`` matrix-free Newton-CG steps (Hessian-vector products) finish the job.
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
        stop_at = target

        def closure() -> Tensor:
            nonlocal iterations
            iterations += 1
            value, grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
            if not torch.isfinite(grad).all() or value != value:
                _name_non_finite_outputs(engine, examples, idx, chunk)
                raise NonFiniteError(
                    f"the training objective or its gradient became NaN/Inf at L-BFGS's "
                    f"evaluation {iterations} (the model's outputs are finite on every example): "
                    "check the data and l2, and that the model's loss is finite for all its "
                    "parameters"
                )
            for p, g in zip(params, space.unflatten(grad).values()):
                p.grad = g.clone()
            if float(grad.norm()) <= stop_at:
                # Reached: report a zero gradient so L-BFGS stops without another line search.
                for p in params:
                    if p.grad is not None:
                        p.grad.zero_()
            return torch.tensor(value, dtype=space.dtype)

        def run_lbfgs() -> tuple[float, Tensor]:
            for _ in range(4):  # L-BFGS can stop early on a flat line search; restart it
                optimizer.step(closure)
                value, grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
                if float(grad.norm()) <= stop_at or iterations >= max_iter:
                    break
            return value, grad

        def polish(value: float, grad: Tensor) -> tuple[float, Tensor]:
            # Near the optimum L-BFGS's line search stalls at float precision of the objective;
            # Newton-CG steps use gradients only and converge quadratically.
            for _ in range(newton_polish):
                if float(grad.norm()) <= target:
                    break
                if not _newton_cg_step(task, space, examples, l2, idx, chunk, engine, grad):
                    break
                value, grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
            return value, grad

        # L-BFGS to a moderate gradient, Newton-CG from there; L-BFGS again if Newton cannot
        # finish (a nonconvex region), then one more polish.
        stop_at = max(target, POLISH_FROM * max(float(g0.norm()), 1.0))
        value, grad = polish(*run_lbfgs())
        if float(grad.norm()) > target and iterations < max_iter:
            stop_at = target
            value, grad = polish(*run_lbfgs())
        norm = float(grad.norm())
        coarse = (
            norm > target
            and iterations < max_iter
            and space.dtype == torch.float64
            and _coarse_objective(
                space,
                lambda: objective_and_gradient(task, space, examples, l2, idx, chunk, engine),
                value,
                grad,
            )
        )
    for p in params:
        p.grad = None
    if coarse:
        warn(
            "train_to_optimum stalled short of its target on a float64 model whose objective "
            "rounds coarser than float64: its changes along its own gradient disagree with "
            "the gradient at a step float64 resolves, so parts of the model compute in a lower "
            "precision (Hugging Face's RMSNorm always, and its eager attention's softmax, run "
            "in float32 in a float64 model). Where that rounding sets in the optimiser cannot "
            "go on, maybe far from the optimum: compute those parts in float64 "
            "(attn_implementation='sdpa'; an RMSNorm whose forward keeps its input's dtype) for "
            "a float64 optimum, or read the result as float32's (docs/methods/"
            "language_models.md §1)",
            NotConvergedWarning,
        )
    return TrainResult(
        space.flat().clone(), value, norm, iterations, norm <= target, target, coarse
    )


def _coarse_objective(
    space: ParameterSpace,
    objective: Callable[[], tuple[float, Tensor]],
    value: float,
    grad: Tensor,
) -> bool:
    """Whether the ``objective``'s (at ``space``'s parameters: value and gradient ``grad``)
    central difference along its unit gradient, over a step that
    changes it by :data:`SLOPE_PROBE` of its value (far above float64's rounding, below
    float32's) or 1e-4 of the parameters' norm if that is shorter (a probe that stays local), is
    more than :data:`SLOPE_MISMATCH` from ``||grad||``; the parameters are left as they were.
    False where even float64 would not resolve that change (below 1e-12 of the value)."""
    norm = float(grad.norm())
    theta = space.flat().clone()
    scale = max(abs(value), 1.0)
    step = min(SLOPE_PROBE * scale / norm, 1e-4 * max(float(theta.norm()), 1.0))
    if step * norm < 1e-12 * scale:
        return False
    direction = (grad / norm).to(theta.dtype)
    try:
        space.assign_(theta + step * direction)
        ahead, _ = objective()
        space.assign_(theta - step * direction)
        behind, _ = objective()
    finally:
        space.assign_(theta)
    slope = (ahead - behind) / (2 * step)
    return abs(slope - norm) > SLOPE_MISMATCH * norm


def _newton_cg_step(
    task: Task,
    space: ParameterSpace,
    examples: ExampleSet,
    l2: float,
    idx: Tensor | None,
    chunk: int,
    engine: PerExample,
    grad: Tensor,
    cg_iters: int = 100,
) -> bool:
    """theta <- theta - (H + l2 I)^{-1} grad by conjugate gradients on Hessian-vector products.

    H is the Hessian of the mean loss over ``idx`` (:class:`infkit.curvature.CurvatureOperator`).
    Returns False (and leaves theta unchanged) when the step does not reduce ||grad||, or when
    CG meets non-positive curvature (a nonconvex region: L-BFGS carries on from there).
    """
    operator = CurvatureOperator(engine, examples, "hessian", batch_size=chunk, indices=idx)

    def matmat(X: Tensor) -> Tensor:  # columns in, columns out
        rows = X.T.contiguous()
        return (operator.matmat(rows) + l2 * rows).T

    try:
        result = conjugate_gradients(
            matmat, -grad.detach().to(torch.float64).reshape(-1, 1), tol=1e-12, maxiter=cg_iters
        )
    except CurvatureError:
        return False
    theta = space.flat().clone()
    space.add_(result.X[:, 0])
    _, new_grad = objective_and_gradient(task, space, examples, l2, idx, chunk, engine)
    if not float(new_grad.norm()) < float(grad.norm()):
        space.assign_(theta)
        return False
    return True
