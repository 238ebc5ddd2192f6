"""Uses of a tracked layer's weight outside the layer's own calls, found by watching a forward
pass.

The hooks of a tracked layer see the layer's calls only. A forward pass that also applies the
weight itself (``F.linear(h, layer.weight.t())``, a parent module multiplying by it) gives the
weight gradient terms no hook sees: the Kronecker factors and the per-example gradients taken
from the hooks miss them. Comparing the hooks' gradient with autograd's on a few examples finds
such a use only where those examples exercise it; a use gated by the data (an input feature that
is 0 on the first examples) went unseen, and the scores taken from the hooks were 34% off
(a tester's). :func:`uses_outside_calls` finds the use itself: every torch function the forward
pass calls is watched (:class:`torch.overrides.TorchFunctionMode`), and one that takes a tracked
weight or bias while that layer's call is not running is a use outside it, whatever values
flow through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from infkit.layers.tracked import TrackedModule


def _leaves(value: Any) -> Iterator[Any]:
    """The values of nested tuples, lists and dicts of a call's arguments."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


class _Watch(TorchFunctionMode):
    """Notes the torch functions that take a watched parameter while its layer's call is not
    running and give a tensor that gradients flow through (a use under ``torch.no_grad()``,
    or a read of the weight's dtype, adds no gradient term)."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners  # id of a tracked weight or bias -> its layer's name
        self.running: list[str] = []  # the tracked layers whose call is under way
        self.found: dict[str, str] = {}  # layer -> the first function that used it outside

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # a use that gradients flow through: a tensor out that requires them (reading the
        # weight's dtype or device goes through here too, as a property's __get__)
        if torch.is_grad_enabled() and any(
            isinstance(value, torch.Tensor) and value.requires_grad for value in _leaves(result)
        ):
            for value in _leaves((args, kwargs)):
                layer = self.owners.get(id(value))
                if layer is not None and layer not in self.running and layer not in self.found:
                    self.found[layer] = getattr(func, "__name__", repr(func))
        return result


def uses_outside_calls(
    model: nn.Module, layers: Sequence[TrackedModule], forward: Callable[[], object]
) -> dict[str, str]:
    """Run ``forward()`` (a forward pass of ``model``, and its loss if wanted) and return, for
    each of ``layers`` whose weight or bias a torch function took outside the layer's own calls,
    that function's name (``{"a": "t"}`` for ``F.linear(h, self.a.weight.t())``).

    A use that Python control flow skips on the examples of this pass (``if`` on the data) is
    not seen; a use whose values are zero there is.
    """
    params = dict(model.named_parameters())
    owners = {id(params[n]): t.name for t in layers for n in (t.weight, t.bias) if n is not None}
    watch = _Watch(owners)

    def enter(name: str) -> Callable[..., None]:
        def entered(*_: object) -> None:
            watch.running.append(name)

        return entered

    def leave(name: str) -> Callable[..., None]:
        def left(*_: object) -> None:
            if name in watch.running:
                watch.running.remove(name)

        return left

    handles = []
    try:
        for t in layers:
            handles.append(t.module.register_forward_pre_hook(enter(t.name)))
            handles.append(t.module.register_forward_hook(leave(t.name), always_call=True))
        with watch:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return watch.found
