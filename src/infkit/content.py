"""What a set of examples notes of each example's content at its first read, to check every
later read against: data changed after ``fit`` is read by the later passes (scoring, a removal,
a save), which would mix the fitted curvature and cached gradients of the old data with the new
data, and commit the mixture to a workdir under the old data's key (a tester's 300 training rows
reordered after fit: scores 87% off, with no word, and a later run on the restored data served
the same wrong scores from the workdir).

Each example gets two notes of its tensors:

* ``exact``: weighted sums of their bytes read as 64-bit words, ``sum_j w_j b_j`` modulo 2^64
  with fixed odd weights ``w_j`` (integer products and sums wrap alike in any order: the same
  whatever the batch), combined modulo a prime of 31 bits: any change of a byte changes it but
  once in 2^31, reordered examples move it;
* ``rough``: ``sum_j v_j x_j`` and ``sum_j |v_j x_j|`` in float64 over the floating-point
  tensors, ``v_j`` fixed in [-1, 1]: compared within a relative 1e-5, as a dataset computing
  features on the fly may round its last bits otherwise from read to read (infkit's check that
  a dataset reads alike allows that much).

Tensors read from a set given as tensors are all in ``exact``; a dataset's ``__getitem__``
makes its integer ones (token ids, labels) ``exact`` and its floating-point ones ``rough``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: the relative difference of ``rough`` notes within which a float tensor reads the same
ROUGH_TOLERANCE = 1e-5


@functools.cache
def _word_weights(count: int, device: torch.device) -> Tensor:
    """Odd int64 weights: a word's product with one is a bijection modulo 2^64."""
    generator = torch.Generator().manual_seed(count)
    drawn = torch.randint(0, 2**62, (count,), generator=generator, dtype=torch.int64)
    return (drawn * 2 + 1).to(device)


def _shifted(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` as a logical shift of int64 words (torch's is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


#: splitmix64's multipliers, as signed int64
_MIX_A = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_B = 0x94D049BB133111EB - (1 << 64)


def _scrambled(words: Tensor) -> Tensor:
    """Each int64 word through splitmix64's finaliser (products wrap modulo 2^64): a bit
    flipped anywhere changes the whole word, so that flips cannot cancel in a weighted sum (the
    sign bits of two float64 values did, a reviewer's: each flip added 2^63)."""
    x = words ^ _shifted(words, 30)
    x = x * _MIX_A
    x = x ^ _shifted(x, 27)
    x = x * _MIX_B
    return x ^ _shifted(x, 31)


def _words(rows: Tensor) -> Tensor:
    """The bytes of ``rows`` [B, k] as int64 words, [B, k'], the widest that divide a row."""
    raw = rows.contiguous()
    if raw.dtype == torch.bool:
        raw = raw.view(torch.uint8)
    size = raw.shape[1] * raw.element_size()
    for dtype, width in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1)):
        if size % width == 0:
            return (
                raw.view(torch.uint8).view(dtype).to(torch.int64) if size else raw.to(torch.int64)
            )
    raise AssertionError("a byte always divides")


@functools.cache
def _value_weights(count: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(count + 1)
    weights = torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1
    return weights.to(device)


#: the notes' modulus (a Mersenne prime): the leaves' sums combine into one number an example
#: without overflow (two different examples collide once in 2^31)
MODULUS = 2**31 - 1
#: the factor each further tensor's sum is combined with
MIX = 1_048_573


#: examples whose notes are taken at a time (a whole set read at once, a save's, held its
#: words' copy whole: a reviewer's 30 MiB of data took 481 MiB more)
CHUNK = 256


def notes(tensors: list[Tensor], exactly: bool) -> tuple[Tensor, Tensor | None]:
    """``(exact [B] int64, rough [B, F, 2] float64 or None)`` of the tensors ``[B, ...]`` of a
    batch, on the CPU: ``exact`` combines every integer tensor's byte sum (every tensor's, with
    ``exactly``), ``rough`` each of the F floating-point tensors' value sums otherwise (None
    without one). 8 bytes an example, 16 more a float tensor of a dataset's: a corpus of ten
    million sequences notes 80 MB. :data:`CHUNK` examples at a time."""
    b = tensors[0].shape[0] if tensors else 0
    if b > CHUNK:
        parts = [notes([t[s : s + CHUNK] for t in tensors], exactly) for s in range(0, b, CHUNK)]
        chunks = [p[1] for p in parts if p[1] is not None]
        return torch.cat([p[0] for p in parts]), torch.cat(chunks) if chunks else None
    exact = torch.zeros(b, dtype=torch.int64)
    roughs: list[Tensor] = []  # [B, 2] a float tensor: each on its own scale (a dataset's float
    # targets changed by 0.01 hid in its features' tolerance when they were summed together)
    for tensor in tensors:
        rows = tensor.detach().reshape(b, -1)
        if rows.is_complex():
            rows = torch.view_as_real(rows).reshape(b, -1)
        floating = rows.is_floating_point()
        if exactly or not floating:
            words = _scrambled(_words(rows))
            # (products and sums wrap modulo 2^64, whatever their order: exact, as a batch of
            # any size gives them)
            total = (words * _word_weights(words.shape[1], words.device)).sum(dim=1).cpu()
            exact = (exact * MIX + total % MODULUS + words.shape[1]) % MODULUS
        if floating and not exactly:
            values = rows.to(torch.float64) * _value_weights(rows.shape[1], rows.device)
            roughs.append(torch.stack([values.sum(dim=1), values.abs().sum(dim=1)], 1).cpu())
    return exact, torch.stack(roughs, 1) if roughs else None


def differ(first: tuple[Tensor, Tensor | None], again: tuple[Tensor, Tensor | None]) -> Tensor:
    """Which rows of ``again`` (notes of the same examples read anew) differ from ``first``:
    ``[B]`` bool; ``rough`` notes compare within :data:`ROUGH_TOLERANCE` (NaN as NaN)."""
    moved = first[0] != again[0]
    if first[1] is None or again[1] is None:
        return moved | ((first[1] is None) != (again[1] is None))
    if first[1].shape != again[1].shape:
        return torch.ones_like(moved)
    gap = (first[1][..., 0] - again[1][..., 0]).abs()
    scale = torch.maximum(first[1][..., 1], again[1][..., 1])
    both_nan = first[1][..., 0].isnan() & again[1][..., 0].isnan()
    return moved | (~(gap <= ROUGH_TOLERANCE * scale) & ~both_nan).any(dim=1)
