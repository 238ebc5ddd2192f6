"""Linearised models and the linearizability diagnostic (docs/methods/dual.md §2, §8).

``linearize(model, params0)`` returns the first-order Taylor expansion of a network around
``params0``::

    f_lin(x; theta) = f(x; theta_0) + J_0(x) (theta - theta_0),    J_0(x) = df(x; theta_0)/dtheta,

as an ordinary ``nn.Module`` (one forward-mode product per call, ``torch.func.jvp``), so it can be
trained with any optimiser, with :func:`infkit.train_to_optimum`, or attributed with any method.
Its trainable parameters are a ``ParameterList`` in the wrapped network's ``parameters()`` order,
so its flat [P] vectors line up with the network's.

The regulariser anchor (docs/methods/dual.md §2, §8): infkit's objective is ``mean_i l_i + (l2/2)||theta||^2``
over the module's trainable parameters. With ``offset=False`` these are theta itself (anchor 0);
with ``offset=True`` they are ``theta - theta_0`` (initialised at 0), so the same objective (and
the same ``train_to_optimum``, retraining and influence code) is anchored at theta_0, the
natural choice for kernel regression around the initial function. Training and attribution then
use the same anchor automatically.

``linearizability(task, train, ...)`` trains a network and its linearisation side by side with
one recipe (full-batch gradient descent from the same theta_0) and records the relative
parameter distance and the output RMSE along the way: the dual method's answers can be trusted
for the network when both stay small (the network is "epsilon-linearizable").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from infkit.autodiff import padding_rows_constant, quiet_forward_mode
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError
from infkit.options import integer_argument, real_number
from infkit.parameters import ParameterSpace, evaluation_mode, in_mode
from infkit.serial import one_at_a_time
from infkit.task import Task, default_output_fn, pick_outputs


class LinearizedModel(nn.Module):
    """``f(x; theta_0) + J_0(x)(theta - theta_0)`` for a wrapped network (see :func:`linearize`).

    Attributes:
        base: the wrapped network (not a submodule: its own parameters are never used; the
            expansion point and its frozen tensors are buffers of this module).
        base_names: the network's trainable parameter names, in flat order.
        offset: whether the trainable parameters are ``theta - theta_0`` (True) or theta.
    """

    def __init__(
        self,
        model: nn.Module,
        params0: Tensor | dict[str, Tensor] | None = None,
        *,
        offset: bool = False,
        output_fn: Callable[[Any], Tensor] = default_output_fn,
    ) -> None:
        super().__init__()
        if isinstance(model, LinearizedModel):
            raise InvalidInputError("the model is already linearised")
        space = ParameterSpace(model)
        if params0 is None:
            point = space.params()
        elif isinstance(params0, Tensor):
            point = space.unflatten(params0.reshape(-1).to(space.device, space.dtype))
        else:
            missing = [n for n in space.names if n not in params0]
            if missing:
                raise InvalidInputError(f"params0 has no value for {missing[:5]}")
            point = {n: params0[n] for n in space.names}
        self.base: nn.Module
        object.__setattr__(self, "base", model)  # hidden: not a submodule
        self.base_names: list[str] = list(space.names)
        self.offset = offset
        self.output_fn = output_fn
        for k, n in enumerate(self.base_names):
            self.register_buffer(f"params0_{k}", point[n].detach().clone())
        consts = space.constants()
        self._const_names: list[str] = list(consts)
        for k, n in enumerate(self._const_names):
            self.register_buffer(f"const_{k}", consts[n].detach().clone())
        self.theta = nn.ParameterList(
            [
                nn.Parameter(
                    torch.zeros_like(point[n]) if offset else point[n].detach().clone(),
                    requires_grad=True,
                )
                for n in self.base_names
            ]
        )
        self.train(model.training)  # (its own flag: the network is evaluated in eval mode)

    # ------------------------------------------------------------------ views
    def params0(self) -> dict[str, Tensor]:
        """The expansion point theta_0 by the network's parameter names."""
        return {n: getattr(self, f"params0_{k}") for k, n in enumerate(self.base_names)}

    def base_constants(self) -> dict[str, Tensor]:
        """The network's frozen parameters and buffers."""
        return {n: getattr(self, f"const_{k}") for k, n in enumerate(self._const_names)}

    def delta(self) -> dict[str, Tensor]:
        """theta - theta_0 by the network's parameter names (differentiable)."""
        p0 = self.params0()
        return {n: (t if self.offset else t - p0[n]) for n, t in zip(self.base_names, self.theta)}

    def params(self) -> dict[str, Tensor]:
        """theta (absolute, whatever the parametrisation) by the network's parameter names."""
        p0 = self.params0()
        return {
            n: (p0[n] + t if self.offset else t).detach()
            for n, t in zip(self.base_names, self.theta)
        }

    def flat_params(self) -> Tensor:
        """theta as a flat [P] vector in the network's order."""
        return torch.cat([t.reshape(-1) for t in self.params().values()])

    def network(self) -> nn.Module:
        """A copy of the wrapped network with its parameters set to this model's theta."""
        clone = copy.deepcopy(self.base)
        ParameterSpace(clone).assign_(self.flat_params())
        return clone

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        p0 = self.params0()
        consts = self.base_constants()

        def f(p: dict[str, Tensor]) -> Tensor:
            return pick_outputs(
                self.output_fn, functional_call(self.base, {**p, **consts}, args, kwargs)
            )

        # an embedding's padding row a constant of the lookup, as the backward pass through
        # this jvp reads it: otherwise the model's gradient is not its function's (a
        # reviewer's tied, padded lookup: 0.87 against 1.43 on that row)
        # the network in evaluation mode, whatever either module's: with dropout or batch
        # statistics f is not one function of theta to expand (a tester's dropout gave two
        # calls 1.69 apart, batch norm's running statistics failed inside the jvp), and the
        # user's network keeps its mode
        with (
            in_mode(self.base, training=False),
            padding_rows_constant(self.base),
            quiet_forward_mode(),
        ):
            out0, tangent = jvp(f, (p0,), (self.delta(),))[:2]
        return out0 + tangent

    def extra_repr(self) -> str:
        p = sum(t.numel() for t in self.theta)
        return f"base={type(self.base).__name__}, P={p}, offset={self.offset}"


