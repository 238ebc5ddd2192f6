"""Query batching: low-rank preconditioned query gradients (Grosse et al. §3.2.2; methods.md §4.5).

Each tracked layer's block of a preconditioned query ``u_t = H^{-1} grad m_t`` (a [d_out, cols]
matrix U_l) is replaced by its best rank-R approximation ``U_l ~ L_l R_l^T`` (``L = U_R S_R``
[d_out, R], ``R = V_R`` [cols, R], from an SVD) when ``min(d_out, cols) > R``. A training
example's score then never forms its gradient: with ``DW_l = sum_t Ds_t a_t^T``,

    <L R^T, DW_l> = sum_t sum_r (Ds_t . L_r) (a_t . R_r),

which costs ``T R (d_in + d_out)`` per pair instead of ``d_in d_out``, and a query takes
``R (d_in + d_out)`` numbers instead of ``d_in d_out``: many queries share each pass over the
training data. The l2 share ``(l2/N) u^T theta`` is added exactly.

Two-stage refinement: rank all training examples with the low-rank queries, then recompute the
``refine`` strongest proponents and opponents of each query at full rank (exact IF scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from infkit.errors import InvalidInputError, UnsupportedError
from infkit.kfac.capture import layer_terms
from infkit.kfac.scores import _check, preconditioned_queries, tracked_layers

if TYPE_CHECKING:
    from infkit.influence import Influence

SVDS = ("exact", "randomized")


@dataclass
class LowRankQueries:
    """Preconditioned queries, each tracked layer's block as ``left @ right^T``.

    Attributes:
        left: name -> [n_q, d_out, R_l] (``U_R S_R``).
        right: name -> [n_q, cols, R_l] (``V_R``).
        full: [n_q, P], the full-rank preconditioned queries (for refinement and the l2 share).
        rank: the requested rank R (a layer keeps its full rank when it is not larger).
    """

    left: dict[str, Tensor]
    right: dict[str, Tensor]
    full: Tensor
    rank: int

    def numbers(self) -> int:
        """Numbers stored per query in the low-rank blocks."""
        return sum(v[0].numel() for v in self.left.values()) + sum(
            v[0].numel() for v in self.right.values()
        )


def low_rank_queries(
    inf: Influence, test: Any, rank: int = 32, svd: str = "exact", seed: int = 0
) -> LowRankQueries:
    """Rank-``rank`` factorisations of each layer's block of ``H^{-1} grad m_t``.

    Args:
        inf: a fitted ``Influence`` (estimator ``"if"``, a primal method).
        test: the queries.
        rank: R; layers with ``min(d_out, cols) <= R`` are kept exactly.
        svd: ``"exact"`` (full SVD) or ``"randomized"`` (``torch.svd_lowrank``).
        seed: seed of the randomized SVD.
    """
    _check(inf, "query batching")
    if rank < 1:
        raise InvalidInputError(f"rank must be >= 1, got {rank}")
    if svd not in SVDS:
        raise UnsupportedError(f"unknown svd {svd!r}; use one of {SVDS}")
    tracked, others, layout = tracked_layers(inf)
    if others:
        raise UnsupportedError(
            f"query batching scores through tracked layers only; parameters {others[:5]} are "
            "outside them: freeze them (requires_grad=False)"
        )
    U = preconditioned_queries(inf, test)
    left, right = {}, {}
    for t in tracked:
        B = layout.block(U, t)  # [q, d_out, cols]
        if min(t.d_out, t.cols) <= rank:
            left[t.name] = B
            right[t.name] = torch.eye(t.cols, dtype=B.dtype, device=B.device).expand(
                B.shape[0], t.cols, t.cols
            )
            continue
        if svd == "exact":
            Us, s, Vh = torch.linalg.svd(B, full_matrices=False)
            left[t.name] = Us[..., :rank] * s[..., None, :rank]
            right[t.name] = Vh[..., :rank, :].transpose(-1, -2)
        else:
            torch.manual_seed(seed)
            Us, s, V = torch.svd_lowrank(B, q=rank)
            left[t.name] = Us * s.unsqueeze(-2)
            right[t.name] = V
    return LowRankQueries(left, right, U, rank)


def _lowrank_batch_scores(
    inf: Influence, queries: LowRankQueries, batch: Any, mask_key: str | None
) -> Tensor:
    state = inf.state
    tracked, _, _ = tracked_layers(inf)
    terms = layer_terms(state.engine, tracked, batch, "loss", mask_key)
    total = torch.zeros(queries.full.shape[0], len(batch), dtype=torch.float64)
    for name, (a, ds) in terms.items():
        x = torch.einsum("bto,qor->qbtr", ds.to(torch.float64), queries.left[name])
        y = torch.einsum("bti,qir->qbtr", a.to(torch.float64), queries.right[name])
        total += (x * y).sum(dim=(-1, -2)).cpu()
    return total


def batched_scores(
    inf: Influence,
    test: Any,
    rank: int = 32,
    refine: int = 0,
    svd: str = "exact",
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """IF scores [n_test, n] from rank-``rank`` preconditioned queries, optionally refined.

    Args:
        inf: a fitted ``Influence`` (estimator ``"if"``, a primal method).
        test: the queries.
        rank: the rank R of each layer's query block (Grosse et al. used 32).
        refine: recompute the ``refine`` most positive and most negative scores of each query at
            full rank (exact); 0 for none.
        svd: ``"exact"`` or ``"randomized"``.
        indices: training examples to score (default: all).
    """
    queries = low_rank_queries(inf, test, rank, svd)
    state = inf.state
    idx = torch.arange(state.n) if indices is None else torch.as_tensor(indices).reshape(-1)
    mask_key = getattr(state.method, "mask_key", "attention_mask")
    reg = (state.l2 * (queries.full @ state.theta)).cpu()  # [q]
    parts = []
    total = -(-len(idx) // inf.batch_size)
    for batch in tqdm(
        state.train.batches(inf.batch_size, idx),
        total=total,
        desc=f"rank-{rank} scores",
        disable=not inf._show(),
    ):
        parts.append(_lowrank_batch_scores(inf, queries, batch, mask_key))
    S = (torch.cat(parts, dim=1) + reg.unsqueeze(1)) / state.n
    if refine > 0:
        k = min(refine, S.shape[1])
        top = S.topk(k, dim=1).indices
        bottom = (-S).topk(k, dim=1).indices
        chosen = torch.cat([top, bottom], dim=1)  # positions in idx, [q, 2k]
        union = torch.unique(chosen)
        exact = torch.empty(S.shape[0], len(union), dtype=torch.float64)
        for start in range(0, len(union), inf.batch_size):
            part = union[start : start + inf.batch_size]
            batch = state.train.take(idx[part])
            V = state.attributed_grads(batch)
            exact[:, start : start + len(part)] = (queries.full @ V.T).cpu() / state.n
        where = torch.searchsorted(union, chosen)
        S.scatter_(1, chosen, exact.gather(1, where))
    return S
