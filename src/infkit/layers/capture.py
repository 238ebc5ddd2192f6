"""Activations and pre-activation gradients of tracked layers, through forward hooks.

One forward pass of the real model (no rewriting) records, for every tracked layer, the
augmented input activations ``a`` [B, T, cols] (token-flattened: T positions per example; a
ones-column appended for a trainable bias; unfolded patches for convolutions) and keeps the layer
output in the autograd graph. :meth:`Capture.backprop` then returns the pre-activation
gradients ``Ds`` [K, B, T, d_out] for K output-space vectors at once (one vectorised backward),
so the per-example gradient of a block is ``DW_i = sum_t Ds_it a_it^T``.

An attention mask (``inputs["attention_mask"]``, [B, T], or a multiple-choice model's [B, C, T])
marks padding positions: they are left out of the activation statistics (and the token count)
of the layers that see the positions it marks; a layer that sees the sequence changed inside the
model (:meth:`Capture._shortened`) is named in a warning, and a mask that marks no padding (a
model's additive one) in a Notice. Their gradients are kept, which changes
nothing when the loss ignores padding (their ``Ds`` is then zero) and keeps ``DW_i`` equal to
the true per-example gradient otherwise.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infkit.data import Batch, leaves, map_tensors
from infkit.errors import InvalidInputError, Notice, UnsupportedError, listed, warn
from infkit.gradients import PerExample, batching_rule_notice, check_finite_rows
from infkit.layers.tracked import CONVOLUTIONS, TrackedModule
from infkit.parameters import evaluation_mode
from infkit.scratch import ScratchSpace
from infkit.task import Task


def _called_without_grad(name: str) -> UnsupportedError:
    return UnsupportedError(
        f"tracked module {name!r} ran with gradients turned off inside a forward pass that "
        "takes them: the model calls it under torch.no_grad, as reentrant activation "
        "checkpointing does (torch.utils.checkpoint(..., use_reentrant=True)), so its "
        "gradient cannot be taken from this forward pass. Checkpoint with use_reentrant=False "
        "(infkit leaves its recomputation alone) or turn checkpointing off; a layer that is "
        "truly run without gradients takes no part in them: freeze it (requires_grad=False)"
    )


def _check_output(t: TrackedModule, x: Tensor, output: Any) -> None:
    """Refuse a tracked layer whose output is not the product of its weight with its input:
    ``[..., d_out]`` for an input ``[..., d_in]`` (``[B, d_out, H, W]`` for a convolution).

    Raises:
        UnsupportedError: a subclass returned something else (a slice, a reshape, a tuple),
            naming the layer and what to do.
    """
    if t.kind in CONVOLUTIONS:
        dims = 4 if t.kind == "conv2d" else 3
        if x.dim() == dims - 1:  # (PyTorch's unbatched call: [C, L], [C, H, W]; a reviewer's)
            raise UnsupportedError(
                f"tracked layer {t.name!r} ({type(t.module).__name__}) is called on one "
                f"unbatched input of shape {list(x.shape)}, an example at a time: its hooks "
                "read a batch's examples along the first dimension. Call it on the batch "
                "(x rather than each x[i]), or leave it out of the attribution: modules=[...] "
                "without it, or a method that takes gradients by autograd (cg, exact, identity)"
            )
        expected = f"[B, {t.d_out}, H, W]" if dims == 4 else f"[B, {t.d_out}, L]"
        fits = isinstance(output, Tensor) and output.dim() == dims and output.shape[1] == t.d_out
    else:
        shape = (*x.shape[:-1], t.d_out)
        expected = str(list(shape))
        fits = isinstance(output, Tensor) and tuple(output.shape) == shape
    if not fits:
        got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise UnsupportedError(
            f"tracked layer {t.name!r} returned {got} where its weight gives {expected} for an "
            f"input of shape {list(x.shape)}: the layer ({type(t.module).__name__}) changes what "
            "it returns (a slice, a reshape, another output), so it does not compute "
            "s = W a (+ b) and its gradient cannot be read from its input and output gradient. "
            "Leave it out of the attribution (modules=[...] without it) or track the plain "
            "layer inside it"
        )


def _not_called(name: str) -> UnsupportedError:
    return UnsupportedError(
        f"tracked module {name!r} was not called during the forward pass of a batch: "
        "either it takes no part in the outputs (then it has no gradient: freeze it, "
        "requires_grad=False), or the model calls it for some inputs only (routing that "
        "depends on the data: in a batch of other inputs it is skipped), or a parent module "
        "applies its weight itself, without calling it, so its hooks never run. Leave it out "
        "of modules=[...], or use a method that takes gradients by autograd (cg, exact, identity)"
    )


#: a layer seeing this many positions more or fewer than the attention mask marks reads the
#: sequence changed inside the model (a token added or dropped; :meth:`Capture._shortened`)
CHANGED_POSITIONS = 8


@dataclass
class Record:
    """One call of a tracked layer: its activations and (graph-attached) output."""

    a: Tensor  # [B, T, cols], detached
    out: Tensor  # the layer output, attached to the graph
    mask: Tensor | None  # [B, T] of 0/1 (float), or None when every position counts
    to_tokens: Callable[[Tensor], Tensor]  # output-shaped [K, *out] -> [K, B, T, d_out]
    version: int = 0  # ``out._version`` when recorded: changed if the model wrote into it


class _Anchored(torch.autograd.Function):
    """An identity on a tracked layer's output that puts the device's anchor (a zero scalar
    leaf) into the graph, so that a backward to the anchors passes through every tracked output.

    It declares itself in place (``mark_dirty``) and returns the output itself, where
    ``output + anchor`` allocated a second output-sized tensor per layer call and, in the
    backward, summed each output gradient for the anchor's own. The gradient passes through
    unchanged; the anchor gets none. Not for views (:meth:`Capture._anchored`).
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor) -> Tensor:
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


