"""Runs across processes: the default ``torch.distributed`` process group, when there is one.

The same script runs unchanged on one process or under ``torchrun --nproc_per_node=K`` (one
machine or many): the script, or its launcher, initialises the default process group
(``torch.distributed.init_process_group``), and infkit splits each pass over the training data
between the processes by batches (batch b, in the order of the training set, goes to process
``b mod K``), sums what the processes accumulated with an all-reduce, and gives every process the
whole result (docs/distributed.md). Without a process group, or with one process, nothing
changes. Sums across processes are taken in another order than one process's running sum, so
the results agree with a single process's to rounding (float64: about 1e-15 relative), not bit
for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import (
    InvalidInputError,
    Notice,
    ProcessesUnreachableError,
    warn,
)
from infkit.plan import dealt_examples
from infkit.store import canonical, differences

#: whether this process was told it runs alone under torchrun (one notice a process)
_TOLD_UNINITIALISED: list[bool] = []


def world() -> tuple[int, int]:
    """``(rank, size)`` of the default process group; ``(0, 1)`` when none is initialised.

    Under torchrun (``WORLD_SIZE`` above 1) without a process group, each process runs the
    whole problem alone: said once a process (a tester's script that never initialised the
    group ran twice the work with no speed-up and no word)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    started = os.environ.get("WORLD_SIZE", "1")
    if started.isdigit() and int(started) > 1 and not _TOLD_UNINITIALISED:
        _TOLD_UNINITIALISED.append(True)
        warn(
            f"torchrun started {started} processes (WORLD_SIZE={started}), but no process group "
            "is initialised: each process runs the whole problem alone, with no speed-up. Call "
            "torch.distributed.init_process_group() before infkit's calls to split the passes "
            "(docs/distributed.md §2)",
            Notice,
        )
    return 0, 1


def shard_batches(
    examples: ExampleSet, batch_size: int, indices: Tensor | None = None
) -> Iterator[tuple[int, Batch]]:
    """``(b, batch)`` for this process's batches of ``examples``: the b-th batch of
    ``batch_size`` consecutive examples (consecutive entries of ``indices``, when given), for
    every b with ``b mod size == rank``."""
    rank, size = world()
    order = torch.arange(len(examples)) if indices is None else indices
    for number, start in enumerate(range(0, len(order), batch_size)):
        if number % size == rank:
            yield number, examples.take(order[start : start + batch_size])


def batch_count(n: int, batch_size: int) -> int:
    """How many of the ``ceil(n / batch_size)`` batches this process takes."""
    rank, size = world()
    total = -(-n // batch_size)
    return len(range(rank, total, size))


def examples_in_batches(
    n: int, batch_size: int, rank: int | None = None, size: int | None = None
) -> int:
    """How many of the ``n`` examples the batches of process ``rank`` of ``size``
    (:func:`shard_batches`; default: this process of its group) hold. Rank 0 holds the most."""
    here, processes = world()
    rank = here if rank is None else rank
    size = processes if size is None else size
    return dealt_examples(n, batch_size, rank, size)


#: what to do where processes differ in whether they keep their factors in a store (the
#: Kronecker fit's and scoring calls' agreements)
STORE_HINT = "give every process a workdir (or factors_dir), or none"


def agree(
    what: str,
    identity: Mapping[str, Any],
    device: torch.device | None = None,
    hints: Mapping[str, str] | None = None,
) -> None:
    """Refuse, on every process alike, a computation whose processes would combine different
    things: ``identity`` (what the computation depends on: the model's and the data's
    fingerprints, the settings) is gathered from every process and compared with process 0's
    before the computation's first sum across them (nothing alone).

    Without it a process given other data, weights or settings (a damping, a batch size that
    splits the passes otherwise) adds its part to the others' without a word, and every
    process, a workdir's committed shards too, holds the wrong sum.

    Each process sends a 32-byte digest of its identity (on ``device`` under NCCL: the
    computation's, else the current CUDA device), the identities themselves only where the
    digests differ, to name the difference.

    ``hints``: what to do where a field differs (``{"factors_store": "give every process
    ..."}``), said beside the general remedy.

    Raises:
        InvalidInputError: a process's identity differs from process 0's; the message names
            the process and what differs.
        InfkitError: the backend could not reach the other processes (they have exited: gloo
            raises; NCCL may wait instead, to its watchdog's timeout).
    """
    rank, size = world()
    if size == 1:
        return
    text = canonical(dict(identity))
    digest = hashlib.sha256(text.encode()).digest()
    mine = torch.tensor(
        [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in range(0, 32, 8)],
        dtype=torch.int64,
    )
    if dist.get_backend() == "nccl":
        on = device if device is not None and device.type == "cuda" else None
        mine = mine.to(on or f"cuda:{torch.cuda.current_device()}")
    digests = [torch.empty_like(mine) for _ in range(size)]
    try:
        dist.all_gather(digests, mine)
    except RuntimeError as error:  # (DistBackendError among them)
        # (a tester's rank 0 asked top_k alone after the others had exited: gloo's
        # "Connection closed by peer ... GLHF!")
        raise _unreachable(what, error) from error
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, text)
    first = json.loads(gathered[0])
    for other, theirs in enumerate(gathered):
        if theirs == gathered[0]:
            continue
        fields = differences(first, json.loads(theirs))
        changed = ", ".join(fields) or "(the identity)"
        told = list(dict.fromkeys(hints[f] for f in fields if hints and f in hints))
        raise InvalidInputError(
            f"{what}: process {other} of {size} differs from process 0 in {changed}, so their "
            "sums would mix different computations. Every process must run the same script on "
            "the same model, training data (in the same order), queries and settings "
            f"(docs/distributed.md §2){''.join('; ' + t for t in told)}; this is process {rank}"
        )


def sum_across(*tensors: Tensor) -> None:
    """Replace each tensor by its sum over the processes, in place (nothing alone).

    NCCL reduces only CUDA tensors: a CPU tensor is reduced through a copy on this process's
    current CUDA device.
    """
    if world()[1] == 1:
        return
    nccl = dist.get_backend() == "nccl"
    try:
        for t in tensors:
            if nccl and t.device.type != "cuda":
                on_device = t.to(f"cuda:{torch.cuda.current_device()}")
                dist.all_reduce(on_device)
                t.copy_(on_device)
            else:
                dist.all_reduce(t)
    except RuntimeError as error:  # (DistBackendError among them)
        # (a tester's process 1 stopped at an example it could not take, named there; process
        # 0, waiting in this sum, met gloo's raw "Connection closed by peer", or the group's
        # timeout where process 1 went on)
        raise _unreachable("a sum over the processes' passes", error) from error


def _unreachable(what: str, error: BaseException) -> ProcessesUnreachableError:
    """The error of a process that a collective call could not join with the others."""
    rank, size = world()
    said = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return ProcessesUnreachableError(
        f"{what}: process {rank} of {size} could not reach the other processes ({said}). "
        "Another process stopped first (its own error, in its output, says why: an example it "
        "could not take, a refusal) or exited. Every call of a run across processes is "
        "collective: each process must make it, in the same order (docs/distributed.md §1); a "
        "process that asks alone, after the others have exited or while they wait elsewhere, "
        "is left alone. Write reports from the answers every process computed"
    )


def batch_seed(seed: int, stream: int, number: int) -> int:
    """The seed of the labels sampled for batch ``number`` of pass ``stream``: a function of the
    batch alone, so that any split of the batches between processes draws the same labels."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
