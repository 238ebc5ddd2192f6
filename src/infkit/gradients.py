"""The per-example engine: gradients, Jacobians, tangent products and output-space quantities.

:class:`PerExample` is the one engine for per-example quantities and tangent products; the
curvature products, the NTK, the estimators and every method build on it (training takes plain
full-batch gradients, and the Kronecker methods hook layers for their factors). Everything is computed
with torch.func (``vmap`` over ``grad`` / ``jacrev``, ``jvp``, ``vjp``) one batch at a time, in a
working dtype (the model's by default; float64 for the dual method's kernel algebra), without
modifying the model. Modules that ``vmap`` cannot trace (data-dependent control flow,
``.item()``, in-place updates of batched tensors) fall back, with one warning, to an exact
per-example loop over plain autograd.

Two evaluation points (docs/conventions.md §1):

* the trained parameters theta* (always the model's current parameters): outputs, losses,
  measurements, their gradients, g = dl/df, Lambda = d^2 l/df^2;
* the *tangent point*, where the output Jacobian J is taken: theta* by default, a given expansion
  point ``at`` (the dual method's linearised setting), or, for a model made by
  :func:`infkit.linearize`, the wrapped network at its expansion point (the same Jacobian at
  every theta, computed on the network directly). Per-example Jacobians, ``J w`` and ``J^T u``
  are taken there.

Notation: for example i with output f_i in R^C and per-example loss l_i, ``grad l_i`` is the
parameter gradient in R^P, ``J_i`` in R^{C x P} the output Jacobian, ``g_i = dl_i/df`` in R^C and
``Lambda_i = d^2 l_i/df^2`` in R^{C x C}.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

from infkit.autodiff import (
    Pushforward,
    padding_rows_constant,
    quiet_forward_mode,
    refuse_untransformable,
    transforms_only,
    untransformable_function,
    untransformable_refused,
)
from infkit.data import Batch, map_tensors
from infkit.errors import (
    InfkitError,
    InvalidInputError,
    NonFiniteError,
    Notice,
    UnsupportedError,
    warn,
)
from infkit.linearize import LinearizedModel
from infkit.parameters import ParameterSpace, evaluation_mode
from infkit.task import Task, at_least_float32, pick_outputs

#: how per-example quantities are computed
Mode = Literal["auto", "vmap", "loop"]
MODES: tuple[Mode, ...] = ("auto", "vmap", "loop")
#: which scalar a gradient is of
Which = Literal["loss", "measurement"]
#: tangents pushed through the model at once by :meth:`PerExample.jvp` / :meth:`PerExample.vjp`
TANGENT_CHUNK = 64
#: working memory of a batch's per-example gradients (:meth:`PerExample.grads`, vmap over the
#: model), in multiples of the [B, P] gradients themselves: the vmapped backward's per-example
#: intermediates and the flattening (measured 4-5x on a causal LM of 0.5M parameters)
GRADIENT_WORK_FACTOR = 5


def gradient_row_bytes(parameters: int, itemsize: int) -> int:
    """Bytes one example's gradient takes where it is formed: :data:`GRADIENT_WORK_FACTOR` x
    [P] at ``itemsize`` bytes a number (the gradient and the vmapped backward's working memory),
    and the two float64 copies the answers make of it (the gradient, and with the regulariser's
    share)."""
    return (GRADIENT_WORK_FACTOR * itemsize + 2 * 8) * max(parameters, 1)


def gradient_rows(batch_size: int, parameters: int, itemsize: int, memory_limit: int) -> int:
    """Examples whose per-example gradients [b, P] are formed at once (:meth:`PerExample.grads`,
    vmap over the model): the run's ``batch_size``, lowered so that their
    :func:`gradient_row_bytes` take at most a quarter of ``memory_limit``; at least 1.

    The rows of a batch are independent: a smaller b changes the order of some sums and, where
    an iterative solver takes a batch's rows as its right-hand sides (the removal effects of
    ``cg``), its iterates, so those answers agree within the solver's tolerance, not bit for bit.
    """
    return max(1, min(batch_size, memory_limit // 4 // gradient_row_bytes(parameters, itemsize)))


T = TypeVar("T")

#: how PyTorch's warning begins when vmap runs an operation one example at a time
BATCHING_RULE_WARNING = (
    "There is a performance drop because we have not yet implemented the batching rule for"
)
_BATCHING_RULE_OP = re.compile(r"batching rule for ([\w.:]+)")
#: the models already told about operations without a batching rule (one notice per model)
_TOLD_ABOUT_BATCHING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class batching_rule_notice:  # noqa: N801 (used as a function: ``with batching_rule_notice(m)``)
    """Within: PyTorch's "performance drop ... batching rule" warnings become one infkit notice.

    ``torch.func.vmap`` runs an operation that has no batching rule (the fused attention
    kernels of ``attn_implementation="sdpa"``, say) one example at a time, and PyTorch warns
    about it from several places of one fit. Within this context such warnings are not shown;
    on leaving it, one :class:`~infkit.errors.Notice` per model names the operations and what
    to do (``model`` None: PyTorch's warnings are left alone). Only the display is intercepted (``warnings.showwarning``):
    filters and the once-per-location memory of warnings are left as they are, and every other
    warning is shown as before.
    """

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.operations: list[str] = []
        self._previous: Callable[..., Any] | None = None

    def _intercept(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = str(message)
        if issubclass(category, UserWarning) and text.startswith(BATCHING_RULE_WARNING):
            found = _BATCHING_RULE_OP.search(text)
            operation = found.group(1).rstrip(".") if found else "an operation"
            if operation not in self.operations:
                self.operations.append(operation)
            return
        assert self._previous is not None
        self._previous(message, category, filename, lineno, file, line)

    def __enter__(self) -> batching_rule_notice:
        if self.model is not None:  # no model, no notice: PyTorch's warnings pass unchanged
            self._previous = warnings.showwarning
            warnings.showwarning = self._intercept
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        model = self.model
        if model is None:
            return
        assert self._previous is not None
        warnings.showwarning = self._previous
        if error is not None or not self.operations:
            return
        if model in _TOLD_ABOUT_BATCHING:
            return
        _TOLD_ABOUT_BATCHING.add(model)
        operations = self.operations
        message = (
            f"torch.func.vmap has no batching rule for {', '.join(operations)}, so PyTorch runs "
            f"{'it' if len(operations) == 1 else 'them'} one example at a time inside vmap: the "
            "results are exact, only slower (this notice stands for PyTorch's 'performance "
            "drop' warnings and is shown once per model)"
        )
        if any("attention" in op for op in operations):
            message += (
                '. The fused attention of attn_implementation="sdpa" is one; a Hugging Face '
                'model loaded with attn_implementation="eager" avoids it'
            )
        warn(message, Notice)


#: the longest error text quoted in a warning before it is cut at a sentence or clause
QUOTED_ERROR_CHARS = 240


def error_summary(error: BaseException, limit: int = QUOTED_ERROR_CHARS) -> str:
    """``Type: text`` of an error, its text cut to whole sentences (or clauses) of its first line.

    PyTorch's errors run to several sentences ("vmap: It looks like you're either (1) calling
    .item() ... For (1): ..."); a warning quotes the whole sentences that fit in ``limit``
    characters or, when the first sentence alone is longer, its whole clauses (else words) that
    fit, followed by " ...": never a word cut in two.
    """
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    name = type(error).__name__
    if len(text) <= limit:
        return f"{name}: {text}" if text else name
    head = text[: limit + 1]
    sentence = max(head.rfind(end) for end in (". ", "? ", "! "))
    if sentence > limit // 3:  # whole sentences, their full stop kept
        return f"{name}: {head[: sentence + 1]}"
    for boundaries in (("; ", ": ", ", "), (" ",)):  # else whole clauses, else whole words
        cut = max(head.rfind(b) for b in boundaries)
        if cut > limit // 3:
            return f"{name}: {head[:cut].rstrip()} ..."
    return f"{name}: {head[:limit].rstrip()} ..."


def transformable_call(
    module: nn.Module, state: dict[str, Tensor], args: Any, kwargs: dict[str, Any]
) -> Any:
    """``torch.func.functional_call``, where a forward pass that calls autograd itself (which no
    ``torch.func`` transform runs) is refused by name, not by PyTorch's raw error."""
    try:
        return functional_call(module, state, args, kwargs)
    except RuntimeError as error:
        if "mutate a captured Tensor" in str(error):  # (a tester's got PyTorch's own words)
            raise InvalidInputError(
                "the model's forward pass writes into a tensor of its own in place (a buffer "
                "it updates: a call counter, a running scale or statistic), which torch.func's "
                "per-example gradients cannot run, and which would make each pass see another "
                "model. Keep such state out of the forward pass in evaluation mode (update it "
                "only while self.training), or out of the model. The error: "
                f"{error_summary(error)}"
            ) from error
        if "being transformed by a functorch transform" not in str(error):
            raise
        raise InvalidInputError(
            "the model's forward pass calls requires_grad_() or torch.autograd itself (a hook: "
            "Hugging Face's gradient_checkpointing_enable() registers one on the input "
            "embeddings), which torch.func's per-example gradients cannot run: call "
            "model.gradient_checkpointing_disable() (where it was enabled, also "
            "model.disable_input_require_grads()) before infkit's passes, or remove the hook. "
            f"The error: {error_summary(error)}"
        ) from error


#: the models vmap could not batch (:meth:`PerExample._run`), which take the loop from then on
_LOOPED_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def vmap_fallback_message(error: BaseException) -> str:
    """The warning given when vmap cannot trace a model and the exact loop takes over."""
    function = untransformable_function(error)
    if function is not None:
        return (
            f"the model calls {function}, which defines no setup_context, so torch.func's "
            "transforms cannot take it: per-example quantities by ordinary backward passes, "
            "one example at a time (the same results, slower), and what needs the transforms "
            "themselves is refused by name"
        )
    summary = error_summary(error)
    if not summary.endswith((".", "?", "!")):
        summary += "."
    return (
        "torch.func.vmap could not batch the model over examples; falling back to an exact "
        "per-example loop (the same results, one example at a time, slower). The error: "
        f'{summary} Hugging Face models with attn_implementation="sdpa" (their '
        "default) typically refuse vmap, as their attention code branches on the data; loaded "
        'with attn_implementation="eager" they usually batch. Influence(..., '
        'per_example="loop") takes the loop from the start, without trying vmap and without '
        'this warning (in an infkit run config: [influence] options = { per_example = "loop" })'
    )


def _one(obj: Any, i: int) -> Any:
    return map_tensors(obj, lambda t: t[i : i + 1])


def unsqueeze_example(obj: Any) -> Any:
    """One example's inputs or targets with a batch dimension of 1 added (nested structures)."""
    return map_tensors(obj, lambda t: t.unsqueeze(0))


def _flat_rows(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, like)]
    )


