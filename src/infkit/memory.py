"""Memory limits and sizes: how much dense objects may take, and how to print a byte count."""

from __future__ import annotations

import math
import os

#: bytes of one float64, the working precision of the dense linear algebra
FLOAT64_BYTES = 8


def default_memory_limit() -> int:
    """Half of the machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}"
