"""How far a lower precision moves the scores (docs/methods/language_models.md §7): that of
``dtype=`` (autocast), or of a model whose parameters are bfloat16 or float16.

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
:func:`model_rounding` measures the same block for a bfloat16 or float16 model against a float32
copy of it (the same, rounded weights), which shows what the model's own precision costs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.fingerprint import data_fingerprint
from infkit.fitted import Fitted
from infkit.gradients import PerExample
from infkit.memory import FLOAT64_BYTES
from infkit.parameters import ParameterSpace

#: queries (with a gradient) and training examples of the measured block of scores
QUERIES = 4
TRAINING = 16
#: the first queries looked at for :data:`QUERIES` with a gradient
LOOKED_AT = 16
#: the share of ``memory_limit`` the measurement may take: its preconditioned queries, float64,
#: in both precisions, and a batch of gradients in both
SHARE_OF_LIMIT = 0.25
#: the relative change of the block above which the scores are warned about
ROUNDING_WARNING = 0.2


#: the parameter dtypes whose own rounding :func:`model_rounding` measures
LOW_PRECISION = (torch.bfloat16, torch.float16)


def measurable(fitted: Fitted, copy_bytes: int = 0) -> bool:
    """Whether the block fits :data:`SHARE_OF_LIMIT` of the fit's ``memory_limit``: the
    queries' gradients, their preconditioning (float64, both precisions, in and out), a batch
    of gradients in both precisions and ``copy_bytes`` (a float32 copy of the model)."""
    size = fitted.space.size
    held = 4 * QUERIES * size * FLOAT64_BYTES
    batch = 2 * _batch_size(fitted) * size * FLOAT64_BYTES
    return held + batch + copy_bytes <= SHARE_OF_LIMIT * fitted.memory_limit


def float32_copy_bytes(fitted: Fitted) -> int:
    """Bytes of a float32 copy of the model's floating-point parameters and buffers, as
    :func:`model_rounding` makes it."""
    model = fitted.task.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(4 * t.numel() for t in tensors if t.is_floating_point())


def _batch_size(fitted: Fitted) -> int:
    return min(fitted.gradient_batch_size, QUERIES)


def queries_key(queries: ExampleSet) -> str:
    """What the block's queries are (a hash of the first :data:`LOOKED_AT`), to measure a set
    of queries once a fit."""
    return data_fingerprint(queries.part(torch.arange(min(len(queries), LOOKED_AT))))


def autocast_rounding(
    fitted: Fitted, precondition: Callable[[Tensor], Tensor], queries: ExampleSet
) -> float | None:
    """``||S_low - S_full||_F / ||S_full||_F`` over the block of scores, or None where no query
    has a gradient (the scores warn about those) or the block's scores are all 0.

    ``S[q, j] = u_q^T v_j`` with ``u_q = precondition(g_q)`` (the method's ``H^{-1}``, one call
    for both precisions' queries) and ``v_j = grad l_j + l2 (theta - theta')`` (conventions
    §3); ``S_low`` from the gradients under the task's autocast, ``S_full`` from the same
    model's without it. The ``1/N`` of the scores cancels in the ratio. Gradients are taken
    :data:`QUERIES` examples at a time: ``2 (2 QUERIES + batch) P`` float64 numbers at most."""
    full = PerExample(fitted.task.with_autocast(None), fitted.space)
    return _block_change(fitted, precondition, queries, full)


def model_rounding(
    fitted: Fitted, precondition: Callable[[Tensor], Tensor], queries: ExampleSet
) -> float | None:
    """:func:`autocast_rounding` of a model whose parameters are bfloat16 or float16
    (:data:`LOW_PRECISION`): ``S_low`` from the model's own gradients, ``S_full`` from those
    of a float32 copy of it, which holds the same (rounded) weights and computes in float32.
    The copy (:func:`float32_copy_bytes`) lives for the measurement only."""
    model = fitted.task.model
    twin = copy.deepcopy(model).float()
    try:
        space = ParameterSpace(twin, fitted.space.names)
        full = PerExample(fitted.task.with_model(twin), space)
        return _block_change(fitted, precondition, queries, full)
    finally:
        del twin


def _block_change(
    fitted: Fitted,
    precondition: Callable[[Tensor], Tensor],
    queries: ExampleSet,
    full: PerExample,
) -> float | None:
    """The block's relative change between ``fitted``'s gradients and ``full``'s (the same
    parameters, in their order, computed in the higher precision)."""
    size = _batch_size(fitted)
    low_queries: list[Tensor] = []
    full_queries: list[Tensor] = []
    looked = queries.part(torch.arange(min(len(queries), LOOKED_AT)))
    for batch in looked.batches(size):
        low = fitted.engine.grads(batch, "measurement").to(torch.float64)
        high = full.grads(batch, "measurement").to(torch.float64)
        moving = high.norm(dim=1) > 0
        low_queries += list(low[moving])
        full_queries += list(high[moving])
        del low, high
        if len(full_queries) >= QUERIES:
            break
    if not full_queries:
        return None
    k = min(len(full_queries), QUERIES)
    both = precondition(torch.stack(low_queries[:k] + full_queries[:k]))
    del low_queries, full_queries
    u_low, u_full = both[:k], both[k:]
    shift = fitted.l2 * fitted.regularised_theta  # as Fitted.attributed_grads adds it
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randperm(fitted.n, generator=gen)[:TRAINING].sort().values
    low_columns, full_columns = [], []
    # (batches of the whole set at those positions: a part's batches count from 0, and the
    # gradient cache read by their indices gave other examples than the full side's)
    for batch in fitted.train.batches(size, chosen):
        low = fitted.attributed_grads(batch)
        high = full.grads(batch, "loss").to(torch.float64) + shift
        low_columns.append(u_low @ low.T)
        full_columns.append(u_full @ high.T)
    s_low, s_full = torch.cat(low_columns, dim=1), torch.cat(full_columns, dim=1)
    scale = float(s_full.norm())
    if not scale > 0:
        return None
    return float((s_low - s_full).norm()) / scale