class PerExample:
    """Per-example quantities of a task, at the trained parameters and at the tangent point.

    Args:
        task: the task.
        space: the parameter space of ``task.model``.
        mode: ``"auto"`` (vmap, falling back to an exact loop on failure), ``"vmap"`` or
            ``"loop"``.
        at: the tangent point (where J is taken): None for the model's current parameters, or a
            flat [P] tensor / a dict by parameter name.
        dtype: the working dtype (default: the model's). Parameters, buffers and floating-point
            inputs and targets are cast; the model itself is never modified.
    """

    def __init__(
        self,
        task: Task,
        space: ParameterSpace,
        mode: str = "auto",
        *,
        at: Tensor | Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if mode not in MODES:
            raise UnsupportedError(f"unknown per-example mode {mode!r}; use one of {MODES}")
        self.task = task
        self.space = space
        self.mode = mode
        self.dtype: torch.dtype = dtype or space.dtype
        self.device = space.device
        #: whether the state (buffers, frozen parameters) and targets are recast to a working
        #: dtype other than the model's; the model's own engine leaves them as they are
        self._recast = self.dtype != space.dtype
        self._vmap_failed = False
        #: the precision the backpropagated passes run in: the task's autocast one, else this
        #: engine's dtype (error messages name float16's range)
        self.precision: torch.dtype = task.autocast or self.dtype
        model = task.model
        # The tangent side: the module, its parameter names and point, and its output function.
        self._fixed_point: dict[str, Tensor] | None
        self._tangent_consts: dict[str, Tensor] | None
        self.tangent_module: nn.Module
        if isinstance(model, LinearizedModel):
            self.tangent_module = model.base
            self.tangent_names: list[str] = list(model.base_names)
            self._tangent_output_fn: Callable[[Any], Tensor] = model.output_fn
            self._fixed_point = self._cast_all(model.params0())
            self._tangent_consts = {
                n: self._cast_state(t.detach()) for n, t in model.base_constants().items()
            }
        else:
            self.tangent_module = model
            self.tangent_names = list(space.names)
            self._tangent_output_fn = task.output_fn
            self._fixed_point = None if at is None else self._cast_all(self._point(at))
            self._tangent_consts = None
        #: forward-mode products, or their reverse-mode stand-in where an operation refuses it
        self.pushforward = Pushforward(self.tangent_module)
        sizes = [
            int(torch.Size(self.tangent_params()[n].shape).numel()) for n in self.tangent_names
        ]
        if sum(sizes) != space.size:
            raise InvalidInputError(
                "the tangent point does not match the model's trainable parameters "
                f"({sum(sizes)} values for P = {space.size})"
            )

    # ------------------------------------------------------------------ plumbing
    def _cast(self, t: Tensor) -> Tensor:
        """On the model's device; floating point in the working dtype (inputs, parameters)."""
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _cast_state(self, t: Tensor) -> Tensor:
        """Buffers, frozen parameters and targets: recast only for another working dtype."""
        t = t.to(self.device)
        return t.to(self.dtype) if self._recast and t.is_floating_point() else t

    def _cast_all(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self._cast(t.detach()) for n, t in tensors.items()}

    def _point(self, at: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        space = self.space
        if isinstance(at, Tensor):
            return space.unflatten(at.reshape(-1).to(space.device))
        missing = [n for n in space.names if n not in at]
        if missing:
            raise InvalidInputError(
                f"the expansion point has no value for the trainable parameter(s) {missing[:5]}; "
                "pass a flat [P] tensor or a dict by parameter name"
            )
        return {n: at[n] for n in space.names}

    def prepare(self, batch: Batch) -> tuple[Any, Any]:
        """Inputs and targets on the model's device; floating-point inputs in the working dtype.

        Targets keep their dtype unless the engine works in a dtype other than the model's.
        Inputs the task's ``check_inputs`` refuses (token ids outside a language model's
        vocabulary) raise InvalidInputError naming the set and the example, before the model
        sees them.
        """
        found = self.task.input_problem(batch.inputs)
        if found is not None:
            k, message = found
            raise InvalidInputError(f"{batch.source} {batch.example(k)}: {message}")
        return map_tensors(batch.inputs, self._cast), map_tensors(batch.targets, self._cast_state)

    def params(self) -> dict[str, Tensor]:
        """theta* (the model's current trainable parameters) in the working dtype, detached."""
        return self._cast_all(self.space.params())

    def constants(self) -> dict[str, Tensor]:
        """Frozen parameters and buffers (in the working dtype when it is not the model's)."""
        return {n: self._cast_state(t.detach()) for n, t in self.space.constants().items()}

    def call(self, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        """The task's model outputs [B, ...] with the trainable parameters replaced by ``params``."""
        state = {**params, **self.constants()}
        model = self.task.model

        def fn(*args: Any, **kwargs: Any) -> Any:
            return transformable_call(model, state, args, kwargs)

        return self.task.call_model(fn, inputs)

    def tangent_params(self) -> dict[str, Tensor]:
        """The tangent point by tangent-parameter name, in the working dtype."""
        if self._fixed_point is not None:
            return self._fixed_point
        return self.params()

    def tangent_call(self, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        """Flattened outputs [B, C] of the tangent module with its parameters set to ``params``."""
        consts = self._tangent_consts if self._tangent_consts is not None else self.constants()
        state = {**params, **consts}
        module = self.tangent_module

        def fn(*args: Any, **kwargs: Any) -> Any:
            return transformable_call(module, state, args, kwargs)

        raw = fn(**inputs) if isinstance(inputs, dict) else fn(inputs)
        out = at_least_float32(pick_outputs(self._tangent_output_fn, raw))
        return out.reshape(out.shape[0], -1)

    def flatten_tangent(self, tensors: Mapping[str, Tensor], batch_dims: int) -> Tensor:
        """Tangent-parameter-shaped tensors (``batch_dims`` leading dims) as [..., P]."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.tangent_names]
        return torch.cat(parts, dim=-1)

    def unflatten_tangent(self, vectors: Tensor) -> dict[str, Tensor]:
        """[..., P] as tangent-parameter-shaped views."""
        point = self.tangent_params()
        out, start = {}, 0
        lead = vectors.shape[:-1]
        for n in self.tangent_names:
            shape = point[n].shape
            k = int(torch.Size(shape).numel())
            out[n] = vectors[..., start : start + k].reshape((*lead, *shape))
            start += k
        return out

    def run(self, vmapped: Callable[[], T], looped: Callable[[], T]) -> T:
        """``vmapped()``, or the exact ``looped()`` when vmap cannot trace the model.

        The loop is remembered (with one warning) only when it succeeds where vmap failed: an
        error both raise (bad labels, say) is the loop's, and the next call tries vmap again.
        PyTorch's warnings about operations without a batching rule become one notice
        (:func:`batching_rule_notice`). A custom autograd.Function that no ``torch.func``
        transform takes, where the loop needs one too, is refused by name
        (:func:`~infkit.autodiff.refuse_untransformable`).
        """
        try:
            return self._run(vmapped, looped)
        except RuntimeError as error:
            function = untransformable_function(error)
            if function is not None and self.mode == "vmap":
                raise UnsupportedError(
                    f"per_example='vmap' asks for torch.func's vmap, which cannot take "
                    f"{function} (it defines no setup_context): pass per_example='auto' (the "
                    "default) or 'loop' for per-example quantities by backward passes"
                ) from error
            refuse_untransformable(error)
            raise

    def _run(self, vmapped: Callable[[], T], looped: Callable[[], T]) -> T:
        with batching_rule_notice(self.task.model):
            model = self.task.model
            looped_before = self.mode != "vmap" and model in _LOOPED_MODELS  # vmap if asked
            if self.mode == "loop" or self._vmap_failed or looped_before:
                return looped()
            try:
                with transforms_only():
                    return vmapped()
            except Exception as exc:  # vmap cannot trace some modules; the loop is exact
                if self.mode == "vmap" or isinstance(exc, InfkitError):
                    raise
                result = looped()
                self._vmap_failed = True
                # once a model (not at every fit, retraining or load): its later engines take
                # the loop at once, without another vmap attempt
                _LOOPED_MODELS.add(model)
                warn(vmap_fallback_message(exc), RuntimeWarning)
                return result

    # ------------------------------------------------------------------ forward quantities
    @torch.no_grad()
    def outputs(self, batch: Batch) -> Tensor:
        """Model outputs [B, ...] at theta*."""
        inputs, _ = self.prepare(batch)
        with evaluation_mode(self.task.model):
            return self.call(self.params(), inputs)

    @torch.no_grad()
    def losses(self, batch: Batch) -> Tensor:
        """Per-example losses l_i [B] at theta*."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            return self.task.checked_loss(self.call(self.params(), inputs), targets)

    @torch.no_grad()
    def measurements(self, batch: Batch) -> Tensor:
        """Per-example measurements m_i [B] at theta*."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            return self.task.checked_measurement(self.call(self.params(), inputs), targets)

    def _scalar_fn(self, which: str) -> Callable[[Tensor, Any], Tensor]:
        return self.task.checked_loss if which == "loss" else self.task.checked_measurement

    @torch.no_grad()
    def output_gradients(self, batch: Batch, which: Which = "loss") -> Tensor:
        """g = dl/df (``"loss"``) or h = dm/df (``"measurement"``) at theta*, [B, C]."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self.call(self.params(), inputs)
        return self._output_gradient(out, targets, which, batch)

    def _output_gradient(self, out: Tensor, targets: Any, which: str, batch: Batch) -> Tensor:
        b, shape = out.shape[0], out.shape[1:]
        with torch.enable_grad():
            f = out.reshape(b, -1).detach().requires_grad_(True)
            value = self._scalar_fn(which)(f.reshape(b, *shape), targets).sum()
            # a value that does not depend on the outputs (a detached measurement) has g = 0
            (g,) = torch.autograd.grad(value, f) if value.requires_grad else (torch.zeros_like(f),)
        check_finite_rows(g, batch, f"output-space {which} gradient", self.precision)
        return g.detach()

    @torch.no_grad()
    def output_derivatives(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened outputs f [B, C], g = dl/df [B, C] and Lambda = d^2 l/df^2 [B, C, C]."""
        inputs, targets = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self.call(self.params(), inputs)
        g = self._output_gradient(out, targets, "loss", batch)
        lam = self.task.lambda_blocks(out, targets)
        return out.reshape(out.shape[0], -1), g, lam

    # ------------------------------------------------------------------ parameter gradients
    def grads(self, batch: Batch, which: Which = "loss") -> Tensor:
        """Per-example parameter gradients [B, P] of the loss (or the measurement) at theta*."""
        inputs, targets = self.prepare(batch)
        fn = self._scalar_fn(which)
        params = self.params()

        def single(p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
            return fn(self.call(p, unsqueeze_example(x)), unsqueeze_example(y))[0]

        def vmapped() -> Tensor:
            dims = (None, 0, None if targets is None else 0)
            g = vmap(grad(single), in_dims=dims)(params, inputs, targets)
            return self.space.flatten(g, batch_dims=1)

        def looped() -> Tensor:
            rows = []
            for i in range(len(batch)):
                p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
                with torch.enable_grad():
                    value = fn(self.call(p, _one(inputs, i)), _one(targets, i))[0]
                    gs = torch.autograd.grad(value, list(p.values()), allow_unused=True)
                rows.append(_flat_rows(gs, list(p.values())))
            return torch.stack(rows)

        with evaluation_mode(self.task.model), self.task.mixed_precision():
            G = self.run(vmapped, looped).detach()
        check_finite_rows(G, batch, f"{which} gradient", self.precision)
        return G

    def hessian_sum(self, batch: Batch) -> Tensor:
        """sum_{i in batch} d^2 l_i / d theta^2 as a dense [P, P] matrix (the true Hessian)."""
        inputs, targets = self.prepare(batch)
        flat0 = self.space.flatten(self.params())

        def total(flat: Tensor) -> Tensor:
            out = self.call(self.space.unflatten(flat), inputs)
            return self.task.checked_loss(out, targets).sum()

        def vmapped() -> Tensor:
            # forward over grad, not torch.func.hessian (forward over jacrev): nested in jacrev's
            # vmap, layer_norm's double backward is wrong in torch 2.13 (0.2 off on a 4-wide
            # LayerNorm with a weight, and not symmetric), where jacfwd(grad) is exact; an
            # embedding's padding row held constant as the backward passes hold it (the Hessian
            # products' reverse-over-reverse; a reviewer's: 16% apart without it)
            with padding_rows_constant(self.task.model), quiet_forward_mode():
                return torch.func.jacfwd(grad(total))(flat0)

        def looped() -> Tensor:
            x = flat0.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(total(x), x, create_graph=True)
                rows = [torch.autograd.grad(g[k], x, retain_graph=True)[0] for k in range(len(g))]
            return torch.stack(rows)

        with evaluation_mode(self.task.model):
            H = self.run(vmapped, looped).detach()
        if not torch.isfinite(H).all():
            raise NonFiniteError(
                f"the loss Hessian of the batch of examples {_span(batch)} contains NaN or Inf"
            )
        return 0.5 * (H + H.T)

    def input_gradients(self, batch: Batch, directions: Tensor) -> Tensor:
        """d/dx_j <u_t, grad_theta l_j(x_j)> for every example j of the batch and row u_t.

        Returns [B, T, *x_shape] for ``directions`` u of shape [T, P]. This is the mixed second
        derivative of Koh & Liang's input-perturbation influence (docs/estimators.md).
        """
        inputs, targets = self.prepare(batch)
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            # (a dict of float tensors has a gradient, which the message denied: a tester's)
            if isinstance(inputs, dict):
                given = "a dict of inputs, which it does not take (give the model one tensor)"
            elif isinstance(inputs, Tensor):
                given = f"{inputs.dtype} (token ids), which have no gradient with respect to them"
            else:
                given = f"a {type(inputs).__name__}"
            raise UnsupportedError(
                "input influence needs one continuous (floating-point) tensor as each example's "
                f"input; these are {given}"
            )
        params = self.params()
        U = self.space.unflatten(directions.to(self.dtype))

        def directional(x: Tensor, y: Any, u: dict[str, Tensor]) -> Tensor:
            def loss_of(p: dict[str, Tensor]) -> Tensor:
                out = self.call(p, x.unsqueeze(0))
                return self.task.checked_loss(out, unsqueeze_example(y))[0]

            g = grad(loss_of)(params)
            return torch.stack([(g[n] * u[n]).sum() for n in g]).sum()

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
                        loss = self.task.checked_loss(self.call(p, x), _one(targets, i))[0]
                        gs = torch.autograd.grad(
                            loss, list(p.values()), create_graph=True, allow_unused=True
                        )
                        dot = sum(
                            ((gi * U[n][t]).sum() for gi, n in zip(gs, p) if gi is not None),
                            x.new_zeros(()),
                        )
                        (gx,) = torch.autograd.grad(dot, x, allow_unused=True)
                        if gx is None:  # no parameter's gradient depends on the input
                            gx = torch.zeros_like(x)
                    rows.append(gx[0])
                out.append(torch.stack(rows))
            return torch.stack(out)

        with evaluation_mode(self.task.model):
            return self.run(vmapped, looped).detach()

    # ------------------------------------------------------------------ the tangent map
    def jacobians(self, batch: Batch, names: list[str] | None = None) -> Tensor:
        """Per-example output Jacobians J_i [B, C, P] at the tangent point.

        With ``names``, the Jacobian with respect to those tangent parameters only (their
        columns, in tangent order).
        """
        inputs, _ = self.prepare(batch)
        point = self.tangent_params()
        names = self.tangent_names if names is None else names
        sub = {n: point[n] for n in names}
        fixed = {n: t for n, t in point.items() if n not in sub}

        def single(p: dict[str, Tensor], x: Any) -> Tensor:
            return self.tangent_call({**fixed, **p}, unsqueeze_example(x)).reshape(-1)

        def vmapped() -> dict[str, Tensor]:
            return vmap(jacrev(single), in_dims=(None, 0))(sub, inputs)

        def looped() -> dict[str, Tensor]:
            rows = [
                jacrev(single)(sub, map_tensors(inputs, lambda t, i=i: t[i]))
                for i in range(len(batch))
            ]
            return {n: torch.stack([r[n] for r in rows]) for n in names}

        with evaluation_mode(self.task.model), evaluation_mode(self.tangent_module):
            jac = self.run(vmapped, looped)
        J = torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in names], dim=-1).detach()
        check_finite_rows(J, batch, "output Jacobian", self.precision)
        return J

    def jvp(self, batch: Batch, directions: Tensor) -> Tensor:
        """J w at the tangent point: [B, C] for w [P], or [k, B, C] for w [k, P]."""
        inputs, _ = self.prepare(batch)
        W = directions.to(self.device, self.dtype)
        single = W.dim() == 1
        W = W.reshape(-1, self.space.size)
        point = self.tangent_params()

        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            return self.tangent_call(p, inputs)

        with (
            evaluation_mode(self.task.model),
            evaluation_mode(self.tangent_module),
            batching_rule_notice(self.task.model),
        ):
            parts = []
            for start in range(0, W.shape[0], TANGENT_CHUNK):
                chunk = self.unflatten_tangent(W[start : start + TANGENT_CHUNK])
                parts.append(self.pushforward(outputs_of, point, chunk))
            out = torch.cat(parts).detach()
        return out[0] if single else out

    def vjp(self, batch: Batch, cotangents: Tensor) -> Tensor:
        """J^T u at the tangent point: [P] for u [B, C], or [k, P] for u [k, B, C]."""
        inputs, _ = self.prepare(batch)
        U = cotangents.to(self.device, self.dtype)
        single = U.dim() == 2
        U = U.reshape(-1, *U.shape[-2:])
        with (
            untransformable_refused(),
            transforms_only(),
            evaluation_mode(self.task.model),
            evaluation_mode(self.tangent_module),
            batching_rule_notice(self.task.model),
        ):
            pull = vjp(lambda p: self.tangent_call(p, inputs), self.tangent_params())[1]
            parts = []
            for start in range(0, U.shape[0], TANGENT_CHUNK):
                chunk = U[start : start + TANGENT_CHUNK]
                if chunk.shape[0] == 1:
                    parts.append(self.flatten_tangent(pull(chunk[0])[0], 0).unsqueeze(0))
                else:
                    parts.append(self.flatten_tangent(vmap(pull)(chunk)[0], 1))
            out = torch.cat(parts).detach()
        return out[0] if single else out


def _span(batch: Batch) -> str:
    return f"{int(batch.indices[0])}..{int(batch.indices[-1])}"


def check_finite_rows(
    values: Tensor, batch: Batch, what: str, precision: torch.dtype | None = None
) -> None:
    """Raise NonFiniteError naming the first example of ``batch`` whose row of ``values``
    ([B, ...]) has a NaN or Inf, with a hint where that example is padded, and one on float16's
    range when the passes ran in ``precision`` float16."""
    flat = values.reshape(values.shape[0], -1)
    if bool(torch.isfinite(flat.sum(dim=1)).all()):  # NaN/Inf propagate through sums: fast path
        return
    bad = ~torch.isfinite(flat).all(dim=1)  # a row sum overflowed, or a row is not finite
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"the {what} of {batch.example(row)} of the {batch.source} contains "
            "NaN or Inf; check that example's inputs and label, and that the model's outputs "
            f"are finite on it{_padding_hint(batch, row)}{_range_hint(precision)}"
        )


def _range_hint(precision: torch.dtype | None) -> str:
    """Why values computed in float16 may not be finite on inputs that are."""
    if precision != torch.float16:
        return ""
    return (
        ". The passes ran in float16, whose largest number is 65504: an output, activation or "
        "gradient beyond it is Inf. Run the model in float32, or in bfloat16 (float32's range)"
    )


def _padding_hint(batch: Batch, row: int) -> str:
    """Why a padded sequence's outputs may not be finite, when row ``row`` has padding."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    if not isinstance(mask, Tensor) or mask.dim() < 2 or not bool((mask[row] == 0).any()):
        return ""
    cause = (
        ". Its attention_mask masks positions, and some attention implementations give NaN at "
        "a fully masked row, which then spreads to every position"
    )
    real = (mask[row].reshape(-1) != 0).long()
    if bool(real[0] == 0):  # left padding
        return (
            f"{cause} (Hugging Face's eager attention in float64 with left padding does): pad "
            "on the right, load the model with attn_implementation='sdpa', or run it in float32"
        )
    if bool((real.diff() <= 0).all()):  # right padding only: real tokens, then padding
        return (
            f"{cause} (Hugging Face's eager attention in float64 does where a sliding window, "
            "Mistral's or Gemma2's, is shorter than the padding: a padded position then has "
            "nothing to attend to): run the model in float32, or load it with "
            "attn_implementation='sdpa' where the model offers it"
        )
    return (
        f"{cause} (Hugging Face's eager attention in float64 does): load the model with "
        "attn_implementation='sdpa', or run it in float32"
    )


def directional_derivatives(
    engine: PerExample, batch: Batch, direction: Tensor, which: str
) -> Tensor:
    """First-order change of the outputs [B, C] or the per-example loss / measurement [B].

    ``which`` is ``"outputs"``, ``"loss"`` or ``"measurement"``; the change is
    ``d/dt q(theta + t * direction)`` at t = 0, one forward-mode pass (two reverse passes where
    an operation refuses forward mode, :class:`infkit.autodiff.Pushforward`).
    """
    inputs, targets = engine.prepare(batch)
    params = engine.params()
    tangent = engine.space.unflatten(direction.to(engine.dtype))

    def quantity(p: dict[str, Tensor]) -> Tensor:
        out = engine.call(p, inputs)
        if which == "outputs":
            return out.reshape(out.shape[0], -1)
        if which == "loss":
            return engine.task.checked_loss(out, targets)
        return engine.task.checked_measurement(out, targets)

    with evaluation_mode(engine.task.model), batching_rule_notice(engine.task.model):
        # (the function's own derivative, an embedding's padding row included: a removal's
        # change of the outputs is that of the model it predicts, inf.remove(...).model())
        return engine.pushforward(quantity, params, tangent, batched=False, paired=False).detach()
