"""One infkit computation at a time in a process.

A pass over the data changes the model it reads while it runs: it puts the model in evaluation
mode and back, hooks the tracked layers, takes gradients through ``torch.func`` transforms whose
levels PyTorch keeps for the whole process, and the :class:`~infkit.influence.Influence` it
answers for counts its nested questions. Two threads asking an ``Influence`` (or two of them
sharing a model) at once broke each other's passes: on a 64-16-10 MLP, four threads asking the
same ``scores`` five times gave `cg` scores wrong in 10 of 20 answers and `exact` in 2, with no
error, and `identity` raised PyTorch's errors from inside its hooks.

:func:`one_at_a_time` makes every such entry point take one lock of the process, re-entrant, so
that a question asking another (``top_k`` asks ``scores``) goes on and a second thread waits
for the first's answer. The functions outside the facade that pass over a model take it too
(``train_to_optimum``, the retrainings, ``empirical_ntk``, ``linearizability``: a reviewer's
``linearizability`` beside a thread's ``cg`` scores failed 231 times). A forked child starts
with a lock of its own. Threads then give the same answers as one thread, one after the other,
not faster; processes are the way to run in parallel (docs/distributed.md).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")

PROCESS_LOCK = threading.RLock()
"""Held by a thread while it runs an infkit computation that passes over a model."""


def _fresh_lock() -> None:
    """A forked child's own lock: the parent's, copied while another of its threads held it,
    would stay held in the child, whose first infkit call then waited for ever (a reviewer's)."""
    global PROCESS_LOCK
    PROCESS_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_fresh_lock)


def one_at_a_time(call: Callable[_P, _R]) -> Callable[_P, _R]:
    """``call`` run under :data:`PROCESS_LOCK`: a thread calling it while another thread runs
    an infkit computation waits for that one to end."""

    @functools.wraps(call)
    def serialised(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with PROCESS_LOCK:
            return call(*args, **kwargs)

    return serialised
