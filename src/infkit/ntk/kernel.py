"""Kernel blocks and Gram matrices of the empirical NTK, assembled from Jacobian factors.

The Gram matrix ``K`` between two example sets is stored as an ``[N1*C, N2*C]`` matrix whose row
``i*C + c`` is output c of example i, so block (i, j) is ``K[i*C:(i+1)*C, j*C:(j+1)*C] =
J_i J_j^T``. It is computed blockwise from :class:`~infkit.ntk.structured.Features`; the factors
of the column set are kept in memory when they fit and recomputed otherwise, and the result is
checked against the memory limit before it is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from infkit.data import Batch, ExampleSet, arrays_as_tensors
from infkit.data_forms import numbers_as_tensor
from infkit.errors import InvalidInputError, NonFiniteError, ProblemTooLargeError, listed
from infkit.example_checks import check_examples
from infkit.gradients import PerExample
from infkit.memory import FLOAT64_BYTES, default_memory_limit, human_bytes
from infkit.ntk.structured import Features, TangentFeatures
from infkit.options import integer_argument
from infkit.parameters import ParameterSpace
from infkit.progress import Mode, track
from infkit.serial import one_at_a_time
from infkit.task import Task, default_output_fn


def check_kernel_memory(rows: int, cols: int, limit: int, what: str, copies: int = 1) -> None:
    """Raise ProblemTooLargeError when ``copies`` float64 [rows, cols] matrices exceed ``limit``."""
    need = rows * cols * FLOAT64_BYTES * copies
    if need > limit:
        raise ProblemTooLargeError(
            f"the {what} is a dense {rows:,} x {cols:,} matrix (N*C rows and columns); with its "
            f"working copies it needs {human_bytes(need)}, above the memory limit of "
            f"{human_bytes(limit)}. Its memory grows as (N*C)^2: use a method that scales with "
            "N instead (infkit.methods() marks them 'scales'), attribute a subset of the "
            "training data, or raise memory_limit."
        )


def column_features(
    tangents: TangentFeatures, cols: ExampleSet, batch_size: int, budget: int
) -> list[Features] | None:
    """The per-batch features of ``cols`` when they fit in ``budget`` bytes, else None."""
    out: list[Features] = []
    used = 0
    for batch in cols.batches(batch_size):
        f = tangents.features(batch)
        used += f.nbytes()
        if used > budget:
            return None
        out.append(f)
    return out


def kernel_rows(
    tangents: TangentFeatures,
    batch: Batch,
    cols: ExampleSet,
    *,
    batch_size: int = 256,
    col_features: list[Features] | None = None,
    features: Features | None = None,
) -> Tensor:
    """The kernel between one batch and a whole example set, [B*C, N_cols*C]."""
    fa = tangents.features(batch) if features is None else features
    if col_features is not None:
        parts = [tangents.kernel(fa, fb) for fb in col_features]
    else:
        parts = [tangents.kernel(fa, tangents.features(bb)) for bb in cols.batches(batch_size)]
    return torch.cat(parts, dim=1)


def kernel_matrix(
    tangents: TangentFeatures,
    rows: ExampleSet,
    cols: ExampleSet | None = None,
    *,
    batch_size: int = 256,
    memory_limit: int | None = None,
    cache_bytes: int | None = None,
    col_features: list[Features] | None = None,
    progress: Mode = "off",
) -> Tensor:
    """The empirical NTK between two example sets, [N_rows*C, N_cols*C] in the working dtype.

    ``cols=None`` computes the symmetric Gram matrix of ``rows`` (upper blocks, mirrored). The
    per-example factors of the columns are kept when they fit in ``cache_bytes`` (default a
    quarter of ``memory_limit``), else recomputed for every row block; ``col_features`` (from
    :func:`column_features` with the same ``batch_size``) reuses factors computed before.
    """
    engine = tangents.engine
    limit = memory_limit or default_memory_limit()
    symmetric = cols is None
    cols = rows if cols is None else cols
    c = engine.outputs(rows.take([0])).reshape(1, -1).shape[1]
    n_r, n_c = len(rows), len(cols)
    check_kernel_memory(n_r * c, n_c * c, limit, "empirical NTK")
    K = torch.empty(n_r * c, n_c * c, dtype=engine.dtype, device=engine.device)
    budget = limit // 4 if cache_bytes is None else cache_bytes
    cached = col_features
    if cached is None:
        cached = column_features(tangents, cols, batch_size, budget)
    col_batches = list(cols.batches(batch_size))
    row_batches = col_batches if symmetric else list(rows.batches(batch_size))
    for ia, ba in enumerate(track(row_batches, progress, "NTK")):
        fa = cached[ia] if (symmetric and cached is not None) else tangents.features(ba)
        ra = _span(ba, c)
        for ib, bb in enumerate(col_batches):
            if symmetric and ib < ia:
                continue
            fb = cached[ib] if cached is not None else tangents.features(bb)
            block = tangents.kernel(fa, fb)
            cb = _span(bb, c)
            if symmetric and ib == ia:
                block = 0.5 * (block + block.T)
            K[ra, cb] = block
            if symmetric and ib > ia:
                K[cb, ra] = block.T
    return K


def _span(batch: Batch, c: int) -> slice:
    # batches come in order over a contiguous range
    start = int(batch.indices[0]) * c
    return slice(start, start + len(batch) * c)


@one_at_a_time
def empirical_ntk(
    model: nn.Module | Task,
    x1: Any,
    x2: Any = None,
    *,
    params: Tensor | Mapping[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    strategy: str = "auto",
    batch_size: int = 256,
    memory_limit: int | None = None,
    output_fn: Callable[[Any], Tensor] = default_output_fn,
) -> Tensor:
    """The empirical NTK ``J(x1) J(x2)^T`` with full C x C blocks, [N1*C, N2*C].

    Args:
        model: a module (or a Task); its trainable parameters are theta.
        x1: inputs (a tensor [N, ...], a NumPy array or a list of rows of numbers, or a dict
            of them).
        x2: inputs of the columns; None means ``x2 = x1``.
        params: where to evaluate J (flat [P] or a dict by name); default the current values.
        dtype: working dtype.
        strategy: ``"auto"``, ``"structured"``, ``"jacobian"`` or ``"jvp"``
            (:mod:`infkit.ntk.structured`).
        batch_size: examples per kernel block.
        memory_limit: bytes the dense kernel may take (default: half the machine's memory).
        output_fn: extracts the output tensor from what ``model(...)`` returns.

    Block (i, j) is ``K[i*C:(i+1)*C, j*C:(j+1)*C] = J(x1_i) J(x2_j)^T``.
    """
    batch_size = integer_argument("batch_size", batch_size, 1)
    task = model if isinstance(model, Task) else Task(model, _no_loss, output_fn=output_fn)
    space = ParameterSpace(task.model)
    at = space.flat() if params is None else params
    values = at if isinstance(at, Tensor) else torch.cat([v.reshape(-1) for v in at.values()])
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            "the parameters the NTK is taken at hold NaN or Inf"
            + (" (params)" if params is not None else " (the model's own)")
            + ": the kernel would be NaN; pass finite parameters"
        )
    x1 = _inputs(x1, "x1")
    x2 = None if x2 is None else _inputs(x2, "x2")
    engine = PerExample(task, space, at=params, dtype=dtype)
    tangents = TangentFeatures(engine, strategy)
    a = ExampleSet((x1, _dummy_targets(x1)), name="x1")
    b = None if x2 is None else ExampleSet((x2, _dummy_targets(x2)), name="x2")
    # the inputs, then the model called on each set's first example (through a task without a
    # loss: the placeholder targets are no labels to check against a task's)
    unlabelled = Task(task.model, _no_loss, output_fn=task.output_fn)
    probe = PerExample(unlabelled, space, at=params, dtype=dtype)
    for examples in (a,) if b is None else (a, b):
        check_examples(probe, examples)
    K = kernel_matrix(tangents, a, b, batch_size=batch_size, memory_limit=memory_limit)
    if not bool(torch.isfinite(K).all()):
        raise NonFiniteError(
            f"the NTK holds NaN or Inf (in {dtype}): the model's Jacobian overflowed at these "
            "parameters and inputs; check their size, or take the kernel in float64"
        )
    return K


def _no_loss(outputs: Tensor, targets: Any) -> Tensor:
    return outputs.reshape(outputs.shape[0], -1).sum(1) * 0


def _inputs(x: Any, name: str) -> Any:
    """The kernel's inputs as tensors: a tensor [N, ...], a NumPy array or a list of rows of
    numbers (as ``Influence`` takes an (X, y) pair's), or a dict of them (a tokenizer's batch;
    other values, a None or a flag, passed on as they are)."""
    if isinstance(x, Mapping):
        x = {key: numbers_as_tensor(value) for key, value in x.items()}
    x = arrays_as_tensors(numbers_as_tensor(x), name)
    rows = [t for t in (x.values() if isinstance(x, dict) else [x]) if isinstance(t, Tensor)]
    if not rows or any(t.dim() == 0 for t in rows):
        if isinstance(x, Tensor):
            shown = f"a 0-d tensor {x}"
        elif isinstance(x, dict):
            scalars = [k for k, t in x.items() if isinstance(t, Tensor) and t.dim() == 0]
            shown = (
                f"a dict whose {listed([repr(k) for k in scalars])} "
                f"{'is a 0-d tensor' if len(scalars) == 1 else 'are 0-d tensors'}"
                if scalars
                else f"a dict without a tensor (keys {listed([repr(k) for k in x])})"
            )
        else:
            shown = type(x).__name__
        raise InvalidInputError(
            f"{name} must be the inputs of N examples: a tensor [N, ...] (a NumPy array or a "
            f"list of rows of numbers), or a dict of them; got {shown}"
        )
    return x


def _dummy_targets(x: Any) -> Tensor:
    lead = x if isinstance(x, Tensor) else next(t for t in x.values() if isinstance(t, Tensor))
    return torch.zeros(lead.shape[0])
