"""Gradient dot products of Linear models without per-example gradients.

When every trainable parameter belongs to an ``nn.Linear`` (or Hugging Face ``Conv1D``) layer
applied once per example to a plain [B, d_in] input, an example's gradient is ``delta_i a_i^T``
per layer (``a_i`` the layer input with a 1 appended for the bias, ``delta_i`` the gradient of
the scalar with respect to the layer output), so

    grad_t . grad_j = sum_layers (delta_t . delta_j) (a_t . a_j),

and test x train products are elementwise products of two small Gram matrices, from one hooked
forward/backward pass per batch: T N (d_in + d_out) work per layer instead of the T N d_in d_out
of per-example gradients. Norms and products with a fixed vector factor the same way
(``||grad_j||^2 = sum |delta_j|^2 |a_j|^2``, ``grad_j . w = sum delta_j^T W a_j``).
(docs/methods/identity.md §4)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import UnsupportedError
from infkit.gradients import GRADIENT_WORK_FACTOR, PerExample, Which
from infkit.layers.capture import layer_terms
from infkit.layers.outside import uses_outside_calls
from infkit.layers.tracked import BlockLayout, TrackedModule, find_modules
from infkit.parameters import ParameterSpace, evaluation_mode, product_dtype

#: layer kinds whose per-example gradient is one outer product delta a^T on a [B, d_in] input
FACTORED_KINDS = ("linear", "conv1d")
#: training examples on which the factors are checked against per-example gradients
CHECK_EXAMPLES = 4

#: per layer: (a [n, cols], delta [n, d_out]) of n examples, in the products' dtype
Factors = list[tuple[Tensor, Tensor]]


class NotFactoredError(Exception):
    """The factored products do not apply to this call: use per-example gradients."""


def factorable_layers(model: torch.nn.Module, space: ParameterSpace) -> list[TrackedModule] | None:
    """The layers of the factored products when every trainable parameter is the weight or
    bias of a layer in :data:`FACTORED_KINDS` (None otherwise): what :func:`factored_layers`
    requires before its check on examples, and what a plan can know without data."""
    try:
        tracked, others = find_modules(model, space)
    except UnsupportedError:  # tied weights
        return None
    if others or not tracked or any(t.kind not in FACTORED_KINDS for t in tracked):
        return None
    return tracked


def factored_row_bytes(layers: list[TrackedModule], itemsize: int) -> int:
    """Bytes of one example's factors (a [cols] and delta [d_out] per layer) at ``itemsize``."""
    return sum(t.cols + t.d_out for t in layers) * itemsize


def _used_outside_calls(engine: PerExample, tracked: list[TrackedModule], batch: Batch) -> bool:
    """Whether the forward pass and loss of ``batch`` take a weight of ``tracked`` outside
    its layer's call."""
    task = engine.task
    with evaluation_mode(task.model), torch.enable_grad():
        inputs, targets = engine.prepare(batch)
        found = uses_outside_calls(
            task.model,
            tracked,
            lambda: task.checked_loss(task.call_model(task.model, inputs), targets).sum(),
        )
    return bool(found)


def factored_layers(engine: PerExample, train: ExampleSet) -> list[TrackedModule] | None:
    """The layers of the factored gradient products, or None when they do not apply.

    They apply when every trainable parameter is the weight or bias of a layer in
    :data:`FACTORED_KINDS` called once per example on a [B, d_in] input, and the factored
    per-example gradients of the first :data:`CHECK_EXAMPLES` training examples, from one
    batched pass, equal the per-example gradients (within the dtype's precision): that catches
    layers used outside their module call and examples that interact within a batch. A layer's
    weight taken in the graph of those examples' loss by a node none of its calls made rules
    them out too, whatever values flow through that use there
    (:func:`~infkit.layers.outside.uses_outside_calls`: a use gated off on the first examples
    was unseen by the gradients, and the products 34% off).
    """
    space = engine.space
    tracked = factorable_layers(engine.task.model, space)
    if tracked is None:
        return None
    batch = train.take(range(min(CHECK_EXAMPLES, len(train))))
    if _used_outside_calls(engine, tracked, batch):
        return None
    try:
        terms = layer_terms(engine, tracked, batch, "loss")
    except (RuntimeError, UnsupportedError):
        # a tracked layer the forward pass does not call, or one applied to rows that do not
        # follow the examples (routing): per-example gradients, as docs/methods/identity.md
        # §4 says (a tester's unused layer and routed expert were refused instead)
        return None
    if any(a.shape[1] != 1 or d.shape[1] != 1 for a, d in terms.values()):
        return None  # several positions (tokens) per example
    G = engine.grads(batch, "loss")
    tol = min(1e-2, 10 * torch.finfo(G.dtype).eps ** 0.5) * float(G.abs().max())
    layout = BlockLayout(space, tracked, [])
    # layer by layer: one layer's [k, d_out, cols] block beside G at a time, not a second
    # [k, P] (on a 6.3M-parameter MLP the whole-vector check took 0.4 GiB)
    for t in tracked:
        a, d = terms[t.name]
        outer = (d[:, 0, :, None] * a[:, 0, None, :]).to(G.dtype)
        if not bool((outer.sub_(layout.block(G, t))).abs_().max() <= tol):
            return None
        del outer
    return tracked


