"""Scores of the Kronecker methods from layer hooks, one layer at a time, in the model's precision.

The per-example gradient of a tracked layer is ``G_j = sum_t Ds_jt a_jt^T`` [d_out, cols]: the
layer's input activations times its pre-activation gradients, both recorded by hooks during one
ordinary forward and backward pass of the batch (:mod:`infkit.layers.capture`); no per-example
gradient of the whole model, no vmap over it, nothing of size N x P. With the queries
preconditioned once, ``U_t = A^{-1} grad m_t`` blockwise in the Kronecker eigenbasis, the IF
score of training example j is (docs/methods/kfac.md §10)

    S[t, j] = (1/N) (sum_l <U_tl, G_jl> + l2 <U_t, theta - theta'>),

accumulated layer by layer over batches of training examples. Products run in
:func:`~infkit.parameters.product_dtype` of the model (float32 for float32 and bfloat16 models),
the rotations with the float64 eigenbases cast to it; sums over examples accumulate in float64.

The per-module and per-token scores (:meth:`StreamingScorer.add_module_scores`,
:meth:`StreamingScorer.add_token_scores`) are taken in the same passes, each layer's share, or each
position's term of it, kept apart instead of summed (docs/decompositions.md §1-2).

Under torchrun each process scores its share of the batches and the columns are summed across
processes (:mod:`infkit.distributed`); with a workdir the columns are committed in shards
(:mod:`infkit.shards`); ``among`` scores chosen training examples only.

The preconditioned queries get a budget (:func:`query_budget`); beyond it they are kept on disk
and read back layer by layer in one exact pass (:mod:`infkit.kfac.spill`, when the scorer has a
``scratch`` place), or else the scores are computed exactly in passes over groups of queries and
layers (:func:`plan_groups`). Only when one layer of
one query exceeds the budget, or with ``query_rank``, are they kept at rank r per query and layer
(``U_tl ~ L_tl R_tl^T`` by SVD, the query batching of Grosse et al. 2023), and the score is
``sum_s (Ds_js^T L_tl)(R_tl^T a_js)``, never forming G_j (:class:`LayerQueries`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.distributed import batch_count, shard_batches, sum_across, world
from infkit.errors import InvalidInputError, Notice, ProblemTooLargeError, warn
from infkit.fitted import Fitted, warn_about_still_queries
from infkit.kfac.curvature import KroneckerCurvature
from infkit.kfac.spill import DiskBlocks
from infkit.layers.capture import (
    Call,
    block_gradient,
    block_inner,
    layer_terms,
    products_in_slabs,
    stream_block_gradients,
    stream_layer_terms,
)
from infkit.layers.tracked import TrackedModule
from infkit.linalg import wide_inner
from infkit.memory import batch_output_bytes, human_bytes, release_freed_memory
from infkit.parameters import product_dtype
from infkit.progress import Progress, track
from infkit.scratch import ScratchSpace
from infkit.shards import ScoreShards

_T = TypeVar("_T")


@dataclass
class LayerQueries:
    """Preconditioned query gradients ``U_t = A^{-1} grad m_t``, one entry per tracked layer.

    Attributes:
        full: name -> [T, d_out, cols] (layers kept at full rank).
        low_rank: name -> (L [T, d_out, r], R [T, cols, r]) with ``U_tl ~ L_tl R_tl^T``.
        shared: [T] float64, ``l2 <U_t, theta - theta'>``, the regulariser share of every score.
        rank: the rank of the low-rank layers (None: all at full rank).
        on_disk: the layers' full-rank blocks kept on disk instead of in ``full`` (None: none).
        shares: name -> [T] float64, each layer's part of ``shared`` (the per-module scores'
            regulariser shares; they sum to ``shared``); not in the :meth:`payload`, whose
            committed queries serve the scores, which take the sum only.
        kept: [T] float64, the least share of a low-rank layer's ``||U_tl||_F^2`` that rank
            keeps, per query (:func:`truncated_svd`); None where no layer is at low rank or
            the queries were read back from a payload.
    """

    full: dict[str, Tensor]
    low_rank: dict[str, tuple[Tensor, Tensor]]
    shared: Tensor
    rank: int | None
    on_disk: DiskBlocks | None = None
    shares: dict[str, Tensor] = field(default_factory=dict)
    kept: Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.shared.shape[0])

    def layers(self) -> set[str]:
        """The names of the layers these queries cover."""
        disk = set() if self.on_disk is None else set(self.on_disk.shapes)
        return set(self.full) | set(self.low_rank) | disk

    def close(self) -> None:
        """Remove the blocks kept on disk, if any."""
        if self.on_disk is not None:
            self.on_disk.close()

    def payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The queries as tensors and a JSON document (:meth:`from_payload` reads them)."""
        assert self.on_disk is None, "queries kept on disk are working files, not a payload"
        tensors = {"shared": self.shared}
        tensors.update({f"full::{name}": U for name, U in self.full.items()})
        for name, (L, R) in self.low_rank.items():
            tensors[f"L::{name}"], tensors[f"R::{name}"] = L, R
        document = {"rank": self.rank, "full": list(self.full), "low_rank": list(self.low_rank)}
        return tensors, document

    @classmethod
    def from_payload(
        cls, tensors: dict[str, Tensor], document: dict[str, Any], device: torch.device
    ) -> LayerQueries:
        def get(key: str) -> Tensor:
            return tensors[key].to(device)

        full = {name: get(f"full::{name}") for name in document["full"]}
        low = {name: (get(f"L::{name}"), get(f"R::{name}")) for name in document["low_rank"]}
        return cls(full, low, get("shared"), document["rank"])


#: the share of a query's preconditioned gradient (squared Frobenius norm, in every low-rank
#: layer) below which :meth:`StreamingScorer.queries` warns that the rank approximates it:
#: 99% keeps all but 10% of its norm
KEPT_ENERGY = 0.99


def kept_at_rank(t: TrackedModule, rank: int | None) -> bool:
    """Whether layer ``t``'s queries are kept at rank ``rank``: when the rank-r factors,
    ``r (d_out + cols)`` numbers, are smaller than its block (then r is below both sides)."""
    return rank is not None and rank * (t.d_out + t.cols) < t.d_out * t.cols


