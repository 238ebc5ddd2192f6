"""Jacobian- and Hessian-vector products that survive kernels without higher derivatives.

``torch.func.jvp`` (forward mode) is the cheap way to push tangents through a model, but some
fused kernels have neither a forward derivative nor a second derivative; PyTorch's fused CPU
attention, which Hugging Face models use by default (``attn_implementation="sdpa"``), is one.
:class:`Pushforward` tries forward mode; when an operation refuses it, it reruns with
``scaled_dot_product_attention`` restricted to its composite "math" implementation (exactly the
same function, differentiable to any order); when forward mode is still refused, it computes
``J v`` by two reverse passes (``J v`` is the derivative of the linear map ``u -> J^T u``).
``H v`` is always reverse-over-reverse (the Hessian is symmetric). The mode that worked is
remembered, so a model pays a refusal once.

An embedding's padding row (``nn.Embedding(padding_idx=k)``) is a constant of the lookup to
PyTorch's backward pass (its gradient there is zero) but not to its forward mode, so ``J v`` by
``jvp`` and ``J^T u`` by ``vjp`` were not transposes of each other whenever ``v`` had a padding
row (``l2 theta``, or a tied output head's gradient): :func:`padding_rows_constant` makes the
forward mode read the row as the backward pass does where the two are paired (curvature
products, kernels); a directional derivative of the model's function keeps the function's own.

A custom ``torch.autograd.Function`` written the old way (``forward(ctx, ...)``, no
``setup_context``; Bloom's GELU is one) has ordinary backward passes but no ``torch.func``
transform at all: :func:`untransformable_function` recognises PyTorch's refusal and names the
function, and :func:`refuse_untransformable` turns it into an :class:`UnsupportedError` saying
which methods differentiate it.
"""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vjp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from infkit.errors import UnsupportedError

#: the product modes, tried in this order
MODES = ("forward", "forward-math", "reverse-math")
#: PyTorch's warning when its forward mode loads its decompositions (torch.jit.script)
JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"