def factored_check_bytes(layers: list[TrackedModule], parameters: int, itemsize: int) -> int:
    """The peak of :func:`factored_layers`' check beyond the model's pass: the per-example
    gradients [k, P] of its :data:`CHECK_EXAMPLES` examples with the vmapped backward's working
    memory (:data:`~infkit.gradients.GRADIENT_WORK_FACTOR` times their size), and one layer's
    outer products beside its block of them (two [k, d_out, cols] blocks of the largest
    layer)."""
    largest = max(t.d_out * t.cols for t in layers)
    return CHECK_EXAMPLES * itemsize * (GRADIENT_WORK_FACTOR * parameters + 2 * largest)


class FactoredGradients:
    """Per-layer factors of per-example gradients and the products built from them.

    Args:
        engine: the per-example engine.
        layers: the layers of :func:`factored_layers`.
        batch_size: examples per hooked pass.
    """

    def __init__(self, engine: PerExample, layers: list[TrackedModule], batch_size: int) -> None:
        self.engine = engine
        self.layers = layers
        self.batch_size = batch_size
        self.layout = BlockLayout(engine.space, layers, [])

    def factors(self, data: ExampleSet, which: Which) -> Iterator[tuple[Batch, Factors]]:
        """Per batch of ``data``: each layer's (a [B, cols], delta [B, d_out]) of ``which``.

        Raises NotFactoredError when an example has several positions (tokens), or a batch's
        pass skips a layer or routes rows that do not follow its examples (routing that the
        examples :func:`factored_layers` checked did not show: per-example gradients answer).
        """
        dtype = product_dtype(self.engine.space.dtype)
        for batch in data.batches(self.batch_size):
            try:
                terms = layer_terms(self.engine, self.layers, batch, which)
            except UnsupportedError as error:
                raise NotFactoredError from error
            parts = []
            for t in self.layers:
                a, d = terms[t.name]
                if a.shape[1] != 1 or d.shape[1] != 1:  # several positions per example
                    raise NotFactoredError
                parts.append((a[:, 0].to(dtype), d[:, 0].to(dtype)))
            yield batch, parts

    def all_factors(self, data: ExampleSet, which: Which) -> Factors:
        """The factors of every example of ``data``, concatenated per layer."""
        batches = [parts for _, parts in self.factors(data, which)]
        return [
            (torch.cat([p[k][0] for p in batches]), torch.cat([p[k][1] for p in batches]))
            for k in range(len(self.layers))
        ]

    @staticmethod
    def gram(left: Factors, right: Factors) -> Tensor:
        """grad_left . grad_right: sum over layers of (D_l D_r^T) * (A_l A_r^T), factor dtype."""
        total: Tensor | None = None
        for (a1, d1), (a2, d2) in zip(left, right):
            term = (d1 @ d2.T).mul_(a1 @ a2.T)
            total = term if total is None else total.add_(term)
        if total is None:
            raise NotFactoredError
        return total

    @staticmethod
    def squared_norms(parts: Factors) -> Tensor:
        """||grad_i||^2 = sum over layers of |delta_i|^2 |a_i|^2, [n] float64."""
        total = torch.zeros(parts[0][0].shape[0], dtype=torch.float64, device=parts[0][0].device)
        for a, d in parts:
            total += d.to(torch.float64).pow(2).sum(1) * a.to(torch.float64).pow(2).sum(1)
        return total

    @staticmethod
    def dots(parts: Factors, blocks: list[Tensor]) -> Tensor:
        """grad_i . w = sum over layers of delta_i^T W a_i, [n] float64 (blocks: W per layer)."""
        total = torch.zeros(parts[0][0].shape[0], dtype=torch.float64, device=parts[0][0].device)
        for (a, d), W in zip(parts, blocks):
            total += ((d.to(torch.float64) @ W) * a.to(torch.float64)).sum(1)
        return total

    def blocks(self, w: Tensor) -> list[Tensor]:
        """The augmented blocks [d_out, cols] of w [P] (float64), one per layer."""
        return [self.layout.block(w.unsqueeze(0), t)[0].to(torch.float64) for t in self.layers]