def linearize(
    model: nn.Module,
    params0: Tensor | dict[str, Tensor] | None = None,
    *,
    offset: bool = False,
    output_fn: Callable[[Any], Tensor] = default_output_fn,
) -> LinearizedModel:
    """The linearisation of ``model`` around ``params0`` (default: its current parameters).

    The network is evaluated in evaluation mode (dropout off, batch norm's running
    statistics), whatever the mode of either module, as :func:`~infkit.ntk.empirical_ntk` takes
    it: a network with dropout or batch statistics is not one function of theta to expand.

    Args:
        model: the network (left unmodified, its mode included).
        params0: the expansion point theta_0, a flat [P] tensor or a dict by parameter name.
        offset: make the trainable parameters ``theta - theta_0`` so that infkit's
            ``(l2/2)||params||^2`` regulariser is anchored at theta_0 (docs/methods/dual.md §2, §8).
        output_fn: extracts the output tensor from what ``model(...)`` returns.

    Returns:
        a :class:`LinearizedModel`, trainable like any module. Its flat parameter vectors follow
        ``model``'s order; ``.flat_params()`` gives the absolute theta either way.
    """
    return LinearizedModel(model, params0, offset=offset, output_fn=output_fn)


# ---------------------------------------------------------------------- diagnostic
@dataclass
class LinearizabilityReport:
    """Curves of a network and its linearisation trained side by side.

    Attributes:
        steps: [k] the recorded steps (0 = the common start).
        param_distance: [k] ``||theta_t - theta_t^lin|| / ||theta_t^lin||``.
        output_rmse: [k] ``||f(X; theta_t) - f_lin(X; theta_t^lin)|| / sqrt(n C)`` on the
            evaluation inputs.
        loss, loss_lin: [k] the training objectives of the network and of the linearisation.
        accuracy, accuracy_lin: [k] evaluation accuracy (argmax of the outputs) when the
            targets are class labels, else None.
    """

    steps: Tensor
    param_distance: Tensor
    output_rmse: Tensor
    loss: Tensor
    loss_lin: Tensor
    accuracy: Tensor | None = None
    accuracy_lin: Tensor | None = None

    @property
    def max_param_distance(self) -> float:
        return float(self.param_distance.max())

    @property
    def max_output_rmse(self) -> float:
        return float(self.output_rmse.max())

    def linearizable(self, epsilon: float) -> bool:
        """Whether both curves stay below ``epsilon`` over the whole run."""
        return self.max_param_distance <= epsilon and self.max_output_rmse <= epsilon

    def table(self) -> str:
        """The curves as a markdown table."""
        lines = [
            "| step | param distance | output RMSE | loss | loss (lin) |",
            "|---|---|---|---|---|",
        ]
        for k in range(len(self.steps)):
            lines.append(
                f"| {int(self.steps[k])} | {float(self.param_distance[k]):.3e} | "
                f"{float(self.output_rmse[k]):.3e} | {float(self.loss[k]):.5f} | "
                f"{float(self.loss_lin[k]):.5f} |"
            )
        return "\n".join(lines)


def _objective(
    task: Task, model: nn.Module, inputs: Any, targets: Any, l2: float, anchor: list[Tensor] | None
) -> Tensor:
    out = task.call_model(model, inputs)
    loss = task.checked_loss(out, targets).mean()
    if l2:
        params = [p for p in model.parameters() if p.requires_grad]
        if anchor is None:
            reg = sum(p.pow(2).sum() for p in params)
        else:
            reg = sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
        loss = loss + 0.5 * l2 * reg
    return loss


