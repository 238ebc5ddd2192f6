"""Training to a tight optimum of the mean-form objective, full batch with L-BFGS.

Influence functions describe an optimum of ``L(theta) = mean_i l_i + (l2/2) ||theta||^2``;
:func:`train_to_optimum` gets there (and is what the retraining ground truth uses).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from infkit.curvature import CurvatureOperator
from infkit.data import ExampleSet
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NonFiniteError,
    NotConvergedWarning,
    Notice,
    UnsupportedError,
    warn,
)
from infkit.example_checks import check_examples
from infkit.failures import naming_failures
from infkit.gradients import PerExample, check_finite_rows
from infkit.linalg import conjugate_gradients
from infkit.options import integer_argument, nonnegative_number, real_number
from infkit.parameters import ParameterSpace, dtype_name, evaluation_mode
from infkit.progress import Mode, Progress, resolve, track
from infkit.serial import one_at_a_time
from infkit.task import Task

#: L-BFGS hands over to Newton-CG polishing below this relative gradient norm.
POLISH_FROM = 1e-6
#: a float32 (or coarser) run stopped below this many machine epsilons times its starting
#: gradient norm has gone as far as its precision goes: train_to_optimum does not warn
PRECISION_FLOOR = 100
#: the precisions coarser than float64 that a float64 model's parts may compute in
COARSER = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_optimum`."""

    theta: Tensor  # [P], the final flat parameters (model dtype)
    objective: float
    gradient_norm: float  # ||grad L(theta)|| at the end
    evaluations: int  # objective-and-gradient evaluations by L-BFGS (passes over the data)
    converged: bool  # gradient_norm <= target
    target: float  # the gradient norm it had to reach: tolerance * max(||grad L(theta_0)||, 1)
    #: a float64 run that stalled short of ``target`` on a model that computes a part of its
    #: loss in a coarser precision (float32 inside: :func:`coarser_part`)
    coarse_objective: bool = False
    #: a float32 (or coarser) run that ended within :data:`PRECISION_FLOOR` machine epsilons
    #: (of a gradient of 1), short of ``target``: as far as its precision goes (not warned of;
    #: a retraining counts it converged)
    at_precision: bool = False

    @property
    def done(self) -> bool:
        """Whether it reached ``target`` or, :attr:`at_precision`, as near as its precision
        goes: a retraining that counts as converged (:mod:`infkit.retrain`)."""
        return self.converged or self.at_precision


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


def check_tolerance(tolerance: Any) -> None:
    """Refuse a training tolerance outside [0, 1): the target gradient norm is ``tolerance``
    times the starting one (at least 1), which a tolerance of 1 or more meets before the first
    step (a reviewer's model, never trained, read converged=True), NaN never."""
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        value = float("nan")
    number = isinstance(tolerance, (numbers.Real, Tensor)) or type(tolerance).__module__ == "numpy"
    if isinstance(tolerance, bool) or not number or not 0 <= value < 1:
        raise InvalidInputError(
            f"tolerance must be >= 0 and below 1, got {tolerance!r}: training stops when the "
            "gradient norm falls below tolerance x its starting value (at least 1), which 1 or "
            "more meets before the first step (the default is 1e-10)"
        )


def checked_l2(l2: Any) -> float:
    """The objective's ``l2`` as a float, or an InvalidInputError saying what it must be."""
    given = real_number(l2)
    why = (
        "a negative one rewards large parameters, and the objective has no minimum"
        if given is not None and given < 0
        else "the objective's weight decay, in the units of docs/conventions.md §2"
    )
    return nonnegative_number("l2", l2, why)


def checked_max_iter(max_iter: Any) -> int:
    """``max_iter`` as an int >= 1 (a whole float such as 1e3 too), or an InvalidInputError."""
    if isinstance(max_iter, float) and max_iter.is_integer():
        max_iter = int(max_iter)
    return integer_argument("max_iter", max_iter, 1)


