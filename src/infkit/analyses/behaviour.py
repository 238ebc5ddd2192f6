"""IF-Guide: the training tokens that teach a language model a behaviour, and training without them.

Coalson, Bae, Carlini & Hong (2025) attribute a behaviour of a causal LM (toxicity, in their
paper) to the tokens of its training sequences and suppress those tokens in a later training
run. Three steps (docs/analyses.md §12):

1. **Differential per-token scores.** Given *behaviour* queries (prompts completed with the
   behaviour) and *contrast* queries (the same kind of prompts completed without it), the
   per-token IF scores of every training sequence (``Influence.token_scores``,
   docs/decompositions.md §2) are averaged over each query set and subtracted:

       D[j, s] = mean_{b in behaviour} tokens[b, j, s] - mean_{c in contrast} tokens[c, j, s].

   By linearity this is the per-token score of the mean behaviour gradient minus the mean
   contrast gradient, the paper's differential query. Orientation (infkit's, docs/conventions.md
   §5): a score is the removal effect on the query's loss, so ``D > 0`` marks a position whose
   training signal lowers the behaviour's loss more than the contrast's: removing it would raise
   the behaviour queries' mean loss relative to the contrast queries'. **Positive D promotes the
   behaviour.** Summed over positions (plus the part that is not per position, ``rest``), ``D``
   is the difference of the mean sequence scores, ``inf.scores``. For a measurement where
   higher is better (the log-probability of the behaviour's token, ``task.higher_is_better``) a
   positive removal effect means the position held the behaviour back, so ``D`` is minus that
   difference: positive D promotes the behaviour whatever the measurement.

2. **Selection and ranking** (the paper's Algorithm 1). The threshold ``tau`` is the
   ``percentile``-th percentile (default 99, the paper's) of ``D`` over the real tokens of all
   training sequences; a position is *selected* when ``D > tau``. Each document gets the count
   ``c_j`` and the sum ``f_j`` of its selected scores, both min-max normalised over documents,
   and is ranked by their harmonic mean ``2 c_j f_j / (c_j + f_j)`` (ties broken by the
   document's summed ``D``). The token mask marks, for each selected position s, the labels
   ``s + offset - window .. s + offset + window`` of that sequence, documents taken in rank order
   until ``max_tokens`` labels are marked. ``offset=1`` (default) centres the window on the
   label that position s predicts (its next-token loss term is what position s's gradient
   carries); the paper's code centres it on label s (``offset=0``) with ``window=1``.

3. **Suppression.** :func:`train_with_mask` trains (or continues training) a causal LM on the
   per-label objective of the paper, the next-token cross-entropy of the unmasked labels minus
   ``penalty`` times that of the masked ones, averaged over the scored labels of a batch
   (``objective="penalty"``, lambda = 1 in the paper); ``objective="unlikelihood"`` replaces the
   subtracted term by ``penalty x -log(1 - p)``, bounded below, which stops pushing once the
   masked token is improbable. The paper's term is unbounded below: on the benchmark's corpus
   (``benchmarks/results/behaviour.md``, 48 epochs, 2.5% of the labels masked) lambda = 1
   removed the behaviour but raised the clean loss from 1.42 to 3.67, where lambda = 0.1 and
   the unlikelihood objective removed it for 0.04 and 0.03.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infkit.data import ExampleSet, checked_indices
from infkit.errors import InvalidInputError, Notice, UnsupportedError, warn
from infkit.influence import Influence
from infkit.language_modeling import IGNORE_INDEX
from infkit.options import integer_argument, nonnegative_number, real_number, whole_number
from infkit.parameters import in_mode
from infkit.progress import track
from infkit.task import Task

Objective = Literal["penalty", "unlikelihood"]
OBJECTIVES: tuple[str, ...] = ("penalty", "unlikelihood")
#: the share of ``memory_limit`` one chunk's per-token scores may take
CHUNK_SHARE = 0.1


@dataclass(frozen=True)
class DifferentialScores:
    """Per-token differential influence of training sequences toward a behaviour.

    Attributes:
        tokens: [n, T] float64, ``D[j, s]``: mean behaviour minus mean contrast per-token score
            of position s of training sequence ``indices[j]``; positive promotes the behaviour.
        rest: [n] float64, the same difference of the part that is not per position (the l2
            share, layers with another number of positions, untracked parameters).
        indices: [n] the training indices scored.
        valid: [n, T] bool, the real tokens (``attention_mask``, or every position).
        n_behaviour: the number of behaviour queries.
        n_contrast: the number of contrast queries.
        n_train: N, the training sequences the scores were fitted on (None: the largest of
            ``indices`` plus one), the rows of :attr:`TokenSelection.mask`.
        scored: [n, T] bool, the labels a position predicts (not -100, not the first), the
            only ones a mask marks (None: the real tokens but the first).
    """

    tokens: Tensor
    rest: Tensor
    indices: Tensor
    valid: Tensor
    n_behaviour: int
    n_contrast: int
    n_train: int | None = None
    scored: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """[n]: ``mean_b scores[b, j] - mean_c scores[c, j]`` for ``j`` in ``indices``, the
        predicted change of (mean behaviour loss - mean contrast loss) when j is removed; for
        a measurement where higher is better, minus the predicted change of (mean behaviour
        measurement - mean contrast measurement): positive promotes the behaviour."""
        return self.tokens.sum(-1) + self.rest


@dataclass(frozen=True)
class TokenSelection:
    """The selected tokens, the ranking of the documents and the suppression mask.

    Rows follow ``indices`` (the scored training sequences), but the mask's, which are the
    training set's.

    Attributes:
        threshold: ``tau``, the percentile of the differential scores over the real tokens.
        selected: [n, T] bool, positions with ``D > tau`` (in the scores' positions).
        count: [n] int64, selected positions per document.
        total: [n] float64, the sum of the selected positions' scores per document.
        rank_score: [n] float64 in [0, 1], the harmonic mean of the min-max normalised count
            and sum.
        order: [n] rows, best first.
        indices: [n] the training index of each row.
        mask: [N, T] bool over the whole training set, in the labels' positions, as
            :func:`train_with_mask` reads it: ``mask[i, k]`` suppresses the prediction of token
            k of training sequence i (made at position k - 1); rows follow the training
            indices, not ``indices`` (sequences not scored mark none).
    """

    threshold: float
    selected: Tensor
    count: Tensor
    total: Tensor
    rank_score: Tensor
    order: Tensor
    indices: Tensor
    mask: Tensor

    @property
    def ranking(self) -> Tensor:
        """[n] training indices, the most behaviour-promoting document first."""
        return self.indices[self.order]

    def top(self, k: int) -> Tensor:
        """The training indices of the ``k`` highest-ranked documents.

        Args:
            k: how many, between 1 and the number of scored documents.
        """
        k = integer_argument("k", k, 1, len(self.order))
        return self.ranking[:k]


# ------------------------------------------------------------------------------ step 1
def differential_token_scores(
    inf: Influence,
    behaviour: Any,
    contrast: Any,
    *,
    indices: Sequence[int] | Tensor | None = None,
    chunk_size: int | None = None,
) -> DifferentialScores:
    """Per-token differential influence of training sequences: behaviour minus contrast.

    ``D[j, s] = mean_b tokens[b, j, s] - mean_c tokens[c, j, s]`` from
    ``inf.token_scores`` (its negative for a measurement where higher is better; module
    docstring; docs/analyses.md §12), computed over chunks of
    training sequences so that at most ``chunk_size`` sequences' per-token scores are held at
    once. Each chunk preconditions the queries again (one pass over them): make chunks as large
    as memory allows.

    Args:
        inf: a fitted :class:`~infkit.Influence` on a language-modelling task
            (``Task.language_modeling``) whose method gives per-token scores (``kfac``,
            ``ekfac``; docs/decompositions.md §2), with estimator ``"if"``.
        behaviour: queries that exhibit the behaviour, ``(inputs, labels)`` as built by
            ``infkit.language_modeling.examples`` (prompt labels -100: the completion's loss).
        contrast: queries that do not: the same kind of prompts with ordinary completions.
        indices: the training sequences to score, without repeats (default: all).
        chunk_size: training sequences per chunk (default: as many as keep the chunk's
            ``[n_queries, chunk, T]`` float64 scores within a tenth of ``memory_limit``).

    Returns:
        The differential scores; positive values promote the behaviour.
    """
    _check_language_model(inf)
    fitted = inf.fitted
    behaviour_set = ExampleSet(behaviour, name="behaviour queries")
    contrast_set = ExampleSet(contrast, name="contrast queries")
    idx = (
        torch.arange(fitted.n)
        if indices is None
        else checked_indices(indices, fitted.n, what="training index", unique=True)
    )
    positions = fitted.train.positions()
    n_b, n_c = len(behaviour_set), len(contrast_set)
    if chunk_size is None:
        per_sequence = 8 * positions * (n_b + n_c)
        chunk_size = max(1, int(CHUNK_SHARE * fitted.memory_limit) // per_sequence)
    else:
        chunk_size = integer_argument("chunk_size", chunk_size, 1)
    chunks = [idx[s : s + chunk_size] for s in range(0, len(idx), chunk_size)]
    tokens, rest, valid, scored = [], [], [], []
    shown: Iterator[Tensor] | list[Tensor] = chunks
    if len(chunks) > 1:
        shown = track(chunks, fitted.progress, "behaviour token scores", len(chunks))
    # (a removal effect is help for a loss, harm for a measurement where higher is better: a
    # tester's log p of the behaviour's token ranked its real promoter last)
    promotes = inf.task.helpful_sign
    for chunk in shown:
        b = inf.token_scores(behaviour_set, chunk, positions=positions)
        c = inf.token_scores(contrast_set, chunk, positions=positions)
        tokens.append(promotes * (b.tokens.mean(0) - c.tokens.mean(0)))
        rest.append(promotes * (b.rest.mean(0) - c.rest.mean(0)))
        batch = fitted.train.take(chunk)
        valid.append(_real_tokens(batch.inputs, len(chunk), positions))
        scored.append(_scored_labels(batch.targets, len(chunk), positions))
        del b, c
    found = DifferentialScores(
        tokens=torch.cat(tokens).to(torch.float64),
        rest=torch.cat(rest).to(torch.float64),
        indices=idx,
        valid=torch.cat(valid),
        n_behaviour=n_b,
        n_contrast=n_c,
        n_train=fitted.n,
        scored=torch.cat(scored),
    )
    _warn_if_rest_dominates(found, inf.method.name)
    return found


#: the share of the differential scores' magnitude outside the per-token split above which
#: :func:`differential_token_scores` says that selection sees only part of the signal
REST_SHARE = 0.5


def _warn_if_rest_dominates(scores: DifferentialScores, method: str) -> None:
    """A Notice when ``sum_j |rest_j|`` exceeds ``sum_js |D[j, s]|`` over the real tokens
    (parameters outside the layers split by position, the regulariser share): the tokens
    selected from ``D`` then explain only the smaller part of the behaviour (a tester: 98% in ``rest`` with ``exact`` on a small
    GPT-2, whose embeddings and norms are attributed too)."""
    # each token's own magnitude, as select_tokens ranks them (not their sum per sequence,
    # in which tokens of opposite signs cancel)
    per_token = float((scores.tokens * scores.valid).abs().sum())
    rest = float(scores.rest.abs().sum())
    if not math.isfinite(per_token + rest) or rest <= REST_SHARE * (rest + per_token):
        return
    share = rest / (rest + per_token)
    warn(
        f"{share:.0%} of the differential scores' magnitude lies in D.rest, outside the "
        f"per-token split (sum_j |rest_j| against sum_js |D[j, s]| over real tokens): parameters that are not in layers applied at every position "
        f"(method {method!r} attributes embeddings and norms too) and the regulariser share. "
        "The tokens select_tokens picks from D explain only the rest of the behaviour: fit with "
        "'kfac' or 'ekfac' (they track the linear layers, docs/analyses.md §12), or freeze the "
        "other parameters (requires_grad=False)",
        Notice,
    )


def _check_language_model(inf: Any) -> None:
    if not isinstance(inf, Influence):
        raise InvalidInputError(f"inf must be a fitted infkit.Influence, got {type(inf).__name__}")
    if inf.task.name != "language_modeling":
        raise UnsupportedError(
            f"behaviour attribution scores the tokens of training sequences of a causal language "
            f"model; this Influence has a {inf.task.name!r} task: build it with "
            "Task.language_modeling(model)"
        )


def _scored_labels(labels: Any, n: int, positions: int) -> Tensor:
    """[n, positions] bool: the labels a position predicts, ``labels != -100`` past the first
    (a left-padded sequence's first real token and a prompt's are predicted by nothing)."""
    out = torch.as_tensor(labels).reshape(n, positions).cpu() != IGNORE_INDEX
    out[:, 0] = False
    return out


def _real_tokens(inputs: Any, n: int, positions: int) -> Tensor:
    """[n, positions] bool: ``attention_mask != 0`` where the inputs have one, else all True."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return torch.as_tensor(inputs["attention_mask"]).reshape(n, positions).cpu() != 0
    return torch.ones(n, positions, dtype=torch.bool)


# ------------------------------------------------------------------------------ step 2
def select_tokens(
    scores: DifferentialScores | Tensor,
    percentile: float = 99.0,
    *,
    window: int = 1,
    offset: int = 1,
    max_tokens: int | None = None,
    valid: Tensor | None = None,
) -> TokenSelection:
    """Select the tokens above a percentile, rank the documents, and build the token mask.

    The paper's Algorithm 1 (module docstring; docs/analyses.md §12): ``tau`` is the
    ``percentile``-th percentile of the scores over the real tokens (linear interpolation, as
    ``numpy.percentile``); positions with ``D > tau`` are selected; documents are ranked by the
    harmonic mean of the min-max normalised count and sum of their selected scores (ties by
    their summed score); the mask marks labels ``s + offset - window .. s + offset + window``
    around each selected position s, documents in rank order, until ``max_tokens`` labels.

    Args:
        scores: :func:`differential_token_scores`' result, or a tensor [N, T] of per-token
            scores (larger = more behaviour-promoting; rows are training indices 0..N-1).
        percentile: the selection threshold's percentile, strictly between 0 and 100 (the
            paper: 99).
        window: labels of context marked on each side (the paper's released setting: 1).
        offset: the label a selected position's window is centred on, ``s + offset``: 1 (the
            token position s predicts) or 0 (the paper's code, label s).
        max_tokens: the most labels the mask may mark (the paper's token limit L); None for no
            limit. The mask stops at the first window that would exceed it.
        valid: [N, T] bool, the real tokens, with a tensor ``scores`` (default: all).

    Returns:
        The selection, the ranking and the mask.
    """
    if isinstance(scores, DifferentialScores):
        if valid is not None:
            raise InvalidInputError("valid comes with DifferentialScores already; pass none")
        table, real, idx = scores.tokens, scores.valid, scores.indices
        tiebreak = scores.total
        n_train, labels = _checked_rows(scores)
    elif isinstance(scores, Tensor):
        if scores.dim() != 2 or scores.numel() == 0:
            raise InvalidInputError(
                f"scores must be a tensor [N, T] of per-token scores, got shape "
                f"{tuple(scores.shape)}"
            )
        table = scores.to(torch.float64)
        real = torch.ones_like(table, dtype=torch.bool) if valid is None else torch.as_tensor(valid)
        if real.shape != table.shape:
            raise InvalidInputError(
                f"valid has shape {tuple(real.shape)}, the scores {tuple(table.shape)}"
            )
        real = real.to(torch.bool)
        idx = torch.arange(table.shape[0])
        tiebreak = (table * real).sum(1)
        n_train, labels = table.shape[0], None
    else:
        raise InvalidInputError(
            f"scores must be DifferentialScores or a tensor [N, T], got {type(scores).__name__}"
        )
    share = real_number(percentile)
    if share is None or not 0 < share < 100:
        raise InvalidInputError(
            f"percentile must be a number strictly between 0 and 100 (the paper uses 99), got "
            f"{percentile!r}"
        )
    width = integer_argument("window", window, 0)
    centre = whole_number(offset)
    if centre not in (0, 1):
        raise InvalidInputError(
            f"offset must be the integer 1 (the label the selected position predicts) or 0 (the "
            f"label at the position, as the paper's code), got {offset!r}"
        )
    limit = None if max_tokens is None else whole_number(max_tokens)
    if max_tokens is not None and (limit is None or limit < 1):
        raise InvalidInputError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    values = table[real]
    if values.numel() == 0:
        raise InvalidInputError("no real tokens to select from: every position is padding")
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError("the scores have NaN or Inf at real tokens")
    threshold = _percentile(values, share)
    selected = (table > threshold) & real
    count = selected.sum(1)
    total = (table * selected).sum(1)
    rank_score = _harmonic_mean(_min_max(count.to(torch.float64)), _min_max(total))
    by_tiebreak = torch.argsort(-tiebreak, stable=True)
    order = by_tiebreak[torch.argsort(-rank_score[by_tiebreak], stable=True)]
    if labels is None:  # the real tokens but the first, which no position predicts
        labels = real.clone()
        labels[:, 0] = False
    rows = _mask(selected, labels.to(real.device) & real, order, width, centre, limit)
    mask = rows.new_zeros(n_train, rows.shape[1])
    mask[idx.to(rows.device)] = rows  # in the training set's rows, as train_with_mask reads them
    return TokenSelection(
        threshold=threshold,
        selected=selected,
        count=count,
        total=total,
        rank_score=rank_score,
        order=order,
        indices=idx,
        mask=mask,
    )


def _checked_rows(scores: DifferentialScores) -> tuple[int, Tensor | None]:
    """N, the mask's rows, and the scored labels of ``scores`` (built by hand, they may lack
    them or hold others): ``indices`` n distinct training indices, N at least past every one,
    ``valid`` and ``scored`` bool [n, T] tables."""
    rows = scores.tokens.shape[0]
    idx = scores.indices
    if (
        not isinstance(idx, Tensor)
        or idx.dim() != 1
        or len(idx) != rows
        or rows == 0
        or idx.is_floating_point()
        or bool((idx < 0).any())
        or len(torch.unique(idx)) != rows
    ):
        raise InvalidInputError(
            f"DifferentialScores.indices must be {rows} distinct training indices >= 0, one "
            f"per row of its tokens {tuple(scores.tokens.shape)}, got {idx!r}"
        )
    for name, table in (("valid", scores.valid), ("scored", scores.scored)):
        if table is not None and (
            table.dtype != torch.bool or tuple(table.shape) != tuple(scores.tokens.shape)
        ):
            raise InvalidInputError(
                f"DifferentialScores.{name} must be a bool tensor shaped like its tokens "
                f"{tuple(scores.tokens.shape)}, got {table.dtype} of shape {tuple(table.shape)}"
                + (": an attention mask as .bool()" if name == "valid" else "")
            )
    largest = int(idx.max()) + 1
    n_train = largest if scores.n_train is None else whole_number(scores.n_train)
    if n_train is None or n_train < largest:
        raise InvalidInputError(
            f"DifferentialScores.n_train must be the training set's size, at least {largest} "
            f"(its largest index plus one), got {scores.n_train!r}"
        )
    return n_train, scores.scored


def _percentile(values: Tensor, percentile: float) -> float:
    """``numpy.percentile(values, percentile)`` (linear interpolation), without a size limit."""
    ordered = values.reshape(-1).sort().values
    position = percentile / 100 * (len(ordered) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo]))


