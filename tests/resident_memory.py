"""A process's resident memory, read from /proc (Linux), and a fresh Python process to measure
a run in: the memory tests' children import this module (``run_child`` puts this folder on
their path), so that a peak is the run's alone, not the test runner's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: whether this system has /proc's memory figures (the memory tests skip otherwise)
READS_PROC = Path("/proc/self/statm").exists()


def resident() -> int:
    """Bytes resident now (/proc/self/statm's second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water() -> int:
    """The process's peak resident bytes (VmHWM: its own high-water mark; getrusage's ru_maxrss
    would also hold the parent's, forked before the exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def run_child(code: str, *args: str, timeout: int = 300) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process (one thread, this folder on its path) with
    ``args`` and return the JSON object its last line of output prints."""
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