@one_at_a_time
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
    warn_unconverged: bool = True,
    progress: bool | None = None,
) -> TrainResult:
    """Minimise ``mean_{i in indices} l_i + (l2/2) ||theta||^2`` in place, full batch, L-BFGS.

    Starts from the model's current parameters (a warm start when retraining). Stops when
    ``||grad L||`` falls below ``tolerance`` (in [0, 1)) times its value at the start (or at 1.0
    if that is smaller), or after ``max_iter`` iterations. When L-BFGS stalls at float precision, up to
    ``newton_polish`` matrix-free Newton-CG steps (Hessian-vector products) finish the job.

    A float64 run that stops short of its target before ``max_iter`` looks for a part of the
    loss computed in a coarser precision (:func:`coarser_part`: Hugging Face's RMSNorm and
    eager softmax run in float32 in a float64 model), whose rounding stops the optimiser; if
    there is one, a :class:`~infkit.errors.NotConvergedWarning` names the value and its module
    and :attr:`TrainResult.coarse_objective` is True. Any other run that stops short of its
    target warns too (a ``NotConvergedWarning`` with its gradient norm and why it stopped),
    except a float32 (or coarser) run that stalled within :data:`PRECISION_FLOOR` machine
    epsilons of its starting gradient norm, or ended within that of 1: it went as far as its
    precision goes (``converged`` stays False, the default target being float64's); in the
    latter case :attr:`TrainResult.at_precision` is True and a retraining counts as converged. ``warn_unconverged=False`` leaves that warning
    to a caller that reports it its own way (retraining, poisoning); the one that names a
    coarser part stays. ``progress`` shows the optimiser's evaluations with the gradient norm
    (None: a bar where someone watches, else a line after a few seconds; False: nothing, as the
    retrainings run it).
    """
    l2, max_iter = checked_l2(l2), checked_max_iter(max_iter)
    check_tolerance(tolerance)
    examples = ExampleSet(train, name="training set")
    space = ParameterSpace(task.model)
    engine = PerExample(task, space)
    idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
    # the inputs and labels as fit checks them, a mismatch named, not a raw reshape error: those
    # of the examples trained on (indices=), once a set (a retraining's set is checked)
    trained = examples if idx is None else examples.subset(idx)
    if isinstance(train, ExampleSet) and train._checked:
        pass
    else:
        check_examples(engine, trained)
        if idx is None and isinstance(train, ExampleSet):
            train._checked = examples._checked
    params = [dict(task.model.named_parameters())[n] for n in space.names]
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    # (the optimiser's evaluations with the gradient norm: a tester's CNN trained for minutes
    # without a word; a bar where someone watches, else a line after LOG_AFTER seconds)
    shown = Progress(resolve(progress), None, "train to optimum")
    with (
        evaluation_mode(task.model),
        naming_failures(engine, trained, batch_size=chunk),
        shown,
    ):
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
            shown.update(note=f"||grad L|| {float(grad.norm()):.2e}")
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

        polished = True  # (until the model refuses the curvature products)

        def polish(value: float, grad: Tensor) -> tuple[float, Tensor]:
            # Near the optimum L-BFGS's line search stalls at float precision of the objective;
            # Newton-CG steps use gradients only and converge quadratically.
            nonlocal polished
            for _ in range(newton_polish if polished else 0):
                if float(grad.norm()) <= target:
                    break
                try:
                    stepped = _newton_cg_step(task, space, examples, l2, idx, chunk, engine, grad)
                except UnsupportedError as error:  # (no second derivative: nn.EmbeddingBag)
                    polished = False
                    warn(
                        "train_to_optimum polishes L-BFGS's answer by Newton-CG steps, whose "
                        f"curvature products this model does not allow ({error}): L-BFGS's "
                        "answer is kept, without them",
                        Notice,
                    )
                    break
                if not stepped:
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
        coarse = None
        if norm > target and iterations < max_iter and space.dtype == torch.float64:
            coarse = coarser_part(task, space, examples, idx)
    for p in params:
        p.grad = None
    if coarse is not None:
        warn(
            f"train_to_optimum stalled short of its target (||grad L|| {norm:.3g}, target "
            f"{target:.3g}) on a float64 model that computes part of its loss in a coarser "
            f"precision: {coarse}. The objective carries that precision's rounding, and where "
            "a step's decrease falls below it the optimiser cannot go on, maybe far from the "
            "optimum (Hugging Face's RMSNorm always, and its eager attention's softmax, run in "
            "float32 in a float64 model): compute those parts in float64 "
            "(attn_implementation='sdpa'; an RMSNorm whose forward keeps its input's dtype) for "
            "a float64 optimum, or read the result as float32's (docs/methods/"
            "language_models.md §1)",
            NotConvergedWarning,
        )
    scale = target / tolerance if tolerance > 0 else 1.0  # max(||grad L(start)||, 1)
    floor = 0.0 if space.dtype == torch.float64 else PRECISION_FLOOR * torch.finfo(space.dtype).eps
    # as near as the precision lets a gradient of 1 go: counted as converged (at_precision; a
    # tester's float32 retrainings at 1.4e-8 equalled float64's to 2e-5). Not warned of either:
    # a run that stalled within the floor of its starting norm (as before; reviewers' stalled
    # and max_iter-cut float32 runs under that floor were 88x and 132% off the optimum, so
    # that floor counts for the warning alone)
    at_floor = norm <= floor
    quiet = at_floor or (iterations < max_iter and norm <= floor * scale)
    if warn_unconverged and not (norm <= target or coarse is not None or quiet):
        why = (
            f"max_iter={max_iter} reached"
            if iterations >= max_iter
            else "L-BFGS and the Newton polish could not progress"
        )
        warn(
            f"train_to_optimum stopped short of its target: ||grad L|| {norm:.3g} "
            f"against {target:.3g} after {iterations} evaluations ({why}), so the "
            "model is not at the optimum the influence function describes. Raise max_iter; if "
            "the gradient norm stalls instead, loosen tolerance (a float32 model stops near its "
            "precision) or look for what keeps the objective from a minimum (a non-smooth "
            "activation such as ReLU stalls at its kinks)",
            NotConvergedWarning,
        )
    return TrainResult(
        space.flat().clone(),
        value,
        norm,
        iterations,
        norm <= target,
        target,
        coarse is not None,
        norm > target and bool(at_floor),
    )


