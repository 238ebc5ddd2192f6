"""Per-example gradients, Jacobians and output-space quantities at the current parameters.

Everything is computed with torch.func (``vmap`` over ``grad`` / ``jacrev``) in the model's dtype,
one batch at a time. Modules that ``vmap`` cannot trace (data-dependent control flow, ``.item()``,
in-place updates of batched tensors) fall back, with one warning, to an exact per-example loop
over plain autograd.

Notation (methods.md §0): for example i with output f_i in R^C and per-example loss l_i,
``grad l_i`` is the parameter gradient in R^P, ``J_i`` in R^{C x P} the output Jacobian,
``g_i = dl_i/df`` in R^C and ``Lambda_i = d^2 l_i/df^2`` in R^{C x C}.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, vmap

from infkit.data import Batch, map_tensors
from infkit.errors import InfkitError, NonFiniteError, UnsupportedError
from infkit.parameters import ParameterSpace
from infkit.task import Task

MODES = ("auto", "vmap", "loop")


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with ``model.eval()`` (deterministic dropout / batch-norm), restoring the mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _one(obj: Any, i: int) -> Any:
    return map_tensors(obj, lambda t: t[i : i + 1])


def _unsqueeze(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.unsqueeze(0))


class PerExample:
    """Per-example quantities of a task at the model's current parameters.

    Args:
        task: the task.
        space: the parameter space of ``task.model``.
        mode: ``"auto"`` (vmap, falling back to a loop on failure), ``"vmap"`` or ``"loop"``.
    """

    def __init__(self, task: Task, space: ParameterSpace, mode: str = "auto") -> None:
        if mode not in MODES:
            raise UnsupportedError(f"unknown per-example mode {mode!r}; use one of {MODES}")
        self.task = task
        self.space = space
        self.mode = mode
        self._vmap_failed = False

    # ------------------------------------------------------------------ plumbing
    def prepare(self, batch: Batch) -> tuple[Any, Any]:
        """Inputs cast to the model's device (and float inputs to its dtype), and targets."""
        dev, dt = self.space.device, self.space.dtype

        def cast(t: Tensor) -> Tensor:
            t = t.to(dev)
            return t.to(dt) if t.is_floating_point() else t

        inputs = map_tensors(batch.inputs, cast)
        targets = map_tensors(batch.targets, lambda t: t.to(dev))
        return inputs, targets

    def _call(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        state = {**params, **self.space.constants()}
        model = self.task.model

        def fn(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, state, args, kwargs)

        return self.task.call_model(fn, inputs)

    def _run(self, vmapped: Callable[[], Tensor], looped: Callable[[], Tensor]) -> Tensor:
        if self.mode == "loop" or self._vmap_failed:
            return looped()
        try:
            return vmapped()
        except Exception as exc:  # vmap cannot trace some modules; the loop is exact
            if self.mode == "vmap" or isinstance(exc, InfkitError):
                raise
            self._vmap_failed = True
            warnings.warn(
                f"torch.func.vmap could not trace the model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); falling back to an exact per-example loop, "
                "which is slower",
                RuntimeWarning,
                stacklevel=3,
            )
            return looped()

    # ------------------------------------------------------------------ forward quantities
    @torch.no_grad()
    def outputs(self, batch: Batch) -> Tensor:
        """Model outputs [B, ...] at the current parameters."""
        inputs, _ = self.prepare(batch)
        with evaluation_mode(self.task.model):
            return self._call(self.space.params(), inputs)

    @torch.no_grad()
    def losses(self, batch: Batch) -> Tensor:
        """Per-example losses l_i [B]."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self._call(self.space.params(), inputs)
            return self.task.checked_loss(out, targets)

    @torch.no_grad()
    def measurements(self, batch: Batch) -> Tensor:
        """Per-example measurements m_i [B]."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self._call(self.space.params(), inputs)
            return self.task.checked_measurement(out, targets)

    @torch.no_grad()
    def output_derivatives(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened outputs f [B, C], g = dl/df [B, C] and Lambda = d^2 l/df^2 [B, C, C]."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self._call(self.space.params(), inputs)
        b = out.shape[0]
        shape = out.shape[1:]
        flat = out.reshape(b, -1)
        with torch.enable_grad():
            f = flat.detach().requires_grad_(True)
            loss = self.task.checked_loss(f.reshape(b, *shape), targets).sum()
            (g,) = torch.autograd.grad(loss, f)
        lam = self.task.lambda_blocks(out, targets)
        _check_finite(g, batch, "output-space loss gradient")
        return flat, g, lam

    # ------------------------------------------------------------------ parameter gradients
    def _scalar_fn(self, which: str) -> Callable[[Tensor, Any], Tensor]:
        return self.task.checked_loss if which == "loss" else self.task.checked_measurement

    def grads(self, batch: Batch, which: str = "loss") -> Tensor:
        """Per-example parameter gradients [B, P] of the loss (or the measurement)."""
        inputs, targets = self.prepare(batch)
        fn = self._scalar_fn(which)
        params = self.space.params()

        def single(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
            return fn(self._call(p, _unsqueeze(x)), _unsqueeze(y))[0]

        def vmapped() -> Tensor:
            dims = (None, 0, None if targets is None else 0)
            g = vmap(grad(single), in_dims=dims)(params, inputs, targets)
            return self.space.flatten(g, batch_dims=1)

        def looped() -> Tensor:
            rows = []
            for i in range(len(batch)):
                p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
                with torch.enable_grad():
                    value = fn(self._call(p, _one(inputs, i)), _one(targets, i))[0]
                    gs = torch.autograd.grad(value, list(p.values()), allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            (gi if gi is not None else torch.zeros_like(t)).reshape(-1)
                            for gi, t in zip(gs, p.values())
                        ]
                    )
                )
            return torch.stack(rows)

        with evaluation_mode(self.task.model):
            G = self._run(vmapped, looped).detach()
        _check_finite(G, batch, f"{'loss' if which == 'loss' else 'measurement'} gradient")
        return G

    def jacobians(self, batch: Batch) -> Tensor:
        """Per-example output Jacobians J_i [B, C, P] (outputs flattened to C entries)."""
        inputs, _ = self.prepare(batch)
        params = self.space.params()

        def single(p: dict[str, Tensor], x: Any) -> Tensor:
            return self._call(p, _unsqueeze(x)).reshape(-1)

        def vmapped() -> Tensor:
            jac = vmap(jacrev(single), in_dims=(None, 0))(params, inputs)
            return self.space.flatten(jac, batch_dims=2)

        def looped() -> Tensor:
            blocks = []
            for i in range(len(batch)):
                p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
                with torch.enable_grad():
                    out = self._call(p, _one(inputs, i)).reshape(-1)
                    rows = []
                    for c in range(out.shape[0]):
                        gs = torch.autograd.grad(
                            out[c], list(p.values()), retain_graph=True, allow_unused=True
                        )
                        rows.append(
                            torch.cat(
                                [
                                    (gi if gi is not None else torch.zeros_like(t)).reshape(-1)
                                    for gi, t in zip(gs, p.values())
                                ]
                            )
                        )
                blocks.append(torch.stack(rows))
            return torch.stack(blocks)

        with evaluation_mode(self.task.model):
            J = self._run(vmapped, looped).detach()
        _check_finite(J, batch, "output Jacobian")
        return J

    def hessian_sum(self, batch: Batch) -> Tensor:
        """sum_{i in batch} d^2 l_i / d theta^2 as a dense [P, P] matrix (the true Hessian)."""
        inputs, targets = self.prepare(batch)
        flat0 = self.space.flat()

        def total(flat: Tensor) -> Tensor:
            out = self._call(self.space.unflatten(flat), inputs)
            return self.task.checked_loss(out, targets).sum()

        def vmapped() -> Tensor:
            return torch.func.hessian(total)(flat0)

        def looped() -> Tensor:
            x = flat0.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(total(x), x, create_graph=True)
                rows = [torch.autograd.grad(g[k], x, retain_graph=True)[0] for k in range(len(g))]
            return torch.stack(rows)

        with evaluation_mode(self.task.model):
            H = self._run(vmapped, looped).detach()
        if not torch.isfinite(H).all():
            raise NonFiniteError(
                f"the loss Hessian of the batch of examples {_span(batch)} contains NaN or Inf"
            )
        return 0.5 * (H + H.T)

    def input_gradients(self, batch: Batch, directions: Tensor) -> Tensor:
        """d/dx_j <u_t, grad_theta l_j(x_j)> for every example j of the batch and row u_t.

        Returns [B, T, *x_shape] for ``directions`` u of shape [T, P]. This is the mixed second
        derivative Koh & Liang's input-perturbation influence needs (methods.md §3.1).
        """
        inputs, targets = self.prepare(batch)
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise UnsupportedError(
                "input influence needs continuous (floating-point tensor) inputs; token ids and "
                "dict inputs have no gradient with respect to the input"
            )
        params = self.space.params()
        U = self.space.unflatten(directions.to(self.space.dtype))

        def directional(x: Tensor, y: Any, u: dict[str, Tensor]) -> Tensor:
            def loss_of(p: dict[str, Tensor]) -> Tensor:
                return self.task.checked_loss(self._call(p, x.unsqueeze(0)), _unsqueeze(y))[0]

            g = grad(loss_of)(params)
            return sum((g[n] * u[n]).sum() for n in g)

        def per_example(x: Tensor, y: Any) -> Tensor:
            return vmap(grad(directional), in_dims=(None, None, 0))(x, y, U)

        def vmapped() -> Tensor:
            dims = (0, None if targets is None else 0)
            return vmap(per_example, in_dims=dims)(inputs, targets)

        def looped() -> Tensor:
            out = []
            for i in range(len(batch)):
                rows = []
                for t in range(directions.shape[0]):
                    x = inputs[i : i + 1].clone().requires_grad_(True)
                    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
                    with torch.enable_grad():
                        loss = self.task.checked_loss(self._call(p, x), _one(targets, i))[0]
                        gs = torch.autograd.grad(loss, list(p.values()), create_graph=True)
                        dot = sum((gi * U[n][t]).sum() for gi, n in zip(gs, p))
                        (gx,) = torch.autograd.grad(dot, x)
                    rows.append(gx[0])
                out.append(torch.stack(rows))
            return torch.stack(out)

        with evaluation_mode(self.task.model):
            return self._run(vmapped, looped).detach()


def _span(batch: Batch) -> str:
    return f"{int(batch.indices[0])}..{int(batch.indices[-1])}"


def _check_finite(values: Tensor, batch: Batch, what: str) -> None:
    flat = values.reshape(values.shape[0], -1)
    if bool(torch.isfinite(flat.sum(dim=1)).all()):  # NaN/Inf propagate through sums: fast path
        return
    bad = ~torch.isfinite(flat).all(dim=1)  # a row sum overflowed, or a row is not finite
    if bad.any():
        i = int(batch.indices[bad.nonzero()[0, 0]])
        raise NonFiniteError(
            f"the {what} of example {i} contains NaN or Inf; check that example's inputs and "
            "label, and that the model's outputs are finite on it"
        )


def directional_derivatives(
    engine: PerExample, batch: Batch, direction: Tensor, which: str
) -> Tensor:
    """First-order change of the outputs [B, C] or the per-example loss / measurement [B].

    ``which`` is ``"outputs"``, ``"loss"`` or ``"measurement"``; the change is
    ``d/dt q(theta + t * direction)`` at t = 0, one forward-mode pass (falling back to J @ d).
    """
    inputs, targets = engine.prepare(batch)
    params = engine.space.params()
    tangent = engine.space.unflatten(direction.to(engine.space.dtype))

    def quantity(p: dict[str, Tensor]) -> Tensor:
        out = engine._call(p, inputs)
        if which == "outputs":
            return out.reshape(out.shape[0], -1)
        if which == "loss":
            return engine.task.checked_loss(out, targets)
        return engine.task.checked_measurement(out, targets)

    def forward_mode() -> Tensor:
        return torch.func.jvp(quantity, (params,), (tangent,))[1]

    def reverse_mode() -> Tensor:
        if which == "outputs":
            return engine.jacobians(batch) @ direction.to(engine.space.dtype)
        return engine.grads(batch, which) @ direction.to(engine.space.dtype)

    with evaluation_mode(engine.task.model):
        return engine._run(forward_mode, reverse_mode).detach()