#: tracked layers whose output the model changes in place (an ``nn.ReLU(inplace=True)`` right
#: after a convolution, as VGG has): a gradient taken with respect to that tensor after the
#: forward pass would be the gradient with respect to the changed values, so these layers
#: hand the model a copy of their output and the copy is what changes (:meth:`Capture.forward`)
_CHANGED_IN_PLACE: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _conv_patches(module: torch.nn.Conv2d | torch.nn.Conv1d, x: Tensor) -> Tensor:
    """Unfolded patches [B, L, C_in*kh*kw] for the output positions of ``module`` on ``x``
    (windows [B, L, C_in*k] of an ``nn.Conv1d``: its input [B, C_in, T] unfolded as an image of
    height 1)."""
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):  # "same" / "valid"
        if padding == "same":
            x = F.pad(x, _same_pads(module))
        padding = 0
    if isinstance(module, torch.nn.Conv1d):
        padding = padding if isinstance(padding, int) else padding[0]
        cols = F.unfold(
            x.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, padding),
            stride=(1, module.stride[0]),
        )
    else:
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
    return cols.transpose(1, 2)


def _same_pads(module: torch.nn.Conv2d | torch.nn.Conv1d) -> list[int]:
    """The zeros ``padding="same"`` adds, in ``F.pad``'s order (the last dimension first,
    before then after): ``d (k - 1)`` a dimension, the odd one after."""
    pads = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def _conv1d_padding(module: torch.nn.Conv1d) -> tuple[int, int]:
    """The zeros (or other padding) a 1-D convolution adds before and after its input."""
    padding: Any = module.padding
    if padding == "valid":
        return 0, 0
    if padding == "same":
        before, after = _same_pads(module)
        return before, after
    return int(padding[0]), int(padding[0])


def _conv_tokens(b: int, c_out: int) -> Callable[[Tensor], Tensor]:
    """[K, B, C_out, H, W] pre-activation gradients -> [K, B, H*W, C_out] positions ([K, B,
    C_out, L] -> [K, B, L, C_out] for a 1-D convolution)."""
    return lambda g: g.reshape(g.shape[0], b, c_out, -1).transpose(-1, -2)


def _regrouped(to_tokens: Callable[[Tensor], Tensor], b: int) -> Callable[[Tensor], Tensor]:
    """``to_tokens`` ([K, R, L, d] for R rows) with the rows grouped into ``b`` examples in
    order: [K, b, R L / b, d]."""

    def grouped(g: Tensor) -> Tensor:
        tokens = to_tokens(g)
        return tokens.reshape(tokens.shape[0], b, -1, tokens.shape[-1])

    return grouped


def _sequence_tokens(b: int, d_out: int) -> Callable[[Tensor], Tensor]:
    """[K, B, ..., d_out] pre-activation gradients -> [K, B, T, d_out] positions."""
    return lambda g: g.reshape(g.shape[0], b, -1, d_out)


def _batch_shape(inputs: Any, mask: Tensor | None) -> tuple[int | None, set[int]]:
    """The examples B of a batch of model inputs (the attention mask's rows, else the first
    integer [B, T] tensor's (token ids), else the first tensor's) and the sizes an input's
    dimensions after the batch flatten to (each leading run of them: T of ids [B, T]; C and
    C T of multiple-choice ids [B, C, T]; N of points [B, N, 3]): the rows per example a
    layer may see when a model folds them into the batch."""
    tensors = [x for x in leaves(inputs) if x.dim() > 0]
    ids = [x for x in tensors if x.dim() == 2 and not (x.is_floating_point() or x.is_complex())]
    if mask is not None:
        b: int | None = mask.shape[0]
    elif ids:
        b = ids[0].shape[0]
    else:
        b = tensors[0].shape[0] if tensors else None
    spans: set[int] = set()
    for x in tensors + ([] if mask is None else [mask]):
        if x.shape[0] == b:
            size = 1
            for d in x.shape[1:]:
                size *= d
                spans.add(size)
    return b, spans


def _padding_marks(mask: Any, ids: Any) -> Tensor | None:
    """The attention mask as the padding marks of the examples' positions, [B, positions], or
    None: a mask [B, T] of 0 and 1 (or bool), or one of the shape of the token ids (a
    multiple-choice model's [B, C, T], read as [B, C T]: a layer that folds the choices into the
    batch reads them per example in this order, :meth:`Capture._examples`), with a token in
    every row. Other masks (a model's additive or 4-D extended mask, which is all 0 where
    nothing is padded) mark no padding: their values are no weights, and a Notice says so."""
    if not isinstance(mask, Tensor) or mask.dim() < 2:
        return None
    shaped = mask.dim() == 2 or (isinstance(ids, Tensor) and ids.shape == mask.shape)
    marks = mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())
    if shaped and marks and bool(mask.reshape(mask.shape[0], -1).any(dim=1).all()):
        return mask.detach().reshape(mask.shape[0], -1)
    warn(
        f"the inputs' attention_mask (shape {list(mask.shape)}) is not read as padding marks: "
        "the Kronecker methods read a mask of 1 at tokens and 0 at padding, [B, T] or of "
        "input_ids' shape, with a token in every sequence; under this one any padding enters "
        "their activation statistics as tokens",
        Notice,
    )
    return None


class UnassignedRowsError(UnsupportedError):
    """Tracked layers whose input rows cannot be assigned to the batch's examples
    (:meth:`Capture._examples`): the Kronecker methods cannot attribute through them.

    Attributes:
        layers: the layers' names.
    """

    def __init__(self, message: str, layers: list[str]) -> None:
        super().__init__(message)
        self.layers = layers


