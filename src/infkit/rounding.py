"""How far the lower precision of ``dtype=`` moves the scores (docs/methods/language_models.md §7).

Under ``Influence(..., dtype=torch.bfloat16)`` the passes that take gradients run under
``torch.autocast``: every gradient carries bfloat16's rounding (2^-8 of each entry, about 2% of
a sequence's gradient norm on a tester's Llama). Scores ``s_qj = u_q^T v_j`` with
``u_q = H^{-1} g_q`` read that rounding along the directions the inverse weighs most, those of
small curvature, where a trained model's gradients are small and their rounding is not: on that
tester's trained Llama, ``exact`` at ``damping=0.1`` correlated 0.56 with its float32 scores while
the preconditioned queries themselves moved by 2%.

:func:`autocast_rounding` measures it on a block of scores: the first :data:`QUERIES` queries
whose measurement has a gradient against :data:`TRAINING` training examples of a fixed sample,
each side's gradients taken once under autocast and once in the model's own precision, and the
scores computed from each (the method's own preconditioning): the relative change of the block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.fitted import Fitted
from infkit.gradients import PerExample, Which
from infkit.memory import FLOAT64_BYTES

#: queries (with a gradient) and training examples of the measured block of scores
QUERIES = 4
TRAINING = 16
#: the share of ``memory_limit`` the measurement may take: its preconditioned queries, float64,
#: in both precisions, and a batch of gradients in both
SHARE_OF_LIMIT = 0.25
#: the relative change of the block above which the scores are warned about
ROUNDING_WARNING = 0.2


def measurable(fitted: Fitted) -> bool:
    """Whether the block fits :data:`SHARE_OF_LIMIT` of the fit's ``memory_limit``."""
    size = fitted.space.size
    held = 2 * QUERIES * size * FLOAT64_BYTES  # the preconditioned queries, both precisions
    batch = 2 * fitted.gradient_batch_size * size * fitted.space.bytes_per_float()
    return held + batch <= SHARE_OF_LIMIT * fitted.memory_limit


def _pairs(
    engine: PerExample, full: PerExample, examples: ExampleSet, which: Which, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Each example's gradient under autocast (``engine``) and in the model's precision
    (``full``), float64 [k, P] each."""
    low, high = [], []
    for batch in examples.batches(batch_size):
        low.append(engine.grads(batch, which).to(torch.float64))
        high.append(full.grads(batch, which).to(torch.float64))
    return torch.cat(low), torch.cat(high)


def autocast_rounding(
    fitted: Fitted, precondition: Callable[[Tensor], Tensor], queries: ExampleSet
) -> float | None:
    """``||S_low - S_full||_F / ||S_full||_F`` over the block of scores, or None where no query
    has a gradient (the scores warn about those) or the block's scores are all 0.

    ``S[q, j] = u_q^T v_j`` with ``u_q = precondition(g_q)`` (the method's ``H^{-1}``) and
    ``v_j = grad l_j + l2 (theta - theta')`` (conventions §3); ``S_low`` from the gradients under
    the task's autocast, ``S_full`` from the same model's without it. The ``1/N`` of the scores
    cancels in the ratio."""
    full = PerExample(fitted.task.with_autocast(None), fitted.space)
    size = fitted.gradient_batch_size
    first = queries.part(torch.arange(min(len(queries), 4 * QUERIES)))
    g_low, g_full = _pairs(fitted.engine, full, first, "measurement", size)
    moving = (g_full.norm(dim=1) > 0).nonzero().flatten()[:QUERIES]
    if len(moving) == 0:
        return None
    u_low, u_full = precondition(g_low[moving]), precondition(g_full[moving])
    del g_low, g_full
    shift = torch.zeros(fitted.space.size, dtype=torch.float64, device=fitted.space.device)
    if fitted.l2:
        theta = fitted.theta.to(torch.float64)
        anchor = 0.0 if fitted.anchor is None else fitted.anchor.to(torch.float64)
        shift = fitted.l2 * (theta - anchor)
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randperm(fitted.n, generator=gen)[:TRAINING].sort().values
    low_columns, full_columns = [], []
    for batch in fitted.train.part(chosen).batches(size):
        low = fitted.engine.grads(batch, "loss").to(torch.float64) + shift
        high = full.grads(batch, "loss").to(torch.float64) + shift
        low_columns.append(u_low @ low.T)
        full_columns.append(u_full @ high.T)
    s_low, s_full = torch.cat(low_columns, dim=1), torch.cat(full_columns, dim=1)
    scale = float(s_full.norm())
    if not scale > 0:
        return None
    return float((s_low - s_full).norm()) / scale
