"""The example a failed pass over the data came from, named.

The checks before the passes (:mod:`infkit.example_checks`) call the model and the task on
example 0 and a partner only; a model or a loss that fails on a later example (a token id
outside an embedding, a label a loss of one's own refuses, 1-D inputs a batch cannot take)
raises PyTorch's own error from somewhere inside a pass. :func:`naming_failures` and
:func:`located_failure` run the set again, forward and loss only, to name the example (or the
batch) in an :class:`~infkit.errors.InvalidInputError`, the original chained; errors of the
machine (out of memory, a device's) go on as they were raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from infkit.data import WHOLE_BATCH, Batch, ExampleSet, leaves
from infkit.errors import InfkitError, InvalidInputError, ProcessesUnreachableError
from infkit.gradients import PerExample, error_summary
from infkit.parameters import evaluation_mode

#: the examples one forward pass takes at most while :func:`located_failure` looks for the
#: example a pass failed on (fewer where the run's own batches are smaller)
LOCATING_BATCH = 64

#: the examples of a set :func:`located_failure` reads at most (a failure past them is left
#: as it was raised: a reviewer's failed call read 20,000 training rows before it said so)
LOCATING_LIMIT = 4096

#: what a model or a loss of the user's raises on data it cannot take (PyTorch's own included)
CALL_ERRORS = (RuntimeError, TypeError, IndexError, ValueError, KeyError)

#: errors of the machine, not of an example: out of memory (a batch larger than the run's
#: fails where the run's did not), and an accelerator's error, which every later call on the
#: device raises again (a device-side assert would have named example 0)
MACHINE_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,) + (
    (torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()
)


def clause(summary: str) -> str:
    """An :func:`~infkit.gradients.error_summary` without its closing full stop (a sentence
    follows it), keeping the " ..." of one cut short."""
    return summary[:-1] if summary.endswith(".") and not summary.endswith("...") else summary


def _of_the_machine(error: BaseException) -> bool:
    """Whether ``error`` is the machine's (:data:`MACHINE_ERRORS`, or a CUDA error by its
    words), which no example of the data explains."""
    return isinstance(error, MACHINE_ERRORS) or "CUDA error" in str(error)


def from_an_example(error: BaseException) -> bool:
    """Whether a failure of a pass may come from one of its examples, to be named
    (:func:`located_failure`): a call's error, not infkit's own, which says what it means, but
    for a process whose sum another one left, stopped first (where its batch fails here too, a
    model raising on an example, that example is named on this process as well)."""
    return not isinstance(error, InfkitError) or isinstance(error, ProcessesUnreachableError)


@contextlib.contextmanager
def naming_failures(
    engine: PerExample,
    examples: ExampleSet,
    measured: bool = False,
    batch_size: int = LOCATING_BATCH,
) -> Iterator[None]:
    """Name the example a failure of the passes in the block came from
    (:func:`located_failure`), or let the failure go on as it was."""
    try:
        yield
    except (InfkitError, *CALL_ERRORS) as error:
        if not from_an_example(error):
            raise
        named = located_failure(engine, error, [(examples, measured)], batch_size)
        if named is None:
            raise
        raise named from error


def located_failure(
    engine: PerExample,
    error: BaseException,
    sets: Sequence[tuple[ExampleSet, bool]],
    batch_size: int = LOCATING_BATCH,
) -> InvalidInputError | None:
    """The error naming the example ``error`` (raised by a pass over ``sets``, each with
    whether it is read through the measurement) came from, or None where none fails alone.

    The checks before the passes call the model and the task on example 0 (and a partner) only:
    a tester's token id outside the embedding's range at example 7, a loss refusing example
    7's label and 1-D inputs a batch of two cannot take met PyTorch's raw errors from somewhere
    in a pass. Each set is run again, forward and loss (measurement) only, in batches of at most
    ``batch_size`` (the run's: a larger one may fail where the run's did not) over its first
    :data:`LOCATING_LIMIT` examples, and example by example in the batch that fails
    (:func:`_failing_example`); the cost falls on a failed call only. An error of the machine
    (out of memory, a CUDA error: :func:`_of_the_machine`), whether raised or met on the way,
    is left as it was."""
    if _of_the_machine(error):
        return None
    for examples, measured in sets:
        found = _failing_example(engine, examples, measured, min(batch_size, LOCATING_BATCH))
        if found is not None and _of_the_machine(found[1]):
            return None
        if found is not None:
            where, culprit, advice = found
            what = "measurement" if measured else "loss"
            return InvalidInputError(
                f"the model or the task's {what} failed on {where}: "
                f"{clause(error_summary(culprit))}. {advice}"
            )
    return None


def _failing_example(
    engine: PerExample, examples: ExampleSet, measured: bool, batch_size: int
) -> tuple[str, BaseException, str] | None:
    """The first example (or batch) of ``examples`` that the model's forward pass and the
    task's loss (measurement) fail on, with the error and a hint; None where every batch of
    ``batch_size`` passes. One forward pass over the set's first :data:`LOCATING_LIMIT`
    examples at most, and one per example of the failing batch."""
    task = engine.task

    def attempt(batch: Batch) -> BaseException | None:
        try:
            with torch.no_grad():
                inputs, targets = engine.prepare(batch)
                with evaluation_mode(task.model):
                    outputs = engine.call(engine.params(), inputs)
                (task.checked_measurement if measured else task.checked_loss)(outputs, targets)
        except InfkitError:
            return None  # (a problem infkit names itself: not the failure looked for)
        except CALL_ERRORS as error:
            return error
        return None

    read = torch.arange(min(len(examples), LOCATING_LIMIT))
    for batch in examples.batches(batch_size, read):
        failed = attempt(batch)
        if failed is None:
            continue
        if _of_the_machine(failed):
            return "", failed, ""
        for k in range(len(batch)):
            alone = attempt(batch.rows([k]))
            if alone is not None:
                return (
                    f"{examples.name} {batch.example(k)}",
                    alone,
                    "The checks before the passes read example 0 only: fix or drop that example",
                )
        where = f"a batch of {examples.name} {batch.example(WHOLE_BATCH)} (each alone passes)"
        if all(t.dim() == 1 for t in leaves(batch.inputs)):  # [B]: an example is a number
            return (
                where,
                failed,
                (
                    "Each example's input is a single number (the data is 1-D, [N]): give it as "
                    "[N, 1] (X.reshape(-1, 1)) where the model takes one feature"
                ),
            )
        return where, failed, "The model mixes or misreads a batch of examples"
    return None
