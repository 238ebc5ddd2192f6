"""Exceptions that say what went wrong and what to do about it.

Every error raised on bad input derives from ``ValueError`` (or ``MemoryError`` for a problem
that is too large), so callers can catch the broad class while tests and users can match the
precise one.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InfkitError(Exception):
    """Base class of all infkit errors."""


class InvalidInputError(InfkitError, ValueError):
    """Training or test data that cannot be used as given (empty, wrong shape, wrong type)."""


class ConfigError(InvalidInputError):
    """A run configuration (``infkit run CONFIG.toml``) that cannot be used: an unknown or
    mistyped key, a missing section, a factory that cannot be imported or that raises."""


class NonFiniteError(InvalidInputError):
    """NaN or Inf in an input, an output, a loss or a gradient; the message names the example."""


class UnsupportedError(InfkitError, ValueError):
    """A method, estimator, option or combination that infkit does not compute."""


class CurvatureError(InfkitError, ValueError):
    """A curvature that cannot be inverted as asked: singular, indefinite, or nearly so."""


class ProblemTooLargeError(InfkitError, MemoryError):
    """A problem whose dense objects would not fit in the memory limit."""


class ArtifactError(InfkitError, ValueError):
    """An artifact on disk that cannot be used: damaged, incomplete, or made for another
    computation; the message names the file and says what to do. ``cause`` is the message
    without the library's remedy, for a caller that gives its own (``infkit run``)."""

    def __init__(self, message: str = "", cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = message if cause is None else cause


class ArtifactRemovedError(ArtifactError):
    """An artifact removed while it was read: another run sharing the directory committed what
    replaces it (EK-FAC's final factors replace their K-FAC stage), which the reader can use."""


class NotFittedError(InfkitError, RuntimeError):
    """A question asked of an ``Influence`` before ``fit``."""


class ProcessesUnreachableError(InfkitError, RuntimeError):
    """A collective call of a run across processes (torchrun) that could not reach the other
    processes: one of them stopped first (its own error says why) or exited, or a process asked
    alone. Where the pass it stopped would have failed here too, on an example of this
    process's data, that example is named instead."""


class Notice(UserWarning):
    """Something infkit decided for you that you may want to know (filter it to silence it)."""


class Suspicion(str):
    """A check's message about data that is most likely wrong but may be meant so (padding
    without a mask): the check's caller warns with it instead of raising."""


class NotConvergedWarning(UserWarning):
    """A retraining (the ground truth of leave-one-out, group removal or an LDS bank) stopped
    at its iteration limit short of the optimum, or the model it starts from is not at its own
    optimum: its changes are not ground truth."""


def listed(items: list[str], limit: int = 5) -> str:
    """``items`` joined for a message, the first ``limit`` of them and how many more."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue a warning attributed to the first caller outside infkit (the user's line).

    Warnings from deep inside a computation (a solver that did not converge, a fallback taken)
    then point at the call in the user's code that triggered them, wherever they were raised.
    Under ``torch.distributed`` the processes other than 0 prefix the message with
    ``"process r of K: "``: most warnings are process 0's again (the same computation on every
    process), but those of a pass's batches come from the process that read them, and only
    there, so none is held back (filter them by that prefix to keep process 0's alone).
    """
    other = _other_process()
    if other is not None:
        message = f"process {other[0]} of {other[1]}: {message}"
    package = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)  # the caller of warn(): stacklevel 2
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _other_process() -> tuple[int, int] | None:
    """``(rank, size)`` where this is a process other than 0 of an initialised default process
    group, else None."""
    import torch.distributed as dist  # (torch's import is not this module's to pay for)

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return None
    return dist.get_rank(), dist.get_world_size()


#: warning categories about code rather than results, which :func:`shown_warnings` leaves out
ABOUT_CODE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextmanager
def shown_warnings() -> Iterator[list[dict[str, str]]]:
    """Record the warnings shown during the block, each once, while still showing them.

    Yields a list that fills with ``{"category": ..., "message": ...}`` as warnings are shown:
    what the warning filters let through (a warning the user filters out is not recorded), so
    that a report can say what the console said about the results; warnings about code
    (:data:`ABOUT_CODE`: a library's deprecations) are shown but not recorded.
    """
    shown: list[dict[str, str]] = []
    with warnings.catch_warnings():  # restores showwarning on exit
        original = warnings.showwarning

        def record(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            entry = {"category": category.__name__, "message": str(message)}
            if not issubclass(category, ABOUT_CODE) and entry not in shown:
                shown.append(entry)
            original(message, category, *rest, **kw)

        warnings.showwarning = record
        yield shown
