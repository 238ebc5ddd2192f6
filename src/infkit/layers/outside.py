"""Uses of a tracked layer's weight outside the layer's own calls, found in the autograd graph
of a forward pass.

The hooks of a tracked layer see the layer's calls only. A forward pass that also applies the
weight itself (``F.linear(h, layer.weight.t())``, a parent module multiplying by it, a fused
kernel's ``autograd.Function`` taking it) gives the weight gradient terms no hook sees: the
Kronecker factors and the per-example gradients taken from the hooks miss them. Comparing the
hooks' gradient with autograd's on a few examples finds such a use only where those examples
exercise it; a use gated by the data (an input feature that is 0 on the first examples) went
unseen, and the scores taken from the hooks were 34% off (a tester's).

:func:`uses_outside_calls` finds the use itself, whatever values flow through it: in the
autograd graph of the loss, each call of a layer consumes its weight (and bias) once, so a
tensor consumed by more nodes than the layer had calls is used elsewhere too. Only uses on the
loss's graph count: a weight read for logging (``self.a.weight.norm().item()``) adds no
gradient term, and a first version that watched torch functions refused it (a reviewer's), while
it missed a custom ``autograd.Function``, whose inner operations run without gradients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from infkit.layers.tracked import TrackedModule


def uses_outside_calls(
    model: nn.Module, layers: Sequence[TrackedModule], forward: Callable[[], Tensor]
) -> dict[str, str]:
    """Run ``forward()`` (a forward pass of ``model`` and its loss, a tensor) and return, for
    each of ``layers`` whose weight or bias the loss's graph uses more often than the layer's
    calls on that graph (those whose output it reaches), how often and by which autograd nodes (``{"a": "2 uses in the loss's graph for 1
    call(s): TBackward0"}``).

    Not seen: a use that Python control flow skips on the examples of this pass (an ``if`` on
    the data); one that shares a node with a call of the layer (a view of the weight taken once
    and used by the layer and beside it; autocast's cached cast of the weight, so run it outside
    autocast).
    """
    params = dict(model.named_parameters())
    owners = {id(params[n]): t.name for t in layers for n in (t.weight, t.bias) if n is not None}
    # each call's output node (held: ids of live nodes only); a call whose output is not on
    # the loss's graph (detached, under no_grad) uses nothing there (a reviewer's detached
    # extra call hid a use outside)
    outputs: dict[str, list[object]] = {t.name: [] for t in layers}

    def recording(name: str) -> Callable[..., None]:
        def left(_module: object, _inputs: object, output: object) -> None:
            node = output.grad_fn if isinstance(output, Tensor) else None
            if node is not None:
                outputs[name].append(node)

        return left

    handles = [t.module.register_forward_hook(recording(t.name)) for t in layers]
    try:
        loss = forward()
    finally:
        for handle in handles:
            handle.remove()
    if loss.grad_fn is None:
        return {}
    consumers: dict[int, set[object]] = {}  # a tracked tensor's id -> the nodes that take it
    seen = {id(loss.grad_fn)}
    kept = [loss.grad_fn]  # (every node visited stays alive: its id is not reused)
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)  # an AccumulateGrad: a leaf tensor
            if variable is not None and id(variable) in owners:
                consumers.setdefault(id(variable), set()).add(node)
            if id(child) not in seen:
                seen.add(id(child))
                kept.append(child)
                stack.append(child)
    calls = Counter(
        {name: sum(id(node) in seen for node in nodes) for name, nodes in outputs.items()}
    )
    found: dict[str, str] = {}
    for key, nodes in consumers.items():
        name = owners[key]
        # (a layer its hooks never saw called on the graph is left to the check of calls,
        # Capture's: a compiled module's graph node takes every weight while hooks may not
        # run there)
        if 0 < calls[name] < len(nodes) and name not in found:
            kinds = ", ".join(sorted({type(node).__name__ for node in nodes}))
            found[name] = (
                f"{len(nodes)} uses in the loss's graph for {calls[name]} call(s): {kinds}"
            )
    return found