def _min_max(x: Tensor) -> Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if float(span) > 0 else torch.zeros_like(x)


def _harmonic_mean(a: Tensor, b: Tensor) -> Tensor:
    both = a + b
    return torch.where(both > 0, 2 * a * b / both.clamp_min(1e-300), torch.zeros_like(a))


def _windows(selected: Tensor, window: int, offset: int) -> Tensor:
    """[n, T] bool: labels ``s + offset + d`` for ``|d| <= window`` around each selected s."""
    T = selected.shape[1]
    out = torch.zeros_like(selected)
    for d in range(offset - window, offset + window + 1):
        if d >= 0:
            out[:, d:] |= selected[:, : T - d] if d < T else selected[:, :0]
        else:
            out[:, : T + d] |= selected[:, -d:]
    return out


def _mask(
    selected: Tensor,
    labels: Tensor,
    order: Tensor,
    window: int,
    offset: int,
    max_tokens: int | None,
) -> Tensor:
    """The labels to suppress, [n, T] in the rows of ``selected``: the windows at ``labels``
    (those a position predicts: scored, real, never label 0), whole documents in rank order
    while ``max_tokens`` allows, then window by window in the first document that would exceed
    it (the paper's stopping rule)."""
    full = _windows(selected, window, offset) & labels
    if max_tokens is None or int(full.sum()) <= max_tokens:
        return full
    mask = torch.zeros_like(full)
    used = 0
    for row in order.tolist():
        size = int(full[row].sum())
        if used + size <= max_tokens:
            mask[row] = full[row]
            used += size
            continue
        for s in selected[row].nonzero().flatten().tolist():  # window by window, in order
            one = torch.zeros_like(selected[row : row + 1])
            one[0, s] = True
            span = _windows(one, window, offset)[0] & labels[row] & ~mask[row]
            if used + int(span.sum()) > max_tokens:
                return mask
            mask[row] |= span
            used += int(span.sum())
        return mask
    return mask


