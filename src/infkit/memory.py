"""Memory limits and sizes: how much dense objects may take, how to print a byte count, and
giving freed memory back to the system (large blocks as they are freed, the rest between the
stages of a run)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from collections.abc import Callable

#: bytes of one float64, the working precision of the dense linear algebra
FLOAT64_BYTES = 8


def default_memory_limit() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def batch_output_bytes(batch_size: int, outputs: int, itemsize: int) -> int:
    """A batch's outputs and their gradients while a pass runs the model on ``batch_size``
    examples of ``outputs`` outputs each (C: T x V for a language model): the ``[B, C]``
    outputs in the model's precision (``itemsize`` bytes) and three float32 copies (the
    loss's log-probabilities, kept for the backward pass, their gradient and the outputs'),
    which a language model's vocabulary makes large (a batch of 8 sequences of 256 tokens over
    32,000 words: 1.0 GiB, where a tester's run rose 1.03 GiB). The model's own activations
    beside them are not counted."""
    return batch_size * outputs * (itemsize + 3 * 4)


#: the share of ``memory_limit`` a batch's outputs may take in the passes whose batches infkit
#: chooses (:func:`output_rows`)
OUTPUT_SHARE = 4


def output_rows(batch_size: int, outputs: int, itemsize: int, memory_limit: int) -> int:
    """Examples a batch of a pass whose batches infkit chooses (the post-fit checks, the
    training gradients' and the objective's passes): ``batch_size``, lowered so that the
    batch's outputs and their gradients (:func:`batch_output_bytes`) take at most
    1/:data:`OUTPUT_SHARE` of ``memory_limit``; at least 1."""
    per_example = batch_output_bytes(1, outputs, itemsize)
    return max(1, min(batch_size, memory_limit // OUTPUT_SHARE // max(per_example, 1)))


def bounded(memory_limit: int) -> bool:
    """Whether ``memory_limit`` is tighter than :func:`default_memory_limit`: the user bounds
    memory, and a run trades some time for keeping to it (:func:`map_large_allocations`, EK-FAC
    reading its eigenbases back from disk in the eigenvalue pass)."""
    return memory_limit < default_memory_limit()


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` (glibc's ``malloc_trim``, ``mallopt``), or None where
    the C library has none (musl has no ``malloc_trim``; macOS, Windows)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


#: allocations of at least this many bytes get pages of their own (see map_large_allocations)
MAPPED_ALLOCATION_BYTES = 1 << 20
#: glibc's mallopt parameter number of the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3


@functools.cache
def map_large_allocations() -> bool:
    """Serve every allocation of at least :data:`MAPPED_ALLOCATION_BYTES` from pages of its
    own, handed back to the system when it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``);
    True where this was set.

    glibc raises its threshold each time a mapped block is freed, up to 32 MiB, after which a
    pass's activations and gradients (a few MiB each) come from the heap, whose holes the next
    batch's tensors of other sizes do not fit: the process grows with every batch of a pass
    beyond its live objects. On a 50M-parameter language model (EK-FAC, batch 8 x 128 tokens)
    the eigenvalue pass peaked at 2.99 GiB resident with the default and at 2.36 GiB with the
    threshold fixed (a ``malloc_trim`` after every batch: 2.82 GiB).

    The price is a page fault for every page of every such block, which the heap would have
    reused: on that model one plain forward and backward batch took 3.3 against 2.2 s, and the
    fit 104 against 85 s. So it is set only where the user bounds memory: when an
    :class:`~infkit.Influence` is made with a ``memory_limit`` below the default (half the
    machine's memory).

    Process-wide and once per process. Left alone where the user has set the threshold
    (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``'s ``glibc.malloc.mmap_threshold``), which
    is also how to opt out, and on other C libraries.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MAPPED_ALLOCATION_BYTES))


def release_freed_memory() -> None:
    """Give the pages of freed memory back to the system (glibc's ``malloc_trim``; nothing
    elsewhere).

    The C allocator keeps what a pass freed for its own reuse: after a pass over the data, whose
    batches allocate and free the same sizes over and over, the process holds hundreds of MB that
    nothing uses (on a 10M-parameter language model, 1.4 GiB resident for 0.4 GiB of live
    tensors), and the next stage's objects are placed around them instead of in them. Called
    between stages (a few milliseconds), so that the peak is the live objects', not the passes'
    leftovers.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    if n >= 1024 ** len(units):  # beyond any machine: say it in powers of ten
        return f"{n / 1024 ** (len(units) - 1):.3g} {units[-1]}"
    return f"{n / 1024**k:.1f} {units[k]}"


#: a chunk's temporaries may take this share of the output they fill ...
CHUNK_SHARE = 0.1
#: ... or this many bytes when that is more (small outputs are not cut into tiny chunks) ...
CHUNK_MIN_BYTES = 32 << 20
#: ... and never more than this share of the memory limit
CHUNK_LIMIT_SHARE = 0.25


def row_chunks(
    rows: int, row_bytes: int, output_bytes: int, memory_limit: int, *, together: bool = False
) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges over ``rows`` whose temporaries (``row_bytes`` per row) take at
    most ``max(CHUNK_SHARE x output_bytes, CHUNK_MIN_BYTES)``, capped at a quarter of the
    limit; at least one row per chunk.

    ``together``: rows cost little more together than one alone (an iterative solve whose every
    step is a pass over the data, shared by all its right-hand sides), so chunks take up to the
    quarter of the limit.
    """
    budget = int(CHUNK_LIMIT_SHARE * memory_limit)
    if not together:
        budget = min(max(int(CHUNK_SHARE * output_bytes), CHUNK_MIN_BYTES), budget)
    step = max(1, min(rows, budget // max(row_bytes, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]
