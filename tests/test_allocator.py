"""The C allocator's mmap threshold fixed for a run under a memory_limit (``infkit.memory``): a
freed block of a MiB or more leaves the process's resident memory at once, where glibc's default
would keep it as a heap hole; without a limit, or with the user's own setting, glibc is left
alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infkit.memory import _libc_function

pytestmark = pytest.mark.skipif(_libc_function("mallopt") is None, reason="needs glibc's mallopt")

#: the child: after one 24 MiB block was freed (glibc's default threshold follows it up), eight
#: 2 MiB blocks are written and freed; prints what freeing them gave back, in MiB
CHILD = """
import json, os, sys, torch
from infkit.memory import map_large_allocations
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
applied = map_large_allocations() if sys.argv[1] == "map" else None
if sys.argv[1] in ("bounded", "unbounded"):  # an Influence with a tight memory_limit, or none
    import infkit
    from infkit.memory import default_memory_limit
    limit = default_memory_limit() // 2 if sys.argv[1] == "bounded" else None
    infkit.Influence(infkit.Task.classification(torch.nn.Linear(3, 2)), "exact", memory_limit=limit)
warm = torch.ones(6 << 20)  # 24 MiB
del warm
blocks = [torch.ones(1 << 19) for _ in range(8)]  # 8 x 2 MiB, every page written
before = resident()
del blocks
print(json.dumps({"applied": applied, "released_mib": (before - resident()) / (1 << 20)}))
"""


def _child(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_leave_resident_memory():
    mapped = _child("map")
    assert mapped["applied"] is True
    # 16 MiB freed: all of it returned, give or take a page of bookkeeping
    assert mapped["released_mib"] >= 15.0
    # the control: glibc's default kept them (threshold raised to 24 MiB by the warm block)
    assert _child("default")["released_mib"] <= 2.0


def test_set_where_the_user_bounds_memory():
    # a memory_limit below the default sets it; without one glibc keeps its own threshold,
    # which is faster (no page faults for the blocks the heap reuses)
    assert _child("bounded")["released_mib"] >= 15.0
    assert _child("unbounded")["released_mib"] <= 2.0


def test_the_users_own_setting_is_kept():
    # A threshold the user set turns glibc's dynamic thresholds off, the trim threshold's too
    # (left at 128 KiB): freed blocks at the top of the heap would then go back to the system or
    # not by where the child's other allocations fell. A trim threshold of 1 GiB beside it keeps
    # them in the heap, so only infkit's own threshold (1 MiB, mapped blocks) would return them.
    keep = 1 << 30
    kept = _child("map", MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(keep))
    assert kept["applied"] is False
    assert kept["released_mib"] <= 2.0  # the user's 64 MiB threshold, not infkit's 1 MiB
    tunables = f"glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold={keep}"
    tunable = _child("map", GLIBC_TUNABLES=tunables)
    assert tunable["applied"] is False
