"""A buffer reused for a pass's large temporaries (:class:`ScratchSpace`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ScratchSpace:
    """One flat buffer reused for a temporary at a time (:meth:`view`; each view is valid until
    the next call).

    A batch's per-layer products made in it rather than each in an allocation of its own: an
    allocation above glibc's mmap threshold (32 MiB at most, or fixed lower under a
    ``memory_limit``, :func:`~infkit.memory.map_large_allocations`) maps fresh pages and faults
    each of them in, every time, and the blocks below it go to the heap, whose holes the other
    sizes do not fit.
    """

    def __init__(self) -> None:
        self._flat: Tensor | None = None

    def view(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device; its values are
        undefined. The buffer grows when ``shape`` does not fit it."""
        count = math.prod(shape)
        flat = self._flat
        if (
            flat is None
            or flat.numel() < count
            or flat.dtype != like.dtype
            or flat.device != like.device
        ):
            flat = self._flat = torch.empty(count, dtype=like.dtype, device=like.device)
        return flat[:count].view(shape)