def truncated_svd(U: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U ~ L R^T`` per query by truncated SVD: L [T, d_out, r], R [T, cols, r], and the
    share of each query's ``||U||_F^2`` the rank keeps, [T] float64 (1 for a block of 0): how
    much of the preconditioned gradient the scores see. The SVD runs in U's precision, float32
    for a half-precision block (which ``torch.linalg.svd`` does not take): a float64 model's
    queries kept at rank r as ``batched_scores(rank=r)`` keeps them, not 1e-7 off."""
    work = U if U.dtype in (torch.float32, torch.float64) else U.to(torch.float32)
    left, values, right_t = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, values.shape[-1])
    L = left[..., :r] * values[..., None, :r]
    energy = values.to(torch.float64).square()
    total = energy.sum(-1)
    kept = torch.where(total > 0, energy[..., :r].sum(-1) / total.clamp_min(1e-300), 1.0)
    return L.to(U.dtype), right_t[..., :r, :].transpose(-1, -2).to(U.dtype), kept


def position_shares(
    queries: Tensor | tuple[Tensor, Tensor], a: Tensor, ds: Tensor, dtype: torch.dtype
) -> Tensor:
    """``<U_k, Ds_bs a_bs^T>`` [k, B, S] in ``dtype``: each position's term of a layer's share
    of the scores, for the layer's terms ``a`` [B, S, cols] and ``Ds`` [B, S, d_out] and its
    preconditioned queries, a block U [k, d_out, cols] or low-rank factors ``U_k = L_k R_k^T``
    (L [k, d_out, r], R [k, cols, r]).

    A block is applied to the positions a few queries at a time along its narrower side, so
    that the temporaries stay within a batch's block gradients (B x d_out x cols numbers).
    """
    ds, a = ds.to(dtype), a.to(dtype)
    if isinstance(queries, tuple):
        L, R = queries
        left = torch.einsum("bso,kor->kbsr", ds, L)
        return (left * torch.einsum("bsi,kir->kbsr", a, R)).sum(-1)
    U = queries.to(dtype)
    k, d_out, cols = U.shape
    B, S = ds.shape[0], ds.shape[1]
    flat_ds, flat_a = ds.reshape(B * S, d_out), a.reshape(B * S, cols)
    out = torch.empty(k, B * S, dtype=dtype, device=U.device)
    step = max(1, max(d_out, cols) // max(S, 1))
    for start in range(0, k, step):
        part = U[start : start + step]
        if cols <= d_out:  # (Ds U) [k, BS, cols], then against a
            out[start : start + step] = ((flat_ds @ part) * flat_a).sum(-1)
        else:  # (U a^T) [k, d_out, BS], then against Ds
            out[start : start + step] = ((part @ flat_a.T) * flat_ds.T).sum(-2)
    return out.view(k, B, S)


#: a scoring pass's working memory, as a multiple of one batch's hook terms (activations and output
#: gradients of every tracked layer) and largest gradient block: the terms, and as much again
#: for the autograd graph that produces them
WORKING_FACTOR = 2


def budget_after(limit: int, resident: int, hooks: int, block: int, outputs: int = 0) -> int:
    """Bytes left for the preconditioned queries: ``limit`` less the ``resident`` state (the
    factors) and a scoring pass's working memory (``WORKING_FACTOR`` x a batch's ``hooks``
    terms and largest gradient ``block``, and the batch's ``outputs`` with their gradients,
    :func:`~infkit.memory.batch_output_bytes`), at least 0. The run and its plan both use it."""
    return max(0, room_after(limit, resident, hooks, block, outputs))


def room_after(limit: int, resident: int, hooks: int, block: int, outputs: int = 0) -> int:
    """:func:`budget_after` before it is held at 0: negative by the bytes the limit lacks."""
    return limit - resident - WORKING_FACTOR * (hooks + block) - outputs


def factor_bytes(curvature: KroneckerCurvature) -> int:
    """Bytes of the fitted factors in memory (eigenbases shared by layers counted once)."""
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for f in curvature.factors.modules.values()
        for t in f.stored()
    }
    return sum(held.values())


def pass_working_bytes(
    fitted: Fitted, curvature: KroneckerCurvature, batch_size: int | None = None
) -> tuple[int, int]:
    """(hook terms, largest gradient block) of one training batch of ``batch_size`` examples
    (default the fit's), in bytes: the terms of a scoring pass's working memory
    (:func:`budget_after`) beside the batch's outputs (:func:`pass_output_bytes`)."""
    tracked = curvature.tracked
    item = product_dtype(fitted.space.dtype).itemsize
    # (a batch_size beyond the data fills none)
    size = min(fitted.batch_size if batch_size is None else batch_size, fitted.n)
    # each layer's positions: as many as its factor counted per example, at least as many as
    # the data's shape gives (padding the factor does not count; a signal's length it may)
    given = fitted.train.positions()
    hooks = size * sum(
        max(given, math.ceil(curvature.positions.get(t.name, 0.0))) * (t.d_out + t.cols)
        for t in tracked
    )
    block = size * max(t.d_out * t.cols for t in tracked)
    return hooks * item, block * item


def pass_output_bytes(fitted: Fitted, batch_size: int | None = None) -> int:
    """Bytes of one training batch's outputs and their gradients in a scoring pass, of
    ``batch_size`` examples (default the fit's): :func:`~infkit.memory.batch_output_bytes` of
    the model's outputs per example (C: T x V for a language model). The scoring passes'
    batches are infkit's to choose (:func:`smaller_batches`), so they count them: a tester's
    32,000-word Llama at a quarter of its unbounded peak scored 0.8% past the limit plus the
    model, by 250 MiB of logits and their gradients that its budget left out."""
    size = min(fitted.batch_size if batch_size is None else batch_size, fitted.n)
    outputs = math.prod(fitted.output_shape)
    return batch_output_bytes(size, outputs, fitted.space.dtype.itemsize)


def query_budget(
    fitted: Fitted, curvature: KroneckerCurvature, scores: int = 0, batch_size: int | None = None
) -> int:
    """Bytes the preconditioned queries may take in this fitted run (:func:`budget_after` of the
    fitted factors' and theta*'s bytes, the ``scores`` bytes of the result the call fills, and
    a scoring batch of ``batch_size`` examples, default the fit's, of the training set's
    sequence length)."""
    return max(0, query_room(fitted, curvature, scores, batch_size))


def query_room(
    fitted: Fitted, curvature: KroneckerCurvature, scores: int = 0, batch_size: int | None = None
) -> int:
    """:func:`query_budget` before it is held at 0: negative by the bytes memory_limit lacks
    for the factors, theta*, the result and a pass's working memory (a refusal's remedy adds
    them to the limit it names)."""
    return _room(fitted, curvature, scores, factor_bytes(curvature), batch_size)


def read_budget(
    fitted: Fitted, curvature: KroneckerCurvature, scores: int = 0, batch_size: int | None = None
) -> int:
    """Bytes the read buffer of queries kept on disk may take: :func:`query_budget`, without
    counting the factors when the curvature sets them aside during the scoring pass
    (:meth:`KroneckerCurvature.set_aside`), the one pass the buffer is read in."""
    factors = 0 if curvature.sets_aside else factor_bytes(curvature)
    return max(0, _room(fitted, curvature, scores, factors, batch_size))


def _room(
    fitted: Fitted,
    curvature: KroneckerCurvature,
    scores: int,
    factors: int,
    batch_size: int | None = None,
) -> int:
    # the factors (or none), the run's copy of theta* and the scores
    resident = factors + fitted.theta.numel() * fitted.theta.element_size() + scores
    working = pass_working_bytes(fitted, curvature, batch_size)
    outputs = pass_output_bytes(fitted, batch_size)
    return room_after(fitted.memory_limit, resident, *working, outputs)


def smaller_batches(batch_size: int) -> list[int]:
    """The scoring batch sizes tried, largest first, when ``memory_limit`` leaves no room for
    one query beside a scoring pass's working memory at ``batch_size`` (which grows with the
    batch: a 32,000-word Llama's batch of 8 sequences of 128 tokens takes 0.7 GiB, a tester's
    quarter of the unbounded peak): halved down to 1."""
    sizes = []
    size = batch_size
    while size > 1:
        size = -(-size // 2)
        sizes.append(size)
    return sizes


def preferred_batch(
    candidates: Iterable[_T], scores: Callable[[_T], bool], full_rank: Callable[[_T], bool]
) -> _T | None:
    """Of ``candidates`` (the scoring passes at :func:`smaller_batches`, largest first), the
    first that ``scores`` the queries at ``full_rank``, else the first that scores them at all;
    None where none does. The one rule of the run (:meth:`KFAC._scorer`) and of its plan, read
    lazily: no candidate is made past the first at full rank."""
    fallback = None
    for candidate in candidates:
        if not scores(candidate):
            continue
        if full_rank(candidate):
            return candidate
        if fallback is None:
            fallback = candidate
    return fallback


def query_batch_size(
    fitted: Fitted, curvature: KroneckerCurvature, batch_size: int | None = None
) -> int:
    """The batch size of the queries' pass: the scoring passes' (``batch_size``, default the
    fit's), less when the factors are set aside during the scoring pass
    (:meth:`KroneckerCurvature.set_aside`).

    The queries' pass is then the one stage that holds the factors and the preconditioned
    queries together; its batches are made smaller by the factors' share of a pass's working
    memory (:data:`WORKING_FACTOR` times :func:`pass_working_bytes`), so that its peak stays at
    the scoring pass's, down to a quarter of the batch size. It passes over the queries only: a
    few batches more cost little.
    """
    size = fitted.batch_size if batch_size is None else batch_size
    if not curvature.sets_aside:
        return size
    working = WORKING_FACTOR * sum(pass_working_bytes(fitted, curvature, size))
    spared = factor_bytes(curvature) / max(working, 1)
    # at most 4x more batches: factors as large as a pass's working memory (a large model
    # with small batches) would otherwise make the queries' pass one example at a time
    return max(1, size // 4, min(size, int(size * (1.0 - spared))))


@dataclass(frozen=True)
class CallResult:
    """The result a scoring call fills, held in memory beside its preconditioned queries: its
    bytes, which :func:`query_budget` takes from the queries' budget, and what it is, as a
    refusal names it (a per-module or per-token result is larger than the scores: a limit
    that scores the queries may not hold them), and how a call makes it smaller."""

    nbytes: int = 0
    what: str = "the scores"
    smaller: str = "ask for fewer queries a call"

    def __str__(self) -> str:
        return f"{self.what} ({human_bytes(self.nbytes)})"


#: queries [start, stop) and the indices of the tracked layers one scoring pass covers
Group = tuple[int, int, tuple[int, ...]]


def plan_groups(count: int, layer_bytes: list[int], budget: int | None) -> list[Group] | None:
    """Passes that score ``count`` queries exactly with their preconditioned gradients (one
    query's block of layer l takes ``layer_bytes[l]``) within ``budget`` bytes.

    Every query and layer at once when they fit; else groups of queries with every layer; else,
    when one query does not fit, groups of layers (packed in order) with as many queries as
    fit. Scores add over layers, so the passes' sums are the scores. None when one layer of
    one query exceeds the budget (then only a low rank fits).
    """
    everything = tuple(range(len(layer_bytes)))
    if budget is None or count * sum(layer_bytes) <= budget:
        return [(0, count, everything)]
    if max(layer_bytes) > budget:
        return None
    chunks: list[tuple[int, ...]] = []
    if sum(layer_bytes) <= budget:
        chunks = [everything]
    else:
        current: list[int] = []
        size = 0
        for i, b in enumerate(layer_bytes):
            if current and size + b > budget:
                chunks.append(tuple(current))
                current, size = [], 0
            current.append(i)
            size += b
        chunks.append(tuple(current))
    out: list[Group] = []
    for chunk in chunks:
        per = sum(layer_bytes[i] for i in chunk)
        step = max(1, min(count, budget // per))
        out += [(start, min(start + step, count), chunk) for start in range(0, count, step)]
    return out


def rank_bytes(tracked: list[TrackedModule], rank: int, itemsize: int) -> int:
    """Bytes of one query's preconditioned gradient with each of ``tracked`` kept at ``rank``
    (:func:`kept_at_rank`; a layer whose block is smaller kept whole)."""
    return itemsize * sum(
        rank * (t.d_out + t.cols) if kept_at_rank(t, rank) else t.d_out * t.cols for t in tracked
    )


def fixed_rank_groups(count: int, query_bytes: int, layers: int, budget: int) -> list[Group]:
    """Passes that score ``count`` queries of ``query_bytes`` each (at a rank asked for,
    ``query_rank``) within ``budget``: every query in one pass when they fit, else groups of as
    many as fit, every layer each; empty when not even one query fits (a tester's
    ``query_rank=2`` scored 8 queries in one pass at a limit that refused them without it)."""
    step = min(count, budget // max(query_bytes, 1))
    if step < 1:
        return []
    everything = tuple(range(layers))
    return [(start, min(start + step, count), everything) for start in range(0, count, step)]


def low_rank_groups(
    count: int, rank_one_bytes: int, layers: int, budget: int
) -> tuple[list[Group], int]:
    """Passes that score ``count`` queries kept at low rank (one layer of one query exceeds
    ``budget``; one query's rank-1 factors of every layer take ``rank_one_bytes``), and their
    rank, one for every pass: every query and layer in one pass at the largest rank that fits
    them all; when not even rank 1 of them all fits, passes over groups of as many queries as
    fit at rank 1, each at rank 1. Rank 0: not even one query fits at rank 1."""
    step = max(1, min(count, budget // max(rank_one_bytes, 1)))
    everything = tuple(range(layers))
    groups = [(start, min(start + step, count), everything) for start in range(0, count, step)]
    return groups, budget // max(step * rank_one_bytes, 1)


class StreamingScorer:
    """IF scores and self-scores of a Kronecker method, layer by layer from hooks.

    Args:
        fitted: the fitted record (its parameter space holds only tracked layers).
        curvature: the fitted Kronecker curvature.
        query_bytes: the budget for the preconditioned queries (:func:`query_budget`); beyond
            it the queries are scored in passes over groups of queries and layers
            (:meth:`groups`), and when one layer of one query does not fit, layers are kept at
            ``rank`` (or the largest rank that fits).
        rank: the rank of low-rank query layers (None: chosen to fit ``query_bytes``).
        scratch: makes a fresh directory for queries kept on disk (None: never on disk; else
            queries beyond the budget are kept there, :meth:`spills`, in place of groups).
        read_bytes: the budget of the read buffer of queries kept on disk
            (:func:`read_budget`; None: ``query_bytes``).
        result: the call's result, counted in both budgets (named when the budget refuses).
        batch_size: the examples of a batch of the scoring passes over the training data and
            of the queries' pass (None: the fit's); smaller where ``memory_limit`` leaves no
            room for one query beside a pass at the fit's (:func:`smaller_batches`). The
            scores do not depend on it (but for the rounding of sums over another split).
    """

    def __init__(
        self,
        fitted: Fitted,
        curvature: KroneckerCurvature,
        query_bytes: int,
        rank: int | None = None,
        scratch: Callable[[], Path] | None = None,
        read_bytes: int | None = None,
        result: CallResult | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.fitted = fitted
        self.batch_size = fitted.batch_size if batch_size is None else batch_size
        self.result = CallResult() if result is None else result
        self.curvature = curvature
        self.tracked = curvature.tracked
        self.dtype = product_dtype(fitted.space.dtype)
        self.query_bytes = query_bytes
        self.read_bytes = query_bytes if read_bytes is None else read_bytes
        self.rank = rank
        self.scratch = scratch
        self.mask_key = curvature.options.mask_key

    def _theta_blocks(self) -> dict[str, Tensor]:
        """``fitted.regularised_theta`` per layer block in the product dtype, for the l2
        share of the scores: nothing without l2 (a copy of the parameters spared)."""
        fitted = self.fitted
        if not fitted.l2:
            return {}
        theta = fitted.regularised_theta.unsqueeze(0)
        return {
            t.name: self.curvature.layers.layout.block(theta, t)[0].to(self.dtype)
            for t in self.tracked
        }

    # ------------------------------------------------------------------ queries
    def groups(self, count: int) -> list[Group]:
        """The scoring passes for ``count`` queries (:func:`plan_groups`); with ``rank`` set,
        as many queries a pass as fit at that rank (:func:`fixed_rank_groups`); one pass over
        every layer when the queries are kept on disk (:meth:`spills`); when
        one layer of one query does not fit the budget, :meth:`queries` keeps them at low rank,
        in groups of queries if not even rank 1 of them all fits (:func:`low_rank_groups`)."""
        if self.rank is not None:
            asked = self._asked_rank_bytes()
            groups = fixed_rank_groups(count, asked, len(self.tracked), self.query_bytes)
            return groups or [(0, count, tuple(range(len(self.tracked))))]  # queries() refuses
        if self.spills(count):
            return [(0, count, tuple(range(len(self.tracked))))]
        planned = plan_groups(count, self._layer_bytes(self.tracked), self.query_bytes)
        if planned is not None:
            return planned
        rank_one = self._rank_one_bytes(self.tracked)
        return low_rank_groups(count, rank_one, len(self.tracked), self.query_bytes)[0]

    def _layer_bytes(self, tracked: list[TrackedModule]) -> list[int]:
        """Bytes of one query's preconditioned block of each of ``tracked``."""
        return [t.d_out * t.cols * self.dtype.itemsize for t in tracked]

    def _asked_rank_bytes(self) -> int:
        """Bytes of one query's preconditioned gradient at the ``rank`` asked for."""
        assert self.rank is not None
        return rank_bytes(self.tracked, self.rank, self.dtype.itemsize)

    def _rank_one_bytes(self, tracked: list[TrackedModule]) -> int:
        """Bytes of one query's rank-1 factors (``d_out + cols`` numbers) of all ``tracked``."""
        return sum(t.d_out + t.cols for t in tracked) * self.dtype.itemsize

    def spills(self, count: int, layers: tuple[int, ...] | None = None) -> bool:
        """Whether :meth:`queries` keeps ``count`` queries' blocks of ``layers`` (default all)
        on disk: they exceed the budget, a scratch place is given, no rank is set, and one
        query's block of each layer fits the read buffer's budget (:attr:`read_bytes`)."""
        if self.scratch is None or self.rank is not None:
            return False
        tracked = self.tracked if layers is None else [self.tracked[i] for i in layers]
        sizes = self._layer_bytes(tracked)
        return count * sum(sizes) > self.query_bytes and max(sizes) <= self.read_bytes

    def room_for_one_query(self) -> str | None:
        """Why not even one query could be scored within the budget, or None when it could:
        not kept on disk (:meth:`spills`), no ``rank`` set, neither its largest layer's block
        (the passes by layer of :meth:`groups`) nor rank 1 of every layer (:meth:`queries`)
        fits :attr:`query_bytes`. The fit says so (:meth:`infkit.methods.kfac.KFAC.fit`),
        before a scoring call refuses."""
        if self.rank is not None:
            asked = self._asked_rank_bytes()
            if asked <= self.query_bytes:
                return None
            return (
                f"one query's preconditioned gradient needs {human_bytes(asked)} at "
                f"query_rank={self.rank}, but memory_limit "
                f"({human_bytes(self.fitted.memory_limit)}) leaves "
                f"{human_bytes(self.query_bytes)} for the queries after the factors, "
                f"{self.result} and a scoring pass's working memory; {self._limit_for(asked)} "
                "holds it"
                + ("" if self.rank == 1 else ", or a lower query_rank")
                + ", or fewer queries a call (each adds its scores to the call's result)"
            )
        if self.spills(1):
            return None
        largest = max(self._layer_bytes(self.tracked))
        per_rank = self._rank_one_bytes(self.tracked)
        if min(largest, per_rank) <= self.query_bytes:
            return None
        return (
            f"one query's preconditioned gradient needs {human_bytes(per_rank)} at rank 1 "
            f"(its largest layer {human_bytes(largest)} at full rank), but memory_limit "
            f"({human_bytes(self.fitted.memory_limit)}) leaves {human_bytes(self.query_bytes)} "
            f"for the queries after the factors, {self.result} and a scoring pass's working "
            f"memory; {self._limits(largest, per_rank)}"
        )

    def at_full_rank(self) -> bool:
        """Whether one query is scored at full rank within the budget (kept on disk, or its
        largest layer's block held in a pass by layer), or at the ``rank`` asked for."""
        if self.rank is not None:
            return self.room_for_one_query() is None
        return self.spills(1) or max(self._layer_bytes(self.tracked)) <= self.query_bytes

    def _limits(self, largest: int, per_rank: int) -> str:
        """The limits that hold a query's largest layer at full rank (scored in passes by
        layer) and, where smaller, every layer of it at rank 1, as a message says them: rank 1
        approximates (a tester's rank-1 scores were 55% off full rank's), so the full-rank
        limit comes first."""
        how = (  # (with a place for them, that limit keeps them on disk: one pass, a tester's)
            "the queries kept on disk, in one pass"
            if self.scratch is not None
            else "in passes by layer"
        )
        full = f"{self._limit_for(largest)} scores it at full rank ({how})"
        if per_rank >= largest:
            return full
        return (
            f"{full}; {self._limit_for(per_rank)} at rank 1, an approximation (a warning says "
            "how much of the gradient it keeps)"
        )

    def _smaller_result(self, needed: int) -> str:
        """The remedy of a smaller result, when holding none would leave ``needed`` bytes for
        the queries (a decomposition's result can be most of the limit), else nothing."""
        if self.result.nbytes < needed - query_room(
            self.fitted, self.curvature, self.result.nbytes, self.batch_size
        ):
            return ""
        return f", or {self.result.smaller} (the result grows with them)"

    def _limit_for(self, needed: int) -> str:
        """The memory_limit whose query budget holds ``needed`` bytes, as a message says it: the
        budget is the limit less what does not change with it (the factors, the call's result, a
        pass's working memory), which may exceed the limit (:func:`query_room`)."""
        room = query_room(self.fitted, self.curvature, self.result.nbytes, self.batch_size)
        limit = self.fitted.memory_limit + max(needed - room, 0)
        return f"memory_limit={limit} ({human_bytes(limit)})"

    def queries(
        self,
        queries: ExampleSet,
        layers: tuple[int, ...] | None = None,
        group_size: int | None = None,
    ) -> LayerQueries:
        """Precondition the query gradients of every tracked layer (or of the ``layers``-th),
        keeping them at low rank when they exceed the budget: the largest rank at which
        ``group_size`` queries fit (default: these), so that a call's groups of queries
        (:meth:`groups`), a smaller last one included, share one rank.

        Each query batch's block of a layer is preconditioned and stored (or reduced to rank r)
        at once, so that no more than the kept queries and one batch's block exist at a time.

        Raises:
            ProblemTooLargeError: the budget does not hold even rank 1 of every query (and
                ``rank`` is not set), or one query at ``rank``: ``memory_limit`` cannot be met.
        """
        fitted = self.fitted
        device = fitted.space.device
        tracked = self.tracked if layers is None else [self.tracked[i] for i in layers]
        t_count, item = len(queries), self.dtype.itemsize
        if self.spills(t_count, layers):
            return self._queries_on_disk(queries, tracked)
        total = t_count * sum(t.d_out * t.cols for t in tracked) * item
        rank = self.rank
        if rank is not None:  # (its groups hold as many queries as fit: one, at least)
            reason = self.room_for_one_query()
            if reason is not None:
                raise ProblemTooLargeError(f"{reason} (plan() shows the bytes of each stage)")
        if rank is None and total > self.query_bytes:
            # the largest rank whose factors fit: sum over layers of T r (d_out + cols) items
            per_rank = max(t_count, group_size or 0) * self._rank_one_bytes(tracked)
            rank = self.query_bytes // per_rank
            if rank < 1:
                what = "one query" if t_count == 1 else f"{t_count} queries"
                disk = (  # (a workdir given and still here: this call's queries stay in memory)
                    "give the Influence a workdir (on CPU the scoring pass then reads the "
                    "queries back from disk and sets the factors aside), "
                    if self.scratch is None
                    else ""
                )
                raise ProblemTooLargeError(
                    f"the preconditioned gradients of {what} need {human_bytes(total)} at full "
                    f"rank and {human_bytes(per_rank)} at rank 1, but memory_limit "
                    f"({human_bytes(fitted.memory_limit)}) leaves "
                    f"{human_bytes(self.query_bytes)} for them after the factors, "
                    f"{self.result} and a scoring pass's working memory: raise memory_limit "
                    f"({self._limits(max(self._layer_bytes(tracked)), per_rank)}), {disk}track "
                    "fewer "
                    "layers (modules=) or use a smaller "
                    f"batch_size{self._smaller_result(per_rank)} (plan() shows the bytes of each "
                    "stage)"
                )
            # (a split's result is larger than the scores': it takes the queries' room)
            result = f"; and less the call's result: {self.result}" if self.result.nbytes else ""
            warn(
                f"the preconditioned gradient of one query takes {human_bytes(total // t_count)}"
                f", more than the budget of {human_bytes(self.query_bytes)} (memory_limit "
                f"less the factors and a pass's working memory{result}): each layer's is kept "
                f"at rank {rank} (SVD), which approximates the scores; raise memory_limit, track "
                "fewer layers, or set query_rank explicitly (describe()['query_rank'] reports "
                "it)",
                Notice,
            )
        low = {t.name for t in tracked if kept_at_rank(t, rank)}
        full, low_rank = {}, {}
        for t in tracked:
            if t.name in low:
                assert rank is not None
                low_rank[t.name] = (
                    torch.empty(t_count, t.d_out, rank, dtype=self.dtype, device=device),
                    torch.empty(t_count, t.cols, rank, dtype=self.dtype, device=device),
                )
            else:
                # written batch by batch: its pages are taken as the queries come
                full[t.name] = torch.empty(
                    t_count, t.d_out, t.cols, dtype=self.dtype, device=device
                )
        prepared = LayerQueries(
            full,
            low_rank,
            torch.zeros(t_count, dtype=torch.float64, device=device),
            rank if low_rank else None,
        )
        return self._filled(prepared, queries, tracked)

    def warn_if_rank_loses_much(
        self, least: float, rank: int, queries: ExampleSet, worst: int
    ) -> None:
        """A warning, once a call, when the low rank kept less than :data:`KEPT_ENERGY` of a
        query's preconditioned gradient in some layer (``least``, query ``worst`` of
        ``queries``): the scores then miss ``sqrt(1 - kept)`` of it in norm (a tester's rank-1
        queries, at the limit an error advised, were 55% off)."""
        if least >= KEPT_ENERGY:
            return
        if self.rank is not None:  # (asked for: memory played no part)
            chosen = "query_rank"
            remedy = (
                "raise query_rank, or leave it out to hold the layers at full rank (in passes "
                "by layer where memory_limit needs them: plan() foresees them)"
            )
        else:
            chosen = "memory_limit's budget for the queries"
            remedy = (
                "raise memory_limit to hold the layers at full rank (they are then scored in "
                "passes by layer: plan() foresees them), or give a workdir (queries kept on "
                "disk), or track fewer layers"
            )
        warn(
            f"the rank-{rank} queries ({chosen}) keep as little as {least:.0%} of a "
            f"layer's preconditioned gradient ({queries.name} query {queries.number(worst)}; "
            f"the scores miss up to {math.sqrt(1 - least):.0%} of it in norm), so these scores "
            f"are an approximation: {remedy}. describe()['query_kept_energy'] records the share",
            UserWarning,
        )

    def _queries_on_disk(self, queries: ExampleSet, tracked: list[TrackedModule]) -> LayerQueries:
        """The preconditioned queries of ``tracked``, written to a scratch directory batch by
        batch and read back by the scoring pass a chunk at a time (:class:`DiskBlocks`)."""
        assert self.scratch is not None
        device = self.fitted.space.device
        blocks = DiskBlocks(
            self.scratch(),
            {t.name: (t.d_out, t.cols) for t in tracked},
            len(queries),
            self.dtype,
            self.read_bytes,
            device,
        )
        prepared = LayerQueries(
            {}, {}, torch.zeros(len(queries), dtype=torch.float64, device=device), None, blocks
        )
        return self._filled(prepared, queries, tracked)

    def _filled(
        self, prepared: LayerQueries, queries: ExampleSet, tracked: list[TrackedModule]
    ) -> LayerQueries:
        """``prepared`` with every query batch's preconditioned blocks written in; its blocks
        on disk removed if that fails."""
        if self.fitted.l2:
            device = prepared.shared.device
            prepared.shares = {
                t.name: torch.zeros(prepared.count, dtype=torch.float64, device=device)
                for t in tracked
            }
        moved = torch.zeros(prepared.count, dtype=torch.bool)  # a query's gradient is not 0
        try:
            theta, ridges = self._theta_blocks(), self.curvature.ridges()
            size = query_batch_size(self.fitted, self.curvature, self.batch_size)
            for batch in queries.batches(size):
                self._precondition_batch(batch, tracked, prepared, theta, ridges, moved)
        except BaseException:
            prepared.close()
            raise
        warn_about_still_queries(queries, moved, self.fitted.engine.precision)
        release_freed_memory()  # the query passes' leftovers, before the scoring pass
        return prepared

    def _precondition_batch(
        self,
        batch: Batch,
        tracked: list[TrackedModule],
        prepared: LayerQueries,
        theta: dict[str, Tensor],
        ridges: dict[str, float],
        moved: Tensor,
    ) -> None:
        """Write the preconditioned measurement gradients of a batch of queries into
        ``prepared`` (its rows ``batch.indices``), layer by layer after the backward, and mark
        in ``moved`` the queries whose gradient is not 0.

        Not streamed as the scoring pass is (:func:`stream_layer_terms`): preconditioning a
        layer takes several blocks of temporaries, and taken during the backward, beside the
        rest of the graph, they raised the peak of this pass (1.71 against 1.65 GiB on
        bench_lm's small model) where handing over the output gradients saved less.
        """
        l2, rows = self.fitted.l2, batch.indices.to(prepared.shared.device)
        terms = layer_terms(self.fitted.engine, tracked, batch, "measurement", self.mask_key)
        for t in tracked:
            name = t.name
            U = self.curvature.precondition(name, terms.pop(name), ridges[name], self.dtype)
            moved[batch.indices] |= (U != 0).reshape(U.shape[0], -1).any(dim=1).cpu()
            if l2:
                share = l2 * (U * theta[name]).sum((1, 2)).to(torch.float64)
                prepared.shared[rows] += share
                prepared.shares[name][rows] += share
            if prepared.on_disk is not None:
                prepared.on_disk.write(name, rows, U)
            elif name in prepared.low_rank:
                assert prepared.rank is not None
                L, R = prepared.low_rank[name]
                L[rows], R[rows], kept = truncated_svd(U, prepared.rank)
                if prepared.kept is None:
                    prepared.kept = torch.ones(prepared.count, dtype=torch.float64)
                prepared.kept[batch.indices] = torch.minimum(
                    prepared.kept[batch.indices], kept.cpu()
                )
            else:
                prepared.full[name][rows] = U
            del U

    # ------------------------------------------------------------------ scores
    def scores(
        self,
        prepared: LayerQueries,
        shards: ScoreShards | None = None,
        among: Tensor | None = None,
        label: str = "scores",
    ) -> Tensor:
        """``S [T, N]`` float64: the removal effect of every training example on every query
        (of the training examples ``among`` only, ``[T, len(among)]``, when given).

        With ``shards``, column shard by column shard, each committed when done and reused
        when already committed (:mod:`infkit.shards`). ``label`` names the pass in the
        progress display (which query group it is).
        """
        fitted = self.fitted
        n = fitted.n
        if among is not None:
            S = self._columns(prepared, among, split=True, label=label)
        elif shards is None:
            S = self._columns(prepared, torch.arange(n), split=True, label=label)
        else:
            # this process's shards; the others' columns are filled in by the sum below
            S = torch.zeros(prepared.count, n, dtype=torch.float64, device=fitted.space.device)
            mine, size = shards.mine(), self.batch_size
            # the process that owns a shard computes every batch of it
            batches = [-(-(stop - start) // size) for start, stop in mine]
            total = sum(batches)
            with Progress(fitted.progress, total, label) as shown:  # by batch, shards reused too
                for (start, stop), count in zip(mine, batches, strict=True):
                    before = shown.done
                    compute = partial(
                        self._columns, prepared, torch.arange(start, stop), shown=shown
                    )
                    S[:, start:stop] = shards.columns(start, stop, compute).to(S.device)
                    reused = count - (shown.done - before)
                    if reused:  # a committed shard: its batches at once
                        shown.update(reused)
        sum_across(S)
        S += prepared.shared.unsqueeze(1)
        return S / n

    def _columns(
        self,
        prepared: LayerQueries,
        indices: Tensor,
        split: bool = False,
        label: str = "scores",
        shown: Progress | None = None,
    ) -> Tensor:
        """``sum_l <U_tl, G_jl>`` for the training examples ``indices``, [T, len(indices)], in
        batches of consecutive entries of ``indices``; with ``split``, only this process's
        batches (:func:`~infkit.distributed.shard_batches`: the others' columns stay 0)."""
        block = torch.zeros(
            prepared.count, len(indices), dtype=torch.float64, device=self.fitted.space.device
        )

        def fill(batch: Batch, start: int) -> None:
            block[:, start : start + len(batch.indices)] = self._batch_scores(batch, prepared)

        self._each_batch(indices, fill, split, label, shown)
        return block

    def _each_batch(
        self,
        indices: Tensor,
        visit: Callable[[Batch, int], None],
        split: bool,
        label: str,
        shown: Progress | None = None,
    ) -> None:
        """``visit(batch, start)`` for the batches of consecutive entries of ``indices``, the
        batch's first entry at ``start``; with ``split``, only this process's batches
        (:func:`~infkit.distributed.shard_batches`) with their progress named ``label``;
        without, every batch (a shard's), each counted in ``shown`` when given."""
        fitted = self.fitted
        size = self.batch_size
        if split:
            batches = track(
                shard_batches(fitted.train, size, indices),
                fitted.progress,
                label,
                batch_count(len(indices), size),
            )
        else:
            batches = enumerate(fitted.train.batches(size, indices))
        for number, batch in batches:
            visit(batch, number * size)
            if shown is not None:
                shown.update()

    def _batch_scores(self, batch: Batch, prepared: LayerQueries) -> Tensor:
        """``sum_l <U_tl, G_jl>`` for the batch, [T, B] float64."""
        out = torch.zeros(
            prepared.count, len(batch.indices), dtype=torch.float64, device=self.fitted.space.device
        )

        def add(name: str, start: int, stop: int, values: Tensor, call: Call) -> None:
            out[start:stop].add_(values)

        self._stream_shares(batch, prepared, add)
        return out

    def _stream_shares(
        self,
        batch: Batch,
        prepared: LayerQueries,
        take: Callable[[str, int, int, Tensor, Call], None],
        per_position: bool = False,
        done: Callable[[str], None] | None = None,
    ) -> None:
        """Hand ``take(name, start, stop, values, call)`` each tracked layer's share of the
        batch's scores for the queries ``start:stop``: ``<U_tl, G_jl>`` [stop - start, B]
        float64, or with ``per_position`` its terms ``<U_tl, Ds_js a_js^T>``
        [stop - start, B, S] of the S positions of the layer's ``call`` (:class:`Call`).

        Each layer's share is taken as the backward reaches it (:func:`stream_layer_terms`), so
        the pass holds one layer's output gradients at a time; a layer called twice in the
        forward pass hands over a share per call, and ``done(name)`` follows its last.
        """
        covered = prepared.layers()
        layers = [t for t in self.tracked if t.name in covered]
        # one buffer for the block gradients of the batch's layers, freed with the batch (before
        # the next batch's forward, whose peak the largest block would otherwise add to)
        blocks = ScratchSpace()

        def add_share(name: str, a: Tensor, ds: Tensor, call: Call) -> None:
            G = None  # the batch's block gradients, made once for every chunk of queries
            for start, stop, queries in self._layer_queries(prepared, name):
                if per_position:
                    values = position_shares(queries, a, ds, self.dtype)
                elif isinstance(queries, tuple):
                    values = position_shares(queries, a, ds, self.dtype).sum(-1)
                elif prepared.on_disk is None and products_in_slabs(a):  # (one chunk of queries)
                    values = block_inner(queries, a, ds, self.dtype)
                else:
                    if G is None:
                        G = block_gradient(a, ds, self.dtype, blocks).flatten(1)
                    values = wide_inner(queries.flatten(1), G)
                take(name, start, stop, values.to(torch.float64), call)

        stream_layer_terms(
            self.fitted.engine, layers, batch, add_share, "loss", self.mask_key, done
        )

    @staticmethod
    def _layer_queries(
        prepared: LayerQueries, name: str
    ) -> Iterator[tuple[int, int, Tensor | tuple[Tensor, Tensor]]]:
        """``(start, stop, queries)`` over layer ``name``'s preconditioned queries: the block
        [k, d_out, cols] (a chunk at a time when kept on disk, valid until the next) or its
        low-rank factors (L, R)."""
        if prepared.on_disk is not None:  # every layer's queries on disk
            yield from prepared.on_disk.chunks(name)
        elif name in prepared.low_rank:
            yield 0, prepared.count, prepared.low_rank[name]
        else:
            yield 0, prepared.count, prepared.full[name]

    # ------------------------------------------------------------------ decompositions
    def add_module_scores(
        self,
        prepared: LayerQueries,
        out: dict[str, Tensor],
        among: Tensor | None = None,
        label: str = "module scores",
    ) -> None:
        """Add each covered layer's share of the scores, ``N`` times, into ``out[name]``
        [T, n] float64 for the training examples ``among`` (default all): this process's
        batches, and on the first process the layer's regulariser share, so that the sum
        across processes (the caller's, once every group is in) counts it once. One pass over
        the training data (docs/decompositions.md §1)."""
        indices = torch.arange(self.fitted.n) if among is None else among
        first = world()[0] == 0

        def fill(batch: Batch, start: int) -> None:
            columns = slice(start, start + len(batch.indices))

            def add(name: str, first_query: int, stop: int, values: Tensor, call: Call) -> None:
                out[name][first_query:stop, columns].add_(values)

            self._stream_shares(batch, prepared, add)

        self._each_batch(indices, fill, True, label)
        if self.fitted.l2 and first:
            for name in prepared.layers():
                assert name in prepared.shares, "queries without their layers' l2 shares"
                out[name] += prepared.shares[name].unsqueeze(1)

    def add_token_scores(
        self,
        prepared: LayerQueries,
        tokens: Tensor,
        rest: Tensor,
        width: int,
        largest: bool,
        among: Tensor | None = None,
        label: str = "token scores",
    ) -> set[str]:
        """Add the scores split by position of the training sequences, ``N`` times, into
        ``tokens`` [T, n, width] and ``rest`` [T, n] float64 (n the training examples
        ``among``, default all): this process's batches, and on the first process the
        regulariser share into ``rest``, so that the sum across processes (the caller's)
        counts it once. Returns the layers decomposed by position.

        A layer's terms are its calls' positions in the forward pass's order (:class:`Call`,
        as :func:`layer_terms` joins them); the layers with ``width`` positions go to
        ``tokens``, the others (a pooled head) to ``rest`` (docs/decompositions.md §2). One
        pass over the training data.

        Raises:
            InvalidInputError: ``width`` is the ``largest`` count of the first example's layers
                and a layer of a batch sees more (the batches' positions differ).
        """
        indices = torch.arange(self.fitted.n) if among is None else among
        count, device = prepared.count, self.fitted.space.device
        per_position: set[str] = set()

        def fill(batch: Batch, start: int) -> None:
            size = len(batch.indices)
            columns = slice(start, start + size)
            terms: dict[str, Tensor] = {}  # a layer's calls' terms in forward order [T, B, S]

            def add(name: str, first: int, stop: int, values: Tensor, call: Call) -> None:
                if name not in terms:
                    shape = (count, size, call.positions)
                    terms[name] = torch.zeros(shape, dtype=torch.float64, device=device)
                place = slice(call.offset, call.offset + values.shape[-1])
                terms[name][first:stop, :, place] = values

            def finish(name: str) -> None:
                if name not in terms:  # no call of the layer reached by the backward
                    return
                layer = terms.pop(name)
                if layer.shape[-1] == width:
                    per_position.add(name)
                    tokens[:, columns].add_(layer)
                elif largest and layer.shape[-1] > width:
                    raise InvalidInputError(
                        f"layer {name!r} sees {layer.shape[-1]} positions in the batch of "
                        f"training example {int(batch.indices[0])}, more than the {width} it "
                        "sees in the first example: per-token scores need the same positions "
                        "in every training batch (pad the sequences to one length, or pass "
                        "positions=)"
                    )
                else:
                    rest[:, columns].add_(layer.sum(-1))

            self._stream_shares(batch, prepared, add, per_position=True, done=finish)

        self._each_batch(indices, fill, True, label)
        if world()[0] == 0:
            rest += prepared.shared.unsqueeze(1)
        return per_position

    def _self_scores_of_batch(
        self, batch: Batch, theta: dict[str, Tensor], ridges: dict[str, float]
    ) -> Tensor:
        """``g_j^T A^{-1} v_j`` [B] float64 for the batch's examples, layer by layer as the
        backward passes each (:func:`stream_block_gradients`)."""
        l2 = self.fitted.l2
        values = torch.zeros(
            len(batch.indices), dtype=torch.float64, device=self.fitted.space.device
        )

        def add_layer(name: str, G: Tensor) -> None:
            attributed = G + l2 * theta[name] if l2 else G
            U = self.curvature.precondition(name, attributed, ridges[name], self.dtype)
            values.add_((G * U).sum((1, 2)).to(torch.float64))

        stream_block_gradients(
            self.fitted.engine, self.tracked, batch, add_layer, "loss", self.mask_key, self.dtype
        )
        return values

    def self_scores(self) -> Tensor:
        """``(1/N) g_j^T A^{-1} v_j`` for every training example, [N] float64."""
        fitted = self.fitted
        n = fitted.n
        theta = self._theta_blocks()
        out = torch.zeros(n, dtype=torch.float64, device=fitted.space.device)
        total = batch_count(n, fitted.batch_size)
        batches = shard_batches(fitted.train, fitted.batch_size)
        ridges = self.curvature.ridges()
        for _, batch in track(batches, fitted.progress, "self-scores", total):
            values = self._self_scores_of_batch(batch, theta, ridges)
            out[batch.indices.to(out.device)] = values / n
        sum_across(out)
        return out
