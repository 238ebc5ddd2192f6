"""Activations and pre-activation gradients of tracked layers, through forward hooks.

One forward pass of the real model (no rewriting) records, for every tracked layer, the
augmented input activations ``a`` [B, T, cols] (token-flattened: T positions per example; a
ones-column appended for a trainable bias; unfolded patches for convolutions) and keeps the layer
output in the autograd graph. :meth:`Capture.backprop` then returns the pre-activation
gradients ``Ds`` [K, B, T, d_out] for K output-space vectors at once (one vectorised backward),
so the per-example gradient of a block is ``DW_i = sum_t Ds_it a_it^T``.

An attention mask (``inputs["attention_mask"]``, [B, T]) marks padding positions: they are left
out of the activation statistics (and the token count). Their gradients are kept, which changes
nothing when the loss ignores padding (their ``Ds`` is then zero) and keeps ``DW_i`` equal to
the true per-example gradient otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from infkit.data import Batch, leaves, map_tensors
from infkit.errors import UnsupportedError
from infkit.gradients import PerExample, batching_rule_notice, check_finite_rows
from infkit.layers.tracked import TrackedModule
from infkit.parameters import evaluation_mode
from infkit.task import Task


@dataclass
class Record:
    """One call of a tracked layer: its activations and (graph-attached) output."""

    a: Tensor  # [B, T, cols], detached
    out: Tensor  # the layer output, attached to the graph
    mask: Tensor | None  # [B, T] of 0/1 (float), or None when every position counts
    to_tokens: Callable[[Tensor], Tensor]  # output-shaped [K, *out] -> [K, B, T, d_out]


def _conv_patches(module: torch.nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded patches [B, L, C_in*kh*kw] for the output positions of ``module`` on ``x``."""
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):  # "same" / "valid"
        if padding == "valid":
            padding = 0
        else:
            pads = []
            for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = 0
    cols = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )
    return cols.transpose(1, 2)


def _conv_tokens(b: int, c_out: int) -> Callable[[Tensor], Tensor]:
    """[K, B, C_out, H, W] pre-activation gradients -> [K, B, H*W, C_out] positions."""
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


