"""What a set of examples notes of each example's content at its first read, to check every
later read against: data changed after ``fit`` is read by the later passes (scoring, a removal,
a save), which would mix the fitted curvature and cached gradients of the old data with the new
data, and commit the mixture to a workdir under the old data's key (a tester's 300 training rows
reordered after fit: scores 87% off, with no word, and a later run on the restored data served
the same wrong scores from the workdir).

Each tensor of an example gets two notes:

* ``exact``: a weighted sum of its bytes, ``sum_j w_j b_j`` in int64 with fixed weights
  ``w_j`` in [1, 2^20] (no overflow below 2^35 bytes an example, and the same whatever the
  batch): any change of a byte changes it, reordered examples move it;
* ``rough``: ``sum_j v_j x_j`` and ``sum_j |v_j x_j|`` in float64 for a floating-point tensor,
  ``v_j`` fixed in [-1, 1]: compared within a relative 1e-5, as a dataset computing features
  on the fly may round its last bits otherwise from read to read (infkit's check that a dataset
  reads alike allows that much).

Tensors read from a set given as tensors are compared exactly, those a dataset's
``__getitem__`` makes roughly (integer ones, token ids and labels, exactly).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: the relative difference of ``rough`` notes within which a float tensor reads the same
ROUGH_TOLERANCE = 1e-5


@functools.cache
def _byte_weights(count: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(count)
    return torch.randint(1, 2**20, (count,), generator=generator, dtype=torch.int64).to(device)


@functools.cache
def _value_weights(count: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(count + 1)
    weights = torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1
    return weights.to(device)


def notes(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(exact [B, L] int64, rough [B, L, 2] float64)`` of the L tensors ``[B, ...]`` of a
    batch, on the CPU (``rough`` is 0 for a tensor that is not floating-point)."""
    b = tensors[0].shape[0] if tensors else 0
    exact = torch.zeros(b, len(tensors), dtype=torch.int64)
    rough = torch.zeros(b, len(tensors), 2, dtype=torch.float64)
    for k, tensor in enumerate(tensors):
        rows = tensor.detach().reshape(b, -1)
        if rows.is_complex():
            rows = torch.view_as_real(rows).reshape(b, -1)
        raw = rows.contiguous().view(torch.uint8) if rows.dtype != torch.uint8 else rows
        weights = _byte_weights(raw.shape[1], raw.device)
        exact[:, k] = (raw.to(torch.int64) * weights).sum(dim=1).cpu()
        if rows.is_floating_point():
            values = rows.to(torch.float64) * _value_weights(rows.shape[1], rows.device)
            rough[:, k, 0] = values.sum(dim=1).cpu()
            rough[:, k, 1] = values.abs().sum(dim=1).cpu()
    return exact, rough


def differ(
    first: tuple[Tensor, Tensor], again: tuple[Tensor, Tensor], floats: Tensor, exactly: bool
) -> Tensor:
    """Which rows of ``again`` (notes of the same examples read anew) differ from ``first``:
    ``[B]`` bool. ``floats`` [L] says which tensors are floating-point; with ``exactly`` they
    compare by their bytes too, else within :data:`ROUGH_TOLERANCE`."""
    if exactly:
        return (first[0] != again[0]).any(dim=1)
    moved = (first[0] != again[0]) & ~floats  # integer tensors: their bytes
    gap = (first[1][..., 0] - again[1][..., 0]).abs()
    scale = torch.maximum(first[1][..., 1], again[1][..., 1])
    both_nan = first[1][..., 0].isnan() & again[1][..., 0].isnan()
    rough = (~(gap <= ROUGH_TOLERANCE * scale) & ~both_nan) & floats
    return (moved | rough).any(dim=1)