@one_at_a_time
def linearizability(
    task: Task,
    train: Any,
    evaluation: Any = None,
    *,
    steps: int = 1000,
    lr: float = 0.1,
    momentum: float = 0.0,
    l2: float = 0.0,
    anchor: str = "init",
    record_every: int | None = None,
) -> LinearizabilityReport:
    """Train ``task.model`` and its linearisation side by side; record how far they drift apart.

    Both start from the model's current parameters theta_0 and take the same full-batch
    (S)GD steps on ``mean_i l_i + (l2/2)||theta - theta'||^2`` (``anchor="init"``: theta' =
    theta_0; ``"zero"``: theta' = 0). The model passed in is not modified (copies are trained).

    Args:
        task: the task (model at theta_0, per-example loss).
        train: training data.
        evaluation: data for the output RMSE (default: ``train``).
        steps: full-batch (S)GD steps.
        lr: the learning rate.
        momentum: SGD momentum.
        l2: the mean-form L2 coefficient of the objective.
        anchor: ``"init"`` (theta' = theta_0) or ``"zero"`` (theta' = 0).
        record_every: how often to record (default steps/50).

    Returns:
        a :class:`LinearizabilityReport`.
    """
    if anchor not in ("init", "zero"):
        raise InvalidInputError(f"anchor must be 'init' or 'zero', got {anchor!r}")
    steps = integer_argument("steps", steps, 1)
    if record_every is not None:
        record_every = integer_argument("record_every", record_every, 1)
    for name, value, low, high in (("lr", lr, 0.0, math.inf), ("l2", l2, 0.0, math.inf)):
        number = real_number(value)
        if number is None or not low <= number < high or (name == "lr" and number == 0):
            raise InvalidInputError(
                f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}"
            )
    number = real_number(momentum)
    if number is None or not 0 <= number < 1:
        raise InvalidInputError(f"momentum must be a number in [0, 1), got {momentum!r}")
    examples = ExampleSet(train, name="training set")
    examples.check_finite()
    evaluation_set = examples if evaluation is None else ExampleSet(evaluation, name="evaluation")
    net = copy.deepcopy(task.model)
    lin = linearize(copy.deepcopy(task.model), output_fn=task.output_fn)
    space_net = ParameterSpace(net)
    space_lin = ParameterSpace(lin)
    dev, dt = space_net.device, space_net.dtype

    def cast(t: Tensor) -> Tensor:
        t = t.to(dev)
        return t.to(dt) if t.is_floating_point() else t

    from infkit.data import map_tensors

    whole = examples.take(torch.arange(len(examples)))
    x, y = map_tensors(whole.inputs, cast), map_tensors(whole.targets, lambda t: t.to(dev))
    ev = evaluation_set.take(torch.arange(len(evaluation_set)))
    xe, ye = map_tensors(ev.inputs, cast), map_tensors(ev.targets, lambda t: t.to(dev))
    theta0 = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    anchor_net = theta0 if anchor == "init" else None
    anchor_lin = anchor_net
    params_net = [p for p in net.parameters() if p.requires_grad]
    params_lin = [p for p in lin.parameters() if p.requires_grad]
    opt_net = torch.optim.SGD(params_net, lr=lr, momentum=momentum)
    opt_lin = torch.optim.SGD(params_lin, lr=lr, momentum=momentum)
    every = record_every or max(1, steps // 50)
    rows: list[tuple[float, ...]] = []
    classify = isinstance(ye, Tensor) and not ye.is_floating_point()

    def record(step: int, loss_net: float, loss_lin: float) -> None:
        with torch.no_grad(), evaluation_mode(net), evaluation_mode(lin):
            fn = task.call_model(net, xe)
            fl = task.call_model(lin, xe)
        n = fn.shape[0]
        c = fn[0].numel()
        t_net, t_lin = space_net.flat(), space_lin.flat()
        dist = float((t_net - t_lin).norm() / t_lin.norm().clamp_min(1e-300))
        rmse = float((fn - fl).reshape(-1).norm() / math.sqrt(n * c))
        acc = acc_lin = float("nan")
        if classify and fn.dim() == 2:
            acc = float((fn.argmax(1) == ye).double().mean())
            acc_lin = float((fl.argmax(1) == ye).double().mean())
        rows.append((step, dist, rmse, loss_net, loss_lin, acc, acc_lin))

    with evaluation_mode(net), evaluation_mode(lin):
        for step in range(steps + 1):
            opt_net.zero_grad()
            opt_lin.zero_grad()
            loss_net = _objective(task, net, x, y, l2, anchor_net)
            loss_lin = _objective(task, lin, x, y, l2, anchor_lin)
            if step % every == 0 or step == steps:
                record(step, float(loss_net.detach()), float(loss_lin.detach()))
            if step == steps:
                break
            loss_net.backward()
            loss_lin.backward()
            opt_net.step()
            opt_lin.step()
    data = torch.tensor(rows, dtype=torch.float64)
    return LinearizabilityReport(
        steps=data[:, 0].long(),
        param_distance=data[:, 1],
        output_rmse=data[:, 2],
        loss=data[:, 3],
        loss_lin=data[:, 4],
        accuracy=data[:, 5] if classify else None,
        accuracy_lin=data[:, 6] if classify else None,
    )