def forward_mode_refused(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch refusing forward-mode AD (or a derivative) for an operation."""
    text = str(error)
    return isinstance(error, (NotImplementedError, RuntimeError)) and (
        "forward AD" in text
        or "forward mode AD" in text
        or ("derivative for" in text and "is not implemented" in text)
    )


def untransformable_function(error: BaseException | None) -> str | None:
    """The name of the custom ``torch.autograd.Function`` that ``error`` says ``torch.func``
    cannot transform (one without ``setup_context``), "a custom torch.autograd.Function" when
    the traceback does not show it, or None when ``error`` is another error."""
    if not (isinstance(error, RuntimeError) and "setup_context" in str(error)):
        return None
    name = "a custom torch.autograd.Function"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        cls = frame.f_locals.get("cls") if frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            name = f"the torch.autograd.Function {cls.__module__}.{cls.__qualname__}"
    return name


def missing_derivative(error: BaseException | None) -> str | None:
    """The backward operation whose derivative PyTorch does not implement, as ``error`` names
    it in either of PyTorch's wordings (``nn.EmbeddingBag``'s ``'_embedding_bag_backward'``,
    ``aten::segment_reduce_backward``): a second derivative of the model that PyTorch cannot
    take. None for another error, and for an operation of the forward pass without a
    derivative (``'igamma: input'``), which no method differentiates."""
    if not isinstance(error, (NotImplementedError, RuntimeError)):
        return None
    found = re.search(r"derivative for (?:'([^']+)'|(aten::\S+?)) is not implemented", str(error))
    if found is None:
        return None
    operation = found.group(1) or found.group(2)
    return operation if operation.endswith("_backward") else None


def untaken(error: BaseException | None) -> str | None:
    """What of the model ``torch.func``'s curvature products cannot take, as a message says it
    (:func:`untransformable_function`, :func:`missing_derivative`), or None."""
    function = untransformable_function(error)
    if function is not None:
        return f"{function} (it defines no setup_context)"
    operation = missing_derivative(error)
    if operation is not None:
        return f"{operation!r}, whose derivative PyTorch does not implement"
    return None


def refuse_untransformable(error: BaseException) -> None:
    """Raise an :class:`UnsupportedError` from ``error`` when it is ``torch.func`` refusing a
    custom ``torch.autograd.Function`` (:func:`untransformable_function`), or PyTorch missing
    the derivative of an operation the computation differentiates (:func:`missing_derivative`:
    a tester's ``nn.EmbeddingBag`` met a raw NotImplementedError in every curvature product);
    else return."""
    operation = missing_derivative(error)
    if operation is not None:
        raise UnsupportedError(
            f"PyTorch implements no derivative of {operation!r} (an operation of the model's, "
            "or its backward), which this computation's curvature products differentiate: a "
            "second derivative of the model. Methods that take first derivatives only answer: "
            "'exact' (with the GGN, from per-example Jacobians), 'identity', 'trak', 'kfac' "
            "and 'ekfac'; or replace the operation (nn.EmbeddingBag by nn.Embedding and a "
            "mean or sum over the bag)"
        ) from error
    name = untransformable_function(error)
    if name is None:
        return
    raise UnsupportedError(
        f"the model calls {name}, which defines no setup_context: PyTorch differentiates it "
        "by ordinary backward passes but not inside torch.func's transforms (vmap, jvp, vjp), "
        "which this computation needs. Methods that take their gradients by backward passes "
        "answer: 'identity', 'trak', 'datainf', 'kfac' and 'ekfac' (their factors and scores "
        "come from layer hooks), and 'exact' with curvature='hessian' (double backward "
        "passes). Or rewrite the function with a setup_context staticmethod (PyTorch: "
        "'Extending torch.func with autograd.Function')"
    ) from error


@contextlib.contextmanager
def untransformable_refused() -> Iterator[None]:
    """Around a ``torch.func`` computation (or as a decorator): PyTorch's refusal of a custom
    ``torch.autograd.Function`` becomes :func:`refuse_untransformable`'s error; any other
    error passes unchanged."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as error:
        refuse_untransformable(error)
        raise


@contextlib.contextmanager
def composite_attention(enabled: bool) -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to its composite math kernel when enabled."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _PaddingRows(TorchFunctionMode):
    """``F.embedding`` with a ``padding_idx``, the same values either way: with ``constant``,
    its output detached at the padding positions (the padding row a constant of the lookup in
    forward mode, as backward passes read it), whichever module calls it (``nn.Embedding``,
    peft's LoRA embedding beside it); else called without its ``padding_idx`` (the row a
    parameter of the lookup in backward passes too, as it is of the function). Entered where
    the model has a padded ``nn.Embedding`` (:func:`padding_rows_constant`,
    :func:`padding_rows_variable`)."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.embedding:
            return func(*args, **kwargs)
        named = dict(zip(("input", "weight", "padding_idx"), args, strict=False)) | kwargs
        padding = named.get("padding_idx")
        if padding is None:
            return func(*args, **kwargs)
        if not self.constant:
            if len(args) > 2:  # (padding_idx given by position)
                return func(*args[:2], None, *args[3:], **kwargs)
            return func(*args, **{**kwargs, "padding_idx": None})
        out = func(*args, **kwargs)
        if padding < 0:
            padding += named["weight"].shape[0]
        at_padding = (named["input"] == padding).unsqueeze(-1)
        return torch.where(at_padding, out.detach(), out)


def _padded(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.Embedding`` with a ``padding_idx``."""
    return any(isinstance(m, nn.Embedding) and m.padding_idx is not None for m in model.modules())


def padding_rows_variable(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Within it, an embedding lookup with a ``padding_idx`` runs without it where ``model`` has
    such an embedding: the same values, and backward passes read the padding row as the
    function does (the reverse modes' stand-in for a directional derivative of the function,
    where forward mode is refused: a reviewer's 2.1e-2 off central differences without it)."""
    return _PaddingRows(constant=False) if _padded(model) else contextlib.nullcontext()


def padding_rows_constant(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Within it, an embedding lookup with a ``padding_idx`` (``F.embedding``) is detached at the
    padding positions where ``model`` has such an embedding: the same values, and the padding
    row a constant of the lookup in forward mode, as PyTorch's backward pass reads it. The row
    stays a parameter wherever else it is used (a tied output head). Only for products that
    pair forward mode with backward passes (``J^T H J``, ``J J^T``): a directional derivative
    of the model's function is the function's own."""
    return _PaddingRows(constant=True) if _padded(model) else contextlib.nullcontext()


#: whether this process has loaded PyTorch's forward-mode decompositions
_FORWARD_MODE_LOADED: list[bool] = []


@contextlib.contextmanager
def quiet_forward_mode() -> Iterator[None]:
    """Around forward-mode derivatives (``jvp``, ``jacfwd``); it acts at the process's first
    only, where PyTorch scripts its decompositions with a deprecation warning per function (18
    on a cg fit), its own and not the user's. Only the first: a filter set around every product
    reset Python's record of the warnings shown, and a user's own warning came back after every
    product (36 times, not 3)."""
    if _FORWARD_MODE_LOADED:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATION, DeprecationWarning)
        yield
    _FORWARD_MODE_LOADED.append(True)


def transforms_only() -> contextlib.AbstractContextManager[None]:
    """Ordinary autograd off around ``torch.func`` transforms, which ignore it (a transform's
    result does not depend on the grad mode outside it). Without it, parameters outside the
    attributed space that still require grad (a language model's embeddings and norms under
    EK-FAC) make autograd record a graph of every vmapped intermediate beside the transform's
    own: twice the memory of a GGN product per direction, measured on a causal LM."""
    return torch.no_grad()


class Pushforward:
    """``J_f(primal) t`` and ``H t`` for tangents t, by the first mode of :data:`MODES` that works.

    Args:
        model: the module whose embeddings' padding rows the forward mode reads as constants
            (:func:`padding_rows_constant`), as the reverse modes do.

    Attributes:
        mode: the mode in use (``"forward"`` until an operation refuses it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.mode = MODES[0]
        self.model = model

    def _attempt(self, compute: Callable[[str], Any]) -> Any:
        while True:
            try:
                with transforms_only(), composite_attention(self.mode != "forward"):
                    return compute(self.mode)
            except (NotImplementedError, RuntimeError) as error:
                if untransformable_function(error) is not None:
                    refuse_untransformable(error)
                position = MODES.index(self.mode)
                if not forward_mode_refused(error) or position == len(MODES) - 1:
                    # (a missing derivative only once every mode has met it: PyTorch's fused
                    # attention words its forward mode's refusal alike, and the next mode takes
                    # it)
                    refuse_untransformable(error)
                    raise
                self.mode = MODES[position + 1]

    def __call__(
        self,
        fn: Callable[[Any], torch.Tensor],
        primal: Any,
        tangents: Any,
        *,
        batched: bool = True,
        paired: bool = True,
    ) -> torch.Tensor:
        """J t for ``fn`` returning one tensor; with ``batched`` the tangents carry a leading
        dimension k and so does J t. ``paired``: J as the backward passes read it, to pair with
        their ``J^T`` (an embedding's padding row constant, :func:`padding_rows_constant`);
        else the function's own derivative (a removal's change of the outputs), in the reverse
        modes too (:func:`padding_rows_variable`)."""

        def compute(mode: str) -> torch.Tensor:
            # paired: forward mode holds the padding row as backward passes do; else the
            # reverse modes' stand-in reads it as the function does (around the pass that
            # records the graph too)
            forward = mode.startswith("forward")
            padding: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if paired == forward:
                padding = (padding_rows_constant if paired else padding_rows_variable)(self.model)
            with padding, quiet_forward_mode() if forward else contextlib.nullcontext():
                if forward:
                    push = lambda t: jvp(fn, (primal,), (t,))[1]  # noqa: E731
                else:
                    out, pullback = vjp(fn, primal)[:2]
                    transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))[1]
                    push = lambda t: transpose(t)[0]  # noqa: E731
                return vmap(push)(tangents) if batched else push(tangents)

        return self._attempt(compute)

    def hessian(self, gradient: Callable[[Any], Any], primal: Any, tangents: Any) -> Any:
        """H t for a batch of tangents, with ``gradient`` the gradient function of a scalar.

        Reverse-over-reverse (the Hessian is symmetric, so the VJP of the gradient is H t): the
        gradient is linearised once and its pullback vmapped over the tangents, 10-20% faster
        than forward-over-reverse on MLPs. Kernels without a second derivative get the
        composite attention (modes after ``"forward"``).
        """

        def compute(mode: str) -> Any:
            pullback = vjp(gradient, primal)[1]
            return vmap(lambda t: pullback(t)[0])(tangents)

        return self._attempt(compute)