@dataclass(frozen=True)
class Call:
    """Where one call of a tracked layer sits among the layer's calls in a forward pass.

    Attributes:
        index: its place in the forward pass's order (0 for the first call).
        offset: the positions of the layer's calls before it.
        positions: the positions of all the layer's calls, which :func:`layer_terms` joins in
            the forward pass's order (a streamed backward hands them over in its own order,
            usually the reverse).
    """

    index: int
    offset: int
    positions: int


#: ``consume(layer name, a [B, T, cols], Ds [B, T, d_out], call)``: one call of a tracked
#: layer's terms, handed over by a streamed backward (:meth:`Capture.stream`) as soon as it is
#: reached
Consumer = Callable[[str, Tensor, Tensor, Call], None]


class Capture:
    """Context manager recording tracked layers during forward passes.

    Args:
        tracked: the tracked layers.
        mask_key: key of the attention mask in dict inputs (None: no masking).
        consume: when given, the backward is streamed (:meth:`stream`): every call of a tracked
            layer hands its terms to ``consume`` as the backward reaches it, and they are freed
            then, instead of every layer's ``Ds`` being held until the backward ends.
        done: with ``consume``, called with a layer's name once all its calls are handed over
            (at the end of the backward for a layer whose output took no part in the losses).
    """

    def __init__(
        self,
        tracked: list[TrackedModule],
        mask_key: str | None = "attention_mask",
        consume: Consumer | None = None,
        done: Callable[[str], None] | None = None,
    ) -> None:
        self.tracked = tracked
        self.mask_key = mask_key
        self.consume = consume
        self.done = done
        #: set while this capture's own backward runs: a tracked layer called then is the
        #: recomputation of activation checkpointing, which the hooks leave alone
        self._in_backward = False
        #: whether the last forward pass began with gradients on (a tracked layer called
        #: without them inside it is refused)
        self._forward_with_grad = False
        #: device -> a zero scalar leaf added to every tracked output of a streamed pass, so
        #: that one backward to it reaches every tracked layer (:meth:`stream`)
        self._anchors: dict[torch.device, Tensor] = {}
        #: the calls of each tracked layer in the last streamed forward pass (which keeps no
        #: records), and those not yet handed over in its backward
        self._called: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        #: the positions of each call of each tracked layer in the last streamed forward pass
        self._call_positions: dict[str, list[int]] = {}
        self.records: dict[str, list[Record]] = {}
        self._handles: list[Any] = []
        self._mask: Tensor | None = None
        #: masks of the positions a 1-D convolution's output has, by their count, derived from
        #: the mask of its input's (an audio model's frames from its samples' mask)
        self._derived: dict[int, Tensor] = {}
        #: position counts of convolutions' outputs that the inputs have as sizes of their own
        self._ambiguous: set[int] = set()
        # (storage, layout, version, bias) of this forward pass's layer inputs -> (x, a)
        self._inputs: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        #: the model of the last forward pass (whose notice about batching rules is given)
        self._model: torch.nn.Module | None = None
        #: the examples of this forward pass, and the rows per example a layer may see when
        #: the model folds the inputs' other dimensions into the batch (:func:`_batch_shape`)
        self._batch: int | None = None
        #: tracked layers of the last forward pass whose rows are no example's: name -> rows
        self._unassigned: dict[str, int] = {}
        #: tracked layers of the last forward pass that see the sequence shortened, whose
        #: padding cannot be told: name -> positions
        self._unmasked: dict[str, int] = {}
        self._spans: set[int] = set()

    def __enter__(self) -> Capture:
        for t in self.tracked:
            hook = self._hook(t)
            self._handles.append(t.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()

    def release(self) -> None:
        """Drop the recorded activations and outputs (and the graph they hold) of the last
        forward pass."""
        self.records = {}
        self._inputs = {}

    def _hook(self, t: TrackedModule) -> Callable[..., Tensor | None]:
        def hook(
            module: torch.nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: Tensor,
        ) -> Tensor | None:
            if self._in_backward:  # recomputed by activation checkpointing: already recorded
                return None
            if self._forward_with_grad and not torch.is_grad_enabled():
                raise _called_without_grad(t.name)
            # (the input by keyword too: `self.a(input=h)` met a raw IndexError here)
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            _check_output(t, x, output)
            rows = x.shape[0]
            b = self._examples(rows)
            if b is None:  # named after the forward pass, with every other such layer
                self._unassigned.setdefault(t.name, rows)
                return None
            mask = None
            if t.kind in CONVOLUTIONS:
                assert isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d))
                a = _conv_patches(module, x)
                if t.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                to_tokens = _conv_tokens(rows, output.shape[1])
                if rows != b:  # images folded into the batch (a video's frames): batch-major
                    a = a.reshape(b, -1, a.shape[-1])
                    to_tokens = _regrouped(to_tokens, b)
                if t.kind == "nn_conv1d":  # over a sequence's tokens (SqueezeBERT's): masked
                    # as a Linear's (a reviewer's pads, 47%); over a signal's samples, strided
                    # (Wav2Vec2's feature encoder), by the frames its mask leaves whole (a
                    # tester's padded clips moved EK-FAC's scores by 10%)
                    assert isinstance(module, torch.nn.Conv1d)
                    mask = self._convolved_mask(module, x, a)
                    if mask is None:
                        mask = self._sequence_mask(t, a)
            else:
                a = self._sequence_input(x, t.bias is not None, b)
                to_tokens = _sequence_tokens(b, output.shape[-1])
                mask = self._sequence_mask(t, a)
            if self.consume is not None and torch.is_grad_enabled():
                # nothing kept here: the hook holds the terms until it hands them over
                self._called[t.name] = self._called.get(t.name, 0) + 1
                self._call_positions.setdefault(t.name, []).append(int(a.shape[1]))
                return self._anchored(t.name, a, output, to_tokens)
            given = None  # a copy for the model to go on with, if it changes the output
            if module in _CHANGED_IN_PLACE and torch.is_grad_enabled():
                given = output.clone()
            record = Record(a, output, mask, to_tokens, output._version)
            self.records.setdefault(t.name, []).append(record)
            return given

        return hook

    def _anchored(
        self, name: str, a: Tensor, output: Tensor, to_tokens: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """``output`` tied to the anchor of its device (:class:`_Anchored`: the same tensor,
        neither copied nor changed; ``output + anchor`` for an output that is a view of another
        tensor), with a hook handing the layer's terms to :attr:`consume`
        when the backward reaches this call.

        The hook is registered here, before the model can change the output in place, so that
        it receives the gradient with respect to the layer's output as returned. It drops its
        hold on ``a`` once handed over: the layer's input is then freed when the backward
        has passed the layer, as in a plain backward, instead of at the end.
        """
        consume = self.consume
        assert consume is not None
        anchor = self._anchors.get(output.device)
        if anchor is None:
            anchor = torch.zeros((), device=output.device, requires_grad=True)
            self._anchors[output.device] = anchor
        # in place on a view would hand the history to its base: the hook would never be called
        anchored = output + anchor if output._is_view() else _Anchored.apply(output, anchor)
        held = [a]
        index = self._called[name] - 1

        def hand_over(g: Tensor) -> None:
            sizes = self._call_positions[name]
            call = Call(index, sum(sizes[:index]), sum(sizes))
            consume(name, held.pop(), to_tokens(g.unsqueeze(0))[0], call)
            self._pending[name] -= 1
            if self._pending[name] == 0 and self.done is not None:
                self.done(name)

        anchored.register_hook(hand_over)
        return anchored

    def _examples(self, rows: int) -> int | None:
        """The examples that the ``rows`` of a tracked layer's input belong to, batch-major, or None
        when they cannot be told (:meth:`_refuse_unassigned` names such layers).

        Most layers see the examples first (``[B, ..., cols]``). Some models fold an input's
        other dimensions into the batch before a layer (Hugging Face's OPT its positions before
        its MLP, ``[B T, cols]``; a mixture-of-experts model for its shared expert; a
        multiple-choice model its choices): B k rows, with k a size the inputs' dimensions after
        the batch flatten to, are read as k rows of each example, in order, so that they count
        for their example (and an attention mask of their shape applies). Any other number of
        rows would assign them to the wrong examples.
        """
        b = self._batch
        if b is None or rows == b:
            return rows
        if rows % b == 0 and rows // b in self._spans:
            return b
        return None

    def _refuse_unassigned(self) -> None:
        """Refuse the tracked layers of the last forward pass whose rows could not be assigned
        to examples (:meth:`_examples`), naming each."""
        if not self._unassigned:
            return
        rows = self._unassigned
        layers = listed([f"{n!r} ({k} row{'s' if k != 1 else ''})" for n, k in rows.items()], 6)
        shared = (
            " One row in a batch of several is a tensor shared by every example (DeBERTa's "
            "relative-position projections), which belongs to none."
            if 1 in rows.values()
            else ""
        )
        raise UnassignedRowsError(
            f"tracked layers {layers} received inputs whose rows cannot be assigned to "
            f"the batch's {self._batch} examples: neither the examples nor the examples times a "
            "size of the inputs' other dimensions "
            f"({', '.join(map(str, sorted(self._spans))) or 'none'}) folded into the batch (a "
            "layer applied to routed tokens, to tokens the model adds or to a tensor shared by "
            f"the batch, or a sequence-first [T, B, ...] layout).{shared} Leave them out of the "
            "attribution: modules=[...] without them, or requires_grad=False on their "
            "parameters; or use a method that takes per-example gradients of the whole model "
            "(identity, cg, arnoldi, the dual)",
            list(rows),
        )

    def _sequence_input(self, x: Tensor, bias: bool, b: int) -> Tensor:
        """``a`` [B, T, cols] of a linear layer's input ``x`` (a ones-column when ``bias``),
        its rows read as ``b`` examples' in order (:meth:`_examples`).

        Layers that read the same input in this forward pass (an attention's q, k and v
        projections, a gated MLP's gate and up) get the same tensor object, so that what
        depends only on ``a`` (the activation covariance, its rotation into the eigenbasis)
        can be computed once for all of them. The same storage, layout and version counter
        means the same values: ``x`` is held until the pass is released, so no other tensor
        can take its address meanwhile.
        """
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version, bias)
        seen = self._inputs.get(key)
        if seen is not None:
            return seen[1]
        a = x.reshape(b, -1, x.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        self._inputs[key] = (x, a)
        return a

    def _sequence_mask(self, t: TrackedModule, a: Tensor) -> Tensor | None:
        """The attention mask of a layer's positions ``a`` [B, L, cols] where it marks them (L
        the mask's T, or the positions of a convolution's output whose mask was derived:
        :meth:`_convolved_mask`), else None, noting a layer that sees the sequence shortened
        (:meth:`_shortened`) for the warning of :meth:`_warn_unmasked` where the mask marks
        padding (all ones, there is none to enter: a tester's unpadded clips were warned)."""
        if self._mask is None:
            return None
        if self._mask.shape == a.shape[:2]:
            return self._mask_as(a.dtype)
        derived = self._derived.get(int(a.shape[1]))
        if derived is not None and derived.shape[0] == a.shape[0] and a.shape[1] not in self._spans:
            return derived.to(a.dtype)
        count = int(a.shape[1])
        if (self._shortened(count) or count in self._ambiguous) and not bool(self._mask.all()):
            self._unmasked.setdefault(t.name, count)
        return None

    def _convolved_mask(self, module: torch.nn.Conv1d, x: Tensor, a: Tensor) -> Tensor | None:
        """The mask of a 1-D convolution's output positions ``a`` [B, L_out, cols]: the
        positions whose window lies within the example's data, stretched by the convolution's
        own padding on each side (a frame at the data's edge reads the padding the model zeroed
        as the convolution's own zeros: a reviewer's padded convolutions moved by 9e-3 where the
        edge frames were dropped), as Hugging Face's feature encoders count frames from a
        length; the input's [B, C, L_in] mask is the attention mask (L_in = T) or one derived
        so before. Registered by L_out for the layers after it, unless the inputs have that
        size of their own (a text beside the audio); None where the input's mask is not
        known."""
        if self._mask is None or x.dim() != 3 or x.shape[0] != a.shape[0]:
            return None
        length, out = int(x.shape[-1]), int(a.shape[1])
        if length == int(self._mask.shape[1]):
            given: Tensor | None = self._mask
        else:
            given = self._derived.get(length)
        if given is None or given.shape[0] != x.shape[0]:
            return None
        kept = given.to(torch.bool)
        spans = torch.arange(length, device=kept.device)
        first = torch.where(kept, spans, length).amin(dim=1)  # [B] the data's first position
        last = torch.where(kept, spans, -1).amax(dim=1)  # and its last
        (kernel,), (stride,), (dilation,) = module.kernel_size, module.stride, module.dilation
        before, after = _conv1d_padding(module)
        starts = torch.arange(out, device=kept.device) * stride - before  # in the input's positions
        ends = starts + dilation * (kernel - 1)
        if int(ends[-1]) > length - 1 + after:  # (not this convolution's layout)
            return None
        inside = (starts[None] >= first[:, None] - before) & (ends[None] <= last[:, None] + after)
        mask = inside.to(a.dtype)
        if out in self._spans:  # (which of the layers with as many positions see frames
            self._ambiguous.add(out)  # cannot be told: they are warned of, not masked)
        elif out != int(self._mask.shape[1]):
            self._derived.setdefault(out, mask)
        return mask

    def _shortened(self, positions: int) -> bool:
        """Whether a layer seeing ``positions`` positions per example where the mask marks T
        reads the sequence changed inside the model, so that which of them are padding cannot
        be told: shortened by a factor (Funnel's pooling: T // k or its ceiling), or a few
        positions added or dropped (a token prepended, prompt tuning's virtual tokens). One
        position is a pooled representation, a size of the inputs' other dimensions holds no
        padding (a multiple-choice model's choices), and other counts are taken for another
        input's (an image's patches beside a text)."""
        assert self._mask is not None
        length = int(self._mask.shape[1])
        if positions <= 1 or positions == length or positions in self._spans:
            return False
        if abs(positions - length) <= CHANGED_POSITIONS:
            return True
        return any(positions in (length // k, -(-length // k)) for k in range(2, length + 1))

    def _warn_unmasked(self) -> None:
        """Warn, once for the forward pass, of the tracked layers that see the sequence
        shortened (:meth:`_shortened`): their padding enters their statistics as tokens."""
        if not self._unmasked or self._mask is None:
            return
        layers = listed([f"{name!r} ({k})" for name, k in self._unmasked.items()], 6)
        warn(
            f"tracked layers {layers} see other positions per example than the "
            f"{int(self._mask.shape[1])} the attention mask marks: the model shortens or "
            "lengthens the sequence inside (as Funnel's pooling does, or a token it adds), so "
            "which of their positions are padding cannot be told, and padding enters their "
            "activation statistics as tokens: their scores move with the padding's width. Pad "
            "as little as possible, or leave them out: modules=[...] without them"
        )

    def _mask_as(self, dtype: torch.dtype) -> Tensor:
        """The attention mask in ``dtype``, converted once per forward pass (one object, so
        that layers with a shared input also share their mask)."""
        assert self._mask is not None
        if self._mask.dtype != dtype:
            self._mask = self._mask.to(dtype)
        return self._mask

    def forward(self, task: Task, inputs: Any) -> Tensor:
        """Run the model on ``inputs`` (recording); returns its outputs flattened to [B, C].

        A tracked layer whose output the model changed in place is remembered, and the pass is
        run again with that layer handing the model a copy (:data:`_CHANGED_IN_PLACE`), so that
        its recorded output keeps the values the layer gave. A streamed pass needs no copy: its
        hooks are registered on the output before the model can change it.

        A layer's input changed in place after the layer read it needs no such care: autograd
        saves it for the weight's gradient and refuses the change at any backward that computes
        one, as infkit's fit does, so such a model gets autograd's error, not wrong scores.
        """
        out = self._forward_once(task, inputs)
        if self.consume is not None or not torch.is_grad_enabled():
            return out
        changed = {
            t.module
            for t in self.tracked
            for r in self.records.get(t.name, [])
            if r.out._version != r.version and t.module not in _CHANGED_IN_PLACE
        }
        if not changed:
            return out
        _CHANGED_IN_PLACE.update(changed)
        del out
        self.release()
        return self._forward_once(task, inputs)

    def _forward_once(self, task: Task, inputs: Any) -> Tensor:
        self.records = {}
        self._called = {}
        self._call_positions = {}
        self._inputs = {}
        self._mask = None
        self._derived, self._ambiguous = {}, set()
        self._model = task.model
        if self.mask_key is not None and isinstance(inputs, dict):
            self._mask = _padding_marks(inputs.get(self.mask_key), inputs.get("input_ids"))
        self._batch, self._spans = _batch_shape(inputs, self._mask)
        self._unassigned, self._unmasked = {}, {}
        self._forward_with_grad = torch.is_grad_enabled()
        with task.mixed_precision():
            out = task.call_model(task.model, inputs)
        self._refuse_unassigned()
        self._warn_unmasked()
        return out

    @contextlib.contextmanager
    def _backward(self) -> Iterator[None]:
        """Within: this capture's backward runs (:attr:`_in_backward`)."""
        self._in_backward = True
        try:
            yield
        finally:
            self._in_backward = False

    def activations(self, name: str) -> tuple[Tensor, Tensor | None]:
        """All recorded activations of layer ``name``: [B, T_total, cols] and the mask."""
        recs = self.records.get(name, [])
        if not recs:
            raise _not_called(name)
        a = recs[0].a if len(recs) == 1 else torch.cat([r.a for r in recs], dim=1)
        if all(r.mask is None for r in recs):
            return a, None
        masks = [r.mask if r.mask is not None else r.a.new_ones(r.a.shape[:2]) for r in recs]
        return a, torch.cat(masks, dim=1)

    def backprop(self, outputs: Tensor, grad_outputs: Tensor) -> dict[str, Tensor]:
        """Pre-activation gradients of every tracked layer for K output-space vectors.

        This is the last use of the forward pass's graph: the backward frees its saved tensors
        as it goes (as a training step's does), so the peak memory is one graph, not the
        graph and every layer's gradients on top of it; a second call needs a new forward.

        Args:
            outputs: the model outputs returned by :meth:`forward` (any shape, B first).
            grad_outputs: [K, *outputs.shape], the vectors to pull back.

        Returns:
            name -> Ds [K, B, T_total, d_out] (tokens of repeated calls concatenated).
        """
        names = [t.name for t in self.tracked]
        recs = [(n, r) for n in names for r in self.records.get(n, [])]
        outs = [r.out for _, r in recs]
        k = grad_outputs.shape[0]
        with self._backward():
            grads = _pulled_back(self._model, outputs, outs, grad_outputs)
        result: dict[str, list[Tensor]] = {}
        for (name, rec), g in zip(recs, grads):
            if g is None:
                g = torch.zeros(k, *rec.out.shape, dtype=rec.out.dtype, device=rec.out.device)
            result.setdefault(name, []).append(rec.to_tokens(g))
        return {
            n: parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            for n, parts in result.items()
        }

    def stream(self, losses: Tensor) -> None:
        """The backward of ``losses.sum()`` through every tracked layer of the last (streamed)
        forward pass, handing each call's terms to :attr:`consume` as it is reached.

        Only the tracked layers' output gradients are computed on the way (to the anchors), not
        the parameters'. A tracked layer that takes no part in the losses is never handed over:
        its terms are zero. This is the last use of the forward pass's graph.

        Raises:
            UnsupportedError: a tracked layer was not called by the forward pass.
        """
        if self.consume is None:
            raise RuntimeError("Capture.stream needs a Capture made with consume=")
        for t in self.tracked:
            if t.name not in self._called:
                raise _not_called(t.name)
        self._inputs = {}  # the forward pass's shared inputs: the graph holds what it needs
        self._pending = dict(self._called)
        anchors = list(self._anchors.values())
        if anchors:
            with self._backward():
                torch.autograd.grad(losses.sum(), anchors, allow_unused=True)
        if self.done is not None:  # layers with calls the backward never reached
            for name, pending in self._pending.items():
                if pending > 0:
                    self.done(name)

    def loss_gradients(self, outputs: Tensor, losses: Tensor) -> dict[str, Tensor]:
        """Pre-activation gradients of ``losses.sum()``: name -> Ds [1, B, T, d_out]."""
        # frees only the loss's part of the graph, between the losses and the outputs
        g = torch.autograd.grad(losses.sum(), outputs)[0]
        return self.backprop(outputs, g.unsqueeze(0))


def _pulled_back(
    model: Any, outputs: Tensor, outs: list[Tensor], grad_outputs: Tensor
) -> list[Tensor | None]:
    """The gradients [K, *out.shape] of ``outputs`` pulled back along each of the K vectors
    ``grad_outputs`` to every tensor of ``outs`` (None where one takes no part): one batched
    backward, or one backward per vector where the model has no batching rule."""
    k = grad_outputs.shape[0]
    grads: list[Tensor | None]
    if k == 1:
        grads = list(torch.autograd.grad(outputs, outs, grad_outputs[0], allow_unused=True))
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        # the graph is kept: a missing batching rule raises partway through (one that
        # PyTorch emulates by a loop warns instead: one notice per model)
        with batching_rule_notice(model):
            return list(
                torch.autograd.grad(
                    outputs,
                    outs,
                    grad_outputs,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            )
    except (RuntimeError, NotImplementedError):  # no batching rule: one per vector
        columns = [
            torch.autograd.grad(
                outputs, outs, grad_outputs[j], retain_graph=j < k - 1, allow_unused=True
            )
            for j in range(k)
        ]
        return [
            None if columns[0][i] is None else torch.stack([c[i] for c in columns])
            for i in range(len(outs))
        ]


def layer_terms(
    engine: PerExample,
    tracked: list[TrackedModule],
    batch: Batch,
    which: str = "loss",
    mask_key: str | None = "attention_mask",
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-position terms of each example's gradient for every tracked layer.

    Returns name -> (a [B, T, cols], Ds [B, T, d_out]) with ``sum_t Ds_t a_t^T`` the gradient of
    example b's loss (``which="loss"``) or measurement (``"measurement"``) with respect to the
    layer's augmented block ``[W | b]``.
    """
    with Capture(tracked, mask_key) as cap, evaluation_mode(engine.task.model), torch.enable_grad():
        out, values = _recorded_values(cap, engine, batch, which)
        Ds = cap.loss_gradients(out, values)
        return {t.name: (cap.activations(t.name)[0], Ds[t.name][0].detach()) for t in tracked}


def stream_layer_terms(
    engine: PerExample,
    tracked: list[TrackedModule],
    batch: Batch,
    consume: Consumer,
    which: str = "loss",
    mask_key: str | None = "attention_mask",
    done: Callable[[str], None] | None = None,
) -> None:
    """:func:`layer_terms`, handed over one layer call at a time as the backward reaches it.

    ``consume(name, a, Ds, call)`` is called once for every call of a tracked layer (a layer
    called twice in the forward pass gives two calls, each with its own positions, and
    :class:`Call` says where they sit among the layer's calls); what it computes must therefore
    add up over calls, as ``sum_t Ds_t a_t^T`` does. Each call's ``Ds`` is freed
    after its hand-over, so the backward holds one layer's terms at a time rather than every
    layer's until it ends (the peak of a scoring pass). ``done(name)``, when given, follows a
    layer's last call.
    """
    with (
        Capture(tracked, mask_key, consume, done) as cap,
        evaluation_mode(engine.task.model),
        torch.enable_grad(),
    ):
        values = _recorded_values(cap, engine, batch, which)[1]
        cap.stream(values)


def stream_block_gradients(
    engine: PerExample,
    tracked: list[TrackedModule],
    batch: Batch,
    consume: Callable[[str, Tensor], None],
    which: str = "loss",
    mask_key: str | None = "attention_mask",
    dtype: torch.dtype = torch.float64,
) -> None:
    """Each tracked layer's per-example block gradients ``G_j = sum_t Ds_jt a_jt^T``
    [B, d_out, cols] in ``dtype``, handed to ``consume(name, G)`` once per layer as soon as the
    backward has passed all its calls (:func:`stream_layer_terms`), for what is not linear in
    the gradient (a quadratic form) and so cannot be taken one call at a time."""
    shapes = {t.name: (len(batch.indices), t.d_out, t.cols) for t in tracked}
    sums: dict[str, Tensor] = {}

    def add(name: str, a: Tensor, ds: Tensor, call: Call) -> None:
        G = block_gradient(a, ds, dtype)
        sums[name] = sums.pop(name).add_(G) if name in sums else G

    def finish(name: str) -> None:
        G = sums.pop(name, None)
        if G is None:  # the layer's output took no part in the losses
            G = torch.zeros(shapes[name], dtype=dtype, device=engine.space.device)
        consume(name, G)

    stream_layer_terms(engine, tracked, batch, add, which, mask_key, finish)


def _recorded_values(
    cap: Capture, engine: PerExample, batch: Batch, which: str
) -> tuple[Tensor, Tensor]:
    """The model's outputs [B, C] on ``batch`` (recorded by ``cap``) and each example's loss
    (``which="loss"``) or measurement (``"measurement"``), both checked finite."""
    task = engine.task
    inputs, targets = engine.prepare(batch)
    out = cap.forward(task, inputs)
    check_finite_rows(out.detach(), batch, "model output", engine.precision)
    values = (
        task.checked_loss(out, targets)
        if which == "loss"
        else task.checked_measurement(out, targets)
    )
    return out, values


#: :func:`check_rows_follow_examples` takes this many examples (at most) for its two passes
ROW_PROBE_EXAMPLES = 3


def check_rows_follow_examples(
    engine: PerExample,
    tracked: list[TrackedModule],
    batch: Batch,
    mask_key: str | None = "attention_mask",
) -> None:
    """Refuse a tracked layer whose input rows do not follow the examples, batch-major.

    Two forward passes of ``batch`` (a few examples), the second with the examples in reverse
    order: each layer's activations, read per example as the hooks read them
    (:meth:`Capture._examples`), must come back reversed by example. A sequence-first layout
    ``[T, B, d]`` whose length T equals the batch, or positions flattened sequence-major
    ``[T B, d]``, have the row counts of a batch-major input and would otherwise give every
    example other examples' rows.

    Raises:
        UnsupportedError: naming the layer and what to do.
    """
    if len(batch.indices) < 2:
        return
    task = engine.task
    inputs, _ = engine.prepare(batch)
    seen = []
    for given in (inputs, map_tensors(inputs, lambda x: x.flip(0))):
        with Capture(tracked, mask_key) as cap, evaluation_mode(task.model), torch.no_grad():
            cap.forward(task, given)
            seen.append({t.name: [r.a for r in cap.records.get(t.name, [])] for t in tracked})
    for t in tracked:
        for a, reversed_a in zip(seen[0][t.name], seen[1][t.name], strict=False):
            if not a.is_floating_point() or a.shape != reversed_a.shape:
                continue
            scale = float(a.abs().max())
            tolerance = max(1e-4, 16 * torch.finfo(a.dtype).eps) * scale
            if float((a.flip(0) - reversed_a).abs().max()) > tolerance:
                raise UnsupportedError(
                    f"tracked layer {t.name!r} reads its input's rows in another order than "
                    "the examples': with the batch's examples reversed, its rows did not come "
                    "back reversed by example. Its input is not [B, ...] nor [B k, ...] "
                    "batch-major (a sequence-first [T, B, d] layout, or positions flattened "
                    "sequence-major), so its rows cannot be assigned to examples. Leave it out "
                    "of the attribution: modules=[...] without it, or requires_grad=False on "
                    "its parameters"
                )


@dataclass
class InputLayout:
    """What one forward pass of one example shows of the tracked layers' inputs.

    Attributes:
        shared: groups of layers that read one input tensor (an attention's q, k and v, a
            gated MLP's gate and up): the layers a fit gives one activation covariance and
            eigenbasis.
        positions: each layer's positions per example, its calls' together (a sequence's
            tokens, a convolution's output pixels, 1 for a pooled head).
    """

    shared: list[list[str]]
    positions: dict[str, int]


def input_layout(
    task: Task, tracked: list[TrackedModule], inputs: Any, mask_key: str | None = "attention_mask"
) -> InputLayout:
    """The :class:`InputLayout` of the tracked layers, from one forward pass of one example's
    ``inputs`` without gradients."""
    with Capture(tracked, mask_key) as cap, evaluation_mode(task.model), torch.no_grad():
        cap.forward(task, inputs)
        groups: dict[int, list[str]] = {}
        positions: dict[str, int] = {}
        for t in tracked:
            records = cap.records.get(t.name)
            if records:
                groups.setdefault(id(records[0].a), []).append(t.name)
                positions[t.name] = sum(r.a.shape[1] for r in records)
    return InputLayout([names for names in groups.values() if len(names) > 1], positions)


def position_count(positions: int | None, counts: set[int]) -> int:
    """The position count whose layers a per-token split decomposes: ``positions``, or when
    None the largest of the tracked layers' ``counts`` (positions per example; 0 for none).

    Raises:
        InvalidInputError: ``positions`` is none of ``counts``.
    """
    if positions is None:
        return max(counts, default=0)
    if positions not in counts:
        raise InvalidInputError(
            f"positions={positions} is the position count of no tracked layer (theirs: "
            f"{', '.join(map(str, sorted(counts)))}), so every layer would go to `rest` and "
            "every per-token score would be 0: pass one of those counts, or leave positions "
            "out (the largest)"
        )
    return positions


def block_gradient(
    a: Tensor, ds: Tensor, dtype: torch.dtype = torch.float64, scratch: ScratchSpace | None = None
) -> Tensor:
    """One layer's per-example block gradients ``G_j = sum_t Ds_jt a_jt^T`` from its terms
    ``a`` [B, T, cols] and ``Ds`` [B, T, d_out]: [B, d_out, cols] in ``dtype``; made in
    ``scratch`` when given (valid until its next use: a language model's blocks are tens of MB
    a layer, and a fresh allocation of that size faults in every page each time)."""
    if scratch is None:
        return torch.einsum("bto,bti->boi", ds.to(dtype), a.to(dtype))
    left, right = ds.to(dtype).transpose(1, 2), a.to(dtype)
    with torch.no_grad():  # out= takes no part in autograd, and nothing here needs it
        shape = (left.shape[0], left.shape[1], right.shape[2])
        return torch.matmul(left, right, out=scratch.view(shape, left))


#: positions per example up to which, on a CPU, the block gradients are made a slab of rows at a
#: time and used while in the cache (:func:`made_in_slabs`): forming a block costs 2T operations
#: an element, writing it out and reading it back about as much at T = 16 on this project's
#: machines; at T = 128 the two orders took the same time
SLAB_MAX_POSITIONS = 64
#: bytes of the block gradients' slab in :func:`block_inner` (the fastest of 0.5-8 MiB measured
#: at T = 16, B = 16, layers of 1536 x 384 on one core: 19 against 38 ms for the whole block)
INNER_SLAB_BYTES = 1 << 20
#: threads up to which the scoring pass takes its products with the queries in slabs
#: (:func:`products_in_slabs`): MiniLM's scores took 2.14 and 2.02 passes in slabs against 2.76
#: whole on one thread, but 68 and 72 s against 55 s on two, where the slabs' small products
#: split across threads worse than the whole block's (benchmarks/results/minilm.md)
INNER_SLAB_MAX_THREADS = 1


def made_in_slabs(a: Tensor) -> bool:
    """Whether a layer's per-example blocks from the terms ``a`` [B, T, cols] are cheaper made a
    slab of rows at a time than whole: on a CPU, at most :data:`SLAB_MAX_POSITIONS` positions,
    where the block's traffic to memory, not its arithmetic, is the cost. (On a GPU the slabs'
    many small kernels would cost more than the traffic they save.)"""
    return a.device.type == "cpu" and a.shape[1] <= SLAB_MAX_POSITIONS


def products_in_slabs(a: Tensor) -> bool:
    """Whether the scoring pass takes a layer's per-example blocks into its products with the
    queries a slab at a time (:func:`block_inner`): :func:`made_in_slabs`, on at most
    :data:`INNER_SLAB_MAX_THREADS` threads."""
    return made_in_slabs(a) and torch.get_num_threads() <= INNER_SLAB_MAX_THREADS


def block_inner(U: Tensor, a: Tensor, ds: Tensor, dtype: torch.dtype) -> Tensor:
    """``<U_k, G_j>`` [k, B] in ``dtype`` of the blocks ``U`` [k, d_out, cols] with the
    per-example block gradients ``G_j = sum_t Ds_jt a_jt^T`` of the terms ``a`` [B, T, cols] and
    ``Ds`` [B, T, d_out], without forming the whole of G: each slab of rows of the blocks,
    :data:`INNER_SLAB_BYTES` of them, is made and taken into the products while in the cache
    (the whole block, tens of MB a layer, is written and read back from memory)."""
    a, ds, U = a.to(dtype), ds.to(dtype), U.to(dtype)  # once, not for every slab
    batch, d_out, cols = ds.shape[0], ds.shape[2], a.shape[2]
    rows = max(1, INNER_SLAB_BYTES // (batch * cols * a.element_size()))
    out = torch.zeros(U.shape[0], batch, dtype=dtype, device=a.device)
    slab = ScratchSpace()  # each slab's blocks in the storage of the one before
    for start in range(0, d_out, rows):
        stop = min(start + rows, d_out)
        G = block_gradient(a, ds[:, :, start:stop], dtype, slab)
        out.addmm_(U[:, start:stop].flatten(1), G.flatten(1).T)
    return out


def block_gradients(terms: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Per-example block gradients ``sum_t Ds_t a_t^T``: name -> [B, d_out, cols] float64."""
    return {name: block_gradient(a, ds) for name, (a, ds) in terms.items()}
