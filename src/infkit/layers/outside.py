"""Uses of a tracked layer's weight outside the layer's own calls, found in the autograd graph
of a forward pass.

The hooks of a tracked layer see the layer's calls only. A forward pass that also applies the
weight itself (``F.linear(h, layer.weight.t())``, a parent module multiplying by it, a fused
kernel's ``autograd.Function`` taking it) gives the weight gradient terms no hook sees: the
Kronecker factors and the per-example gradients taken from the hooks miss them. Comparing the
hooks' gradient with autograd's on a few examples finds such a use only where those examples
exercise it; a use gated by the data (an input feature that is 0 on the first examples) went
unseen, and the scores taken from the hooks were 34% off (a tester's).

:func:`uses_outside_calls` finds the use itself, whatever values flow through it. Each call of
a layer makes the autograd nodes that take its weight and bias (found when the call returns,
between its output and its inputs); in the loss's graph, a node taking them that no call made is
a use outside the layer. Only uses on the loss's graph count: a weight read for logging
(``self.a.weight.norm().item()``) adds no gradient term (a first version, a watch of torch
functions, refused it, and missed a custom ``autograd.Function``, whose inner operations run
without gradients; a second, counting the calls against the nodes, took a call whose output is
later changed in place for no call, and refused it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from infkit.data import leaves
from infkit.layers.tracked import TrackedModule

#: nodes a call's own search visits at most, from its output towards its inputs
CALL_NODES = 256


def _children(node: object) -> Iterator[object]:
    """The nodes an autograd node passes gradients to."""
    for child, _ in getattr(node, "next_functions", ()):
        if child is not None:
            yield child


def _takers(
    start: object, owners: dict[int, str], stop: set[int], limit: int = CALL_NODES
) -> Iterator[tuple[object, int]]:
    """(node, tensor id) for the nodes from ``start`` that take a tensor of ``owners`` (the
    parents of its ``AccumulateGrad``), not going past the nodes in ``stop`` (a call's inputs)
    nor beyond ``limit`` nodes."""
    seen = {id(start)}
    kept = [start]  # (every node visited stays alive: its id is not reused meanwhile)
    stack = [start]
    while stack and len(seen) <= limit:
        node = stack.pop()
        for child in _children(node):
            variable = getattr(child, "variable", None)  # an AccumulateGrad: a leaf tensor
            if variable is not None:
                if id(variable) in owners:
                    yield node, id(variable)
                continue
            if id(child) not in seen and id(child) not in stop:
                seen.add(id(child))
                kept.append(child)
                stack.append(child)


def uses_outside_calls(
    model: nn.Module, layers: Sequence[TrackedModule], forward: Callable[[], Tensor]
) -> dict[str, str]:
    """Run ``forward()`` (a forward pass of ``model`` and its loss, a tensor) and return, for
    each of ``layers`` whose weight or bias a node of the loss's graph takes that none of the
    layer's calls made, how many such nodes and which (``{"a": "1 use in the loss's graph
    beside 1 call: TBackward0"}``).

    Not seen: a use that Python control flow skips on the examples of this pass (an ``if`` on
    the data); one that shares a node with a call of the layer (a view of the weight taken once
    and used by the layer and beside it; autocast's cached cast of the weight, so run it outside
    autocast); one upstream of a layer given its input inside another structure than tuples,
    lists, dicts and keywords (the search of the call's own nodes stops at its inputs). A layer whose
    calls made no node (a compiled module,
    whose graph node takes every weight) is left to the check of calls.
    """
    params = dict(model.named_parameters())
    owners = {id(params[n]): t.name for t in layers for n in (t.weight, t.bias) if n is not None}
    own: set[int] = set()  # ids of the nodes the calls made (held alive in ``held``)
    held: list[object] = []
    calls = dict.fromkeys((t.name for t in layers), 0)

    def recording(name: str, tensors: set[int]) -> Callable[..., None]:
        def left(_module: object, args: object, kwargs: dict[str, object], output: object) -> None:
            stop = {id(t.grad_fn) for t in leaves((args, kwargs)) if t.grad_fn is not None}
            for out in leaves(output):
                if out.grad_fn is None:
                    continue
                made = [node for node, key in _takers(out.grad_fn, owners, stop) if key in tensors]
                if made:
                    calls[name] += 1
                held.extend(made)
                own.update(id(node) for node in made)

        return left

    handles = []
    for t in layers:
        tensors = {id(params[n]) for n in (t.weight, t.bias) if n is not None}
        hook = recording(t.name, tensors)
        handles.append(t.module.register_forward_hook(hook, with_kwargs=True))
    try:
        loss = forward()
    finally:
        for handle in handles:
            handle.remove()
    if loss.grad_fn is None:
        return {}
    beside: dict[str, list[object]] = {}
    for node, key in _takers(loss.grad_fn, owners, set(), limit=1 << 62):
        name = owners[key]
        if id(node) not in own and calls[name]:
            beside.setdefault(name, []).append(node)
    found = {}
    for name, nodes in beside.items():
        distinct = {id(node): node for node in nodes}
        kinds = ", ".join(sorted({type(node).__name__ for node in distinct.values()}))
        count = len(distinct)
        found[name] = (
            f"{count} use{'s' * (count != 1)} in the loss's graph beside "
            f"{calls[name]} call{'s' * (calls[name] != 1)}: {kinds}"
        )
    return found