class Capture:
    """Context manager recording tracked layers during forward passes.

    Args:
        tracked: the tracked layers.
        mask_key: key of the attention mask in dict inputs (None: no masking).
    """

    def __init__(
        self, tracked: list[TrackedModule], mask_key: str | None = "attention_mask"
    ) -> None:
        self.tracked = tracked
        self.mask_key = mask_key
        self.records: dict[str, list[Record]] = {}
        self._handles: list[Any] = []
        self._mask: Tensor | None = None
        # (storage, layout, version, bias) of this forward pass's layer inputs -> (x, a)
        self._inputs: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        #: the model of the last forward pass (whose notice about batching rules is given)
        self._model: torch.nn.Module | None = None
        #: the examples of this forward pass, and the rows per example a layer may see when
        #: the model folds the inputs' other dimensions into the batch (:func:`_batch_shape`)
        self._batch: int | None = None
        self._spans: set[int] = set()

    def __enter__(self) -> Capture:
        for t in self.tracked:
            self._handles.append(t.module.register_forward_hook(self._hook(t)))
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

    def _hook(self, t: TrackedModule) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            x = args[0].detach()
            rows = x.shape[0]
            b = self._examples(t, rows)
            mask = None
            if t.kind == "conv2d":
                assert isinstance(module, torch.nn.Conv2d)
                a = _conv_patches(module, x)
                if t.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                to_tokens = _conv_tokens(rows, output.shape[1])
                if rows != b:  # images folded into the batch (a video's frames): batch-major
                    a = a.reshape(b, -1, a.shape[-1])
                    to_tokens = _regrouped(to_tokens, b)
            else:
                a = self._sequence_input(x, t.bias is not None, b)
                to_tokens = _sequence_tokens(b, output.shape[-1])
                if self._mask is not None and self._mask.shape == a.shape[:2]:
                    mask = self._mask_as(a.dtype)
            self.records.setdefault(t.name, []).append(Record(a, output, mask, to_tokens))

        return hook

    def _examples(self, t: TrackedModule, rows: int) -> int:
        """The examples that the ``rows`` of layer ``t``'s input belong to, batch-major.

        Most layers see the examples first (``[B, ..., cols]``). Some models fold an input's
        other dimensions into the batch before a layer (Hugging Face's OPT its positions before
        its MLP, ``[B T, cols]``; a mixture-of-experts model for its shared expert; a
        multiple-choice model its choices): B k rows, with k a size the inputs' dimensions after
        the batch flatten to, are read as k rows of each example, in order, so that they count
        for their example (and an attention mask of their shape applies). Any other number of
        rows would assign them to the wrong examples: refused, naming the layer.
        """
        b = self._batch
        if b is None or rows == b:
            return rows
        if rows % b == 0 and rows // b in self._spans:
            return b
        raise UnsupportedError(
            f"tracked layer {t.name!r} received an input of {rows} rows in a batch of {b} "
            "examples: neither the examples nor the examples times a size of the inputs' other "
            f"dimensions ({', '.join(map(str, sorted(self._spans))) or 'none'}) folded into "
            "the batch, so its rows cannot be assigned to examples (a layer applied to routed "
            "tokens, or to tokens the model adds, or a sequence-first [T, B, ...] layout). "
            "Leave it out of the attribution: modules=[...] without it, or "
            "requires_grad=False on its parameters"
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

    def _mask_as(self, dtype: torch.dtype) -> Tensor:
        """The attention mask in ``dtype``, converted once per forward pass (one object, so
        that layers with a shared input also share their mask)."""
        assert self._mask is not None
        if self._mask.dtype != dtype:
            self._mask = self._mask.to(dtype)
        return self._mask

    def forward(self, task: Task, inputs: Any) -> Tensor:
        """Run the model on ``inputs`` (recording); returns its outputs flattened to [B, C]."""
        self.records = {}
        self._inputs = {}
        self._mask = None
        self._model = task.model
        if self.mask_key is not None and isinstance(inputs, dict):
            m = inputs.get(self.mask_key)
            if isinstance(m, Tensor) and m.dim() == 2:
                self._mask = m.detach()
        self._batch, self._spans = _batch_shape(inputs, self._mask)
        with task.mixed_precision():
            return task.call_model(task.model, inputs)

    def activations(self, name: str) -> tuple[Tensor, Tensor | None]:
        """All recorded activations of layer ``name``: [B, T_total, cols] and the mask."""
        recs = self.records.get(name, [])
        if not recs:
            raise UnsupportedError(
                f"tracked module {name!r} was not called during the forward pass: either it "
                "takes no part in the outputs (then it has no gradient: freeze it, "
                "requires_grad=False), or a parent module applies its weight itself, without "
                "calling it, so its hooks never run (leave it out of modules=[...])"
            )
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
        grads: list[Tensor | None]
        if k == 1:
            grads = list(torch.autograd.grad(outputs, outs, grad_outputs[0], allow_unused=True))
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            try:
                # the graph is kept: a missing batching rule raises partway through (one that
                # PyTorch emulates by a loop warns instead: one notice per model)
                with batching_rule_notice(self._model):
                    grads = list(
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
                grads = [
                    None if columns[0][i] is None else torch.stack([c[i] for c in columns])
                    for i in range(len(outs))
                ]
        result: dict[str, list[Tensor]] = {}
        for (name, rec), g in zip(recs, grads):
            if g is None:
                g = torch.zeros(k, *rec.out.shape, dtype=rec.out.dtype, device=rec.out.device)
            result.setdefault(name, []).append(rec.to_tokens(g))
        return {
            n: parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            for n, parts in result.items()
        }

    def loss_gradients(self, outputs: Tensor, losses: Tensor) -> dict[str, Tensor]:
        """Pre-activation gradients of ``losses.sum()``: name -> Ds [1, B, T, d_out]."""
        # frees only the loss's part of the graph, between the losses and the outputs
        g = torch.autograd.grad(losses.sum(), outputs)[0]
        return self.backprop(outputs, g.unsqueeze(0))


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
    task = engine.task
    inputs, targets = engine.prepare(batch)
    with Capture(tracked, mask_key) as cap, evaluation_mode(task.model), torch.enable_grad():
        out = cap.forward(task, inputs)
        check_finite_rows(out.detach(), batch, "model output")
        values = (
            task.checked_loss(out, targets)
            if which == "loss"
            else task.checked_measurement(out, targets)
        )
        Ds = cap.loss_gradients(out, values)
        return {t.name: (cap.activations(t.name)[0], Ds[t.name][0].detach()) for t in tracked}


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


def block_gradient(a: Tensor, ds: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """One layer's per-example block gradients ``G_j = sum_t Ds_jt a_jt^T`` from its terms
    ``a`` [B, T, cols] and ``Ds`` [B, T, d_out]: [B, d_out, cols] in ``dtype``."""
    return torch.einsum("bto,bti->boi", ds.to(dtype), a.to(dtype))


def block_gradients(terms: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Per-example block gradients ``sum_t Ds_t a_t^T``: name -> [B, d_out, cols] float64."""
    return {name: block_gradient(a, ds) for name, (a, ds) in terms.items()}
