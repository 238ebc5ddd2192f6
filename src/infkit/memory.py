"""Memory limits and sizes: how much dense objects may take, how to print a byte count, and
giving freed memory back to the system between the stages of a run."""

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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


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
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
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