# ------------------------------------------------------------------------------ step 3
def train_with_mask(
    model: nn.Module,
    train: Any,
    mask: Tensor | None = None,
    *,
    penalty: float = 1.0,
    objective: Objective = "penalty",
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Train a causal LM with the next-token loss on unmasked labels and a penalty on masked ones.

    The paper's suppression objective (module docstring; docs/analyses.md §12), per batch of
    scored labels K (labels not -100, the first position never scored):

        objective="penalty":       (1/|K|) [ sum_{k unmasked} CE_k - penalty sum_{k masked} CE_k ]
        objective="unlikelihood":  (1/|K|) [ sum_{k unmasked} CE_k
                                             + penalty sum_{k masked} -log(1 - p_k) ]

    with ``CE_k = -log p_k`` the cross-entropy of label k given the tokens before it. Without a
    mask this is ordinary training (the baseline from the same initialisation and seed).
    ``steps`` minibatches of ``batch_size`` sequences are drawn, an epoch at a time, in an order
    fixed by ``seed`` (which also seeds dropout, without disturbing the caller's random state).

    Args:
        model: the causal LM (``model(**inputs)`` or ``model(input_ids)`` gives logits
            [B, T, V] or an output with ``.logits``), at its initialisation (training from
            scratch) or trained (continued training).
        train: the training sequences, ``(inputs, labels)`` as built by
            ``infkit.language_modeling.examples`` (inputs a tensor of ids or a dict).
        mask: [N, T] bool in the labels' positions (:attr:`TokenSelection.mask`, rows in the
            order of ``train``); None trains without suppression.
        penalty: lambda >= 0, the weight of the masked labels' term (the paper: 1).
        objective: ``"penalty"`` (the paper's subtracted cross-entropy) or ``"unlikelihood"``.
        steps: optimiser steps, >= 1.
        batch_size: sequences per step.
        lr: learning rate of the default optimiser (AdamW).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip the gradient's norm to this (None: no clipping).
        optimizer: builds the optimiser from the trainable parameters (default:
            ``torch.optim.AdamW(params, lr, weight_decay=weight_decay)``).
        seed: the seed of the batch order and of the model's own randomness (dropout).
        inplace: train ``model`` itself; by default a deep copy is trained and ``model`` is
            left unchanged.

    Returns:
        The trained model (``model`` itself when ``inplace``), in the training mode it had.
    """
    examples = ExampleSet(train, name="training set")
    n = len(examples)
    labels = torch.as_tensor(examples.collated()[1])
    if labels.dim() != 2 or labels.is_floating_point():
        raise InvalidInputError(
            f"the training labels must be token ids [N, T], got {labels.dtype} of shape "
            f"{tuple(labels.shape)}: infkit.language_modeling.examples(input_ids) builds them"
        )
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.shape != labels.shape:
            raise InvalidInputError(
                f"mask has shape {tuple(mask.shape)}, the training labels {tuple(labels.shape)}: "
                "one row per training sequence, in the labels' positions"
            )
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidInputError(
                f"mask must be bool (True: a label to penalise), or 0 and 1; got {mask.dtype} "
                "with other values: TokenSelection.mask is one"
            )
        mask = mask.to(torch.bool)
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    penalty = nonnegative_number("penalty", penalty)
    steps = integer_argument("steps", steps, 1)
    batch_size = integer_argument("batch_size", batch_size, 1)
    trained = model if inplace else copy.deepcopy(model)
    task = Task.language_modeling(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("the model has no trainable parameters")
    device = params[0].device
    opt = (
        optimizer(params)
        if optimizer is not None
        else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    )
    order = torch.Generator().manual_seed(seed)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), in_mode(trained, training=True):
        torch.manual_seed(seed)
        batches = _batch_order(n, batch_size, steps, order)
        for batch_idx in batches:
            batch = examples.take(batch_idx)
            inputs = _to(batch.inputs, device)
            y = torch.as_tensor(batch.targets).to(device).long()
            m = None if mask is None else mask[batch_idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = masked_loss(task.call_model(trained, inputs), y, m, penalty, objective)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
    return trained


def masked_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    penalty: float = 1.0,
    objective: Objective = "penalty",
) -> Tensor:
    """The batch objective of :func:`train_with_mask`, a scalar.

    Args:
        logits: [B, T, V], the model's outputs.
        labels: [B, T] token ids aligned with the inputs, -100 where not scored.
        mask: [B, T] bool in the labels' positions, or None (the plain mean next-token loss).
        penalty: lambda, the weight of the masked labels' term.
        objective: ``"penalty"`` or ``"unlikelihood"``.
    """
    z, y = logits[:, :-1], labels[:, 1:]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    ce = F.cross_entropy(
        z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(y.shape)
    scored = y != IGNORE_INDEX
    if mask is None:
        per_label = ce
    else:
        masked = mask[:, 1:] & scored
        if objective == "penalty":
            bad = -penalty * ce
        else:  # -log(1 - p) with p = exp(-CE): -log(-expm1(-CE)), finite while p < 1
            bad = -penalty * torch.log(-torch.expm1(-ce.clamp_min(1e-12)))
        per_label = torch.where(masked, bad, ce)
    return (per_label * scored).sum() / scored.sum().clamp_min(1)


def _batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """``steps`` index batches: epochs of a seeded permutation, cut in ``batch_size`` pieces
    (the last piece of an epoch may be shorter)."""
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[s : s + batch_size] for s in range(0, n, batch_size))
    return out[:steps]


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: torch.as_tensor(v).to(device) for k, v in inputs.items()}
    return torch.as_tensor(inputs).to(device)