class _CoarserValues(TorchFunctionMode):
    """Records the first value that depends on the parameters (requires grad) and is held in a
    precision of :data:`COARSER`, with the function that made it and the innermost module
    running then (``modules``, a stack the model's hooks keep)."""

    def __init__(self, modules: list[str]) -> None:
        super().__init__()
        self.modules = modules
        self.found: str | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            self.found is None
            and isinstance(out, Tensor)
            and out.requires_grad
            and out.dtype in COARSER
        ):
            where = f"in module {self.modules[-1]!r}" if self.modules else "outside any module"
            name = getattr(func, "__name__", repr(func))
            self.found = f"{name}(...) makes a {dtype_name(out.dtype)} value {where}"
        return out


def coarser_part(
    task: Task, space: ParameterSpace, examples: ExampleSet, indices: Tensor | None = None
) -> str | None:
    """Where a float64 model computes a part of its loss in a coarser precision, or None.

    The loss of a few examples is computed once while every torch function's result is
    watched: a value that depends on the parameters and is float32 (float16, bfloat16) rounds
    the objective at that precision, which a float64 optimiser cannot see below. Values that
    do not depend on the parameters (rotary tables, masks) are constants and do not count.
    Non-smooth parts (ReLU, max) are float64 and are not named, whatever their kinks do."""
    chosen = torch.arange(min(len(examples), 4)) if indices is None else indices[:4]
    inputs, targets = PerExample(task, space).prepare(examples.take(chosen))
    modules: list[str] = []

    def leave(*_: Any) -> None:  # a forward hook returns None: the output stays the module's
        if modules:
            modules.pop()

    handles = []
    for name, module in task.model.named_modules():
        label = f"{name or 'the model'} ({type(module).__name__})"
        try:
            entered = module.register_forward_pre_hook(
                lambda *_, label=label: modules.append(label)
            )
        except RuntimeError:  # a TorchScript module takes no hooks: its parts go unnamed
            continue
        handles += [entered, module.register_forward_hook(leave)]
    watch = _CoarserValues(modules)
    try:
        with torch.enable_grad(), watch:
            task.checked_loss(task.call_model(task.model, inputs), targets)
    except Exception:  # a diagnostic after training: what it cannot run it does not name
        return None
    finally:
        for handle in handles:
            handle.remove()
    return watch.found


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
