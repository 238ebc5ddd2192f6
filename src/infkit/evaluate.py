"""Faithfulness metrics: correlation with leave-one-out, LDS, detection AUC.

The per-query metrics (LDS, the leave-one-out correlation of each test example) come with a
bootstrap confidence interval of their mean over test examples (:func:`lds_interval`,
:func:`loo_interval`, docs/evaluation.md §6): a benchmark of a few dozen queries otherwise reads
differences that are noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from infkit.data import checked_indices, kept_masks
from infkit.errors import InvalidInputError, Notice, warn
from infkit.options import integer_argument, real_number

#: the fewest pairs a correlation is computed from
MIN_PAIRS = 3


@dataclass
class Correlation:
    pearson: float
    spearman: float
    n: int


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)


def require_finite(name: str, values: np.ndarray, hint: str) -> None:
    """Refuse a NaN or infinite entry of ``values``, naming its position and ``hint`` (where
    such a value comes from): a correlation over the others would read as a figure of them all."""
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        where = ", ".join(str(int(i)) for i in bad[0])
        raise InvalidInputError(
            f"{name}[{where}] is {values[tuple(bad[0])]} ({len(bad)} entries are not finite): "
            f"{hint}"
        )


#: what a non-finite predicted or actual value usually is
NON_FINITE_SCORE = "recompute the scores (an overflow or a failed solve), or leave the example out"
NON_FINITE_ACTUAL = (
    "a retraining that diverged or a measurement that overflowed; retrain it, or leave it out"
)


def correlation(predicted: Tensor | np.ndarray, actual: Tensor | np.ndarray) -> Correlation:
    """Pearson and Spearman correlation of two equally long vectors (flattened)."""
    p, a = _np(predicted).reshape(-1), _np(actual).reshape(-1)
    if p.shape != a.shape:
        raise InvalidInputError(f"predicted has {p.size} values but actual has {a.size}")
    if p.size < MIN_PAIRS:
        raise InvalidInputError(f"a correlation needs at least {MIN_PAIRS} pairs")
    require_finite("predicted (flattened)", p, NON_FINITE_SCORE)
    require_finite("actual (flattened)", a, NON_FINITE_ACTUAL)
    constant = [name for name, x in (("predicted", p), ("actual", a)) if np.ptp(x) == 0]
    if constant:  # scipy's ConstantInputWarning, said in infkit's words
        warn(
            f"{' and '.join(constant)} {'is' if len(constant) == 1 else 'are'} constant "
            f"({', '.join(f'{x[0]:.6g}' for x in (p, a) if np.ptp(x) == 0)}): the correlation "
            "is undefined (NaN)",
            Notice,
        )
        return Correlation(float("nan"), float("nan"), p.size)
    from scipy import stats  # imported here: scipy.stats takes seconds to import

    return Correlation(float(stats.pearsonr(p, a)[0]), float(stats.spearmanr(p, a)[0]), p.size)


def loo_correlation(scores: Tensor, actual: Tensor, indices: Tensor | None = None) -> Correlation:
    """Correlation of predicted removal effects with actual leave-one-out changes: one
    correlation of all the (test example, training example) pairs, pooled.

    With several test examples the pooled figure mixes their scales (a query with large
    effects dominates it, and the differences between queries alone can make it high), so it
    says so in a :class:`~infkit.errors.Notice`; :func:`loo_interval` gives the mean over the
    test examples of each one's correlation (docs/evaluation.md §6).

    Args:
        scores: predicted changes, [n_test, n_train] (``Influence.scores``) or [n_train].
        actual: actual changes, [n_test, k] or [k] (``retrain.leave_one_out(...).measurement``).
        indices: the k training indices ``actual`` covers (default: all).
    """
    predicted = _at(scores, indices, actual)
    found = correlation(predicted, actual)
    if predicted.dim() == 2 and predicted.shape[0] > 1:
        warn(
            f"loo_correlation pooled the pairs of {predicted.shape[0]} test examples into one "
            "correlation, where each test example's effects have a scale of their own: "
            "evaluate.loo_interval(scores, actual, indices) gives the mean of the per-example "
            "correlations, with an interval",
            Notice,
        )
    return found


def _at(scores: Tensor, indices: Tensor | None, actual: Tensor | None = None) -> Tensor:
    """``scores[..., indices]``, the training indices checked (in range, not negative) and, with
    ``actual``, as many as its last axis holds."""
    scores = torch.as_tensor(scores)
    picked = (
        scores
        if indices is None
        else scores[..., checked_indices(indices, scores.shape[-1], unique=True)]
    )
    actual = None if actual is None else torch.as_tensor(actual)
    if actual is not None and actual.dim() and picked.shape[-1] != actual.shape[-1]:
        # (the pooled sizes were compared: "predicted has 50 values but actual has 800")
        held = actual.shape[-1]
        raise InvalidInputError(
            f"scores cover {picked.shape[-1]} training examples and actual {held}, and no "
            f"indices= say which {held} of them actual holds: pass leave_one_out(...).indices"
            if indices is None
            else f"indices= names {picked.shape[-1]} training examples, but actual covers "
            f"{held} (its last axis): pass the training indices its columns belong to "
            "(leave_one_out(...).indices)"
        )
    return picked


def lds(scores: Tensor, masks: Tensor, actual: Tensor) -> float:
    """Linear datamodeling score (docs/evaluation.md §4), oriented for removal-effect scores.

    The datamodel prediction for a subset S is m(full) + sum of the removal effects of the
    examples left out of S; LDS is the Spearman correlation of that with the measurement of a
    model retrained on S, across subsets, averaged over test examples.

    Args:
        scores: [n_test, n_train] removal effects.
        masks: [m, n_train] bool, True for kept examples.
        actual: [m, n_test] measurements of the models retrained on each subset.

    Queries whose LDS is undefined (a measurement constant across the subsets) are left out of
    the mean, with a :class:`~infkit.errors.Notice` saying how many; where none is defined,
    an error.
    """
    values = defined_values("LDS", lds_per_query(scores, masks, actual), "across the subsets")
    return float(np.mean(values[~np.isnan(values)]))


def defined_values(what: str, values: np.ndarray, across: str) -> np.ndarray:
    """``values`` (per query, NaN where undefined), refused where none is defined and said in
    a Notice where some are not (a mean over the others would read as one over all)."""
    defined = int((~np.isnan(values)).sum())
    if defined == 0:
        raise InvalidInputError(
            f"the {what} is undefined for each of the {values.size} queries: their "
            f"measurements (or their predictions) are constant {across}"
        )
    if defined < values.size:
        warn(
            f"the {what} is the mean over {defined} of {values.size} queries: the other "
            f"{values.size - defined} have measurements or predictions constant {across} "
            "(NaN in the per-query values)",
            Notice,
        )
    return values


def lds_per_query(scores: Tensor, masks: Tensor, actual: Tensor) -> np.ndarray:
    """The LDS of each test example, [n_test] (NaN where the correlation is undefined, e.g. a
    constant measurement); :func:`lds` is their mean. Arguments as for :func:`lds`."""
    S, Y = _np(scores), _np(actual)
    M = kept_masks(masks, "retrain.subsets(...).masks gives them").cpu().numpy()
    if (
        S.ndim != 2
        or M.ndim != 2
        or M.shape[1] != S.shape[1]
        or Y.shape != (M.shape[0], S.shape[0])
    ):
        raise InvalidInputError(
            f"shapes do not line up: scores {S.shape}, masks {M.shape}, actual {Y.shape}; "
            "expected [T, N], [m, N], [m, T]"
        )
    if M.shape[0] < MIN_PAIRS:
        raise InvalidInputError(
            f"the LDS correlates across subsets and needs at least {MIN_PAIRS} of them, got "
            f"{M.shape[0]} (with 2 every correlation is +1 or -1): retrain on more subsets "
            "(retrain.subsets(..., n_subsets=m); the literature uses 50 or more)"
        )
    require_finite("scores", S, NON_FINITE_SCORE)
    require_finite("actual (subset, query)", Y, NON_FINITE_ACTUAL)
    from scipy import stats

    predicted = (~M).astype(float) @ S.T  # [m, T]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # NaN says it, per query
        return np.array(
            [stats.spearmanr(predicted[:, t], Y[:, t])[0] for t in range(S.shape[0])], dtype=float
        )


@dataclass
class Interval:
    """The mean of a per-query metric with a percentile-bootstrap confidence interval.

    Attributes:
        mean: the mean over the queries with a defined value.
        low: the lower end of the interval.
        high: the upper end.
        confidence: the interval's nominal coverage, e.g. 0.95.
        values: [n_test] the per-query values (NaN where undefined).
        n: how many queries have a defined value.
    """

    mean: float
    low: float
    high: float
    confidence: float
    values: np.ndarray
    n: int

    def __str__(self) -> str:
        level = f"{100 * self.confidence:g}%"
        return f"{self.mean:.3f} [{level}: {self.low:.3f}, {self.high:.3f}] over {self.n} queries"


def bootstrap_mean(
    values: Tensor | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (NaN skipped, with a Notice saying how many) with a
    percentile-bootstrap interval: the queries are resampled with replacement ``resamples``
    times and the interval is the central ``confidence`` share of the resampled means.

    Args:
        values: [n] per-query values.
        confidence: nominal coverage, in (0, 1).
        resamples: bootstrap resamples (at least 100).
        seed: seed of the resampling.
    """
    resamples = _resamples(confidence, resamples)  # before any word on the values
    all_values = _np(values).reshape(-1)
    infinite = np.argwhere(np.isinf(all_values))
    if len(infinite):
        raise InvalidInputError(
            f"values[{int(infinite[0, 0])}] is {all_values[infinite[0, 0]]}: NaN is skipped as "
            "undefined, an infinite value is not; recompute it or leave it out"
        )
    defined = int((~np.isnan(all_values)).sum())
    if 2 <= defined < all_values.size:
        warn(
            f"the mean is over {defined} of {all_values.size} values: the other "
            f"{all_values.size - defined} are NaN, left out",
            Notice,
        )
    return _bootstrap(all_values, confidence, resamples, seed)


def _resamples(confidence: float, resamples: int) -> int:
    """The number of resamples, once it and ``confidence`` are checked."""
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    return integer_argument("resamples", resamples, 100)


def _bootstrap(all_values: np.ndarray, confidence: float, resamples: int, seed: int) -> Interval:
    """:func:`bootstrap_mean` of finite-or-NaN ``all_values`` whose NaN were said already."""
    resamples = _resamples(confidence, resamples)
    defined = all_values[~np.isnan(all_values)]
    if defined.size < 2:
        raise InvalidInputError(
            f"a bootstrap interval needs at least 2 queries with a defined value, got "
            f"{defined.size} (of {all_values.size}): use more test examples"
        )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, defined.size, size=(resamples, defined.size))
    means = defined[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(
        float(defined.mean()), float(low), float(high), confidence, all_values, int(defined.size)
    )


def lds_interval(
    scores: Tensor,
    masks: Tensor,
    actual: Tensor,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """:func:`lds` with a bootstrap interval over test examples (docs/evaluation.md §6).

    Args:
        scores: [n_test, n_train] removal effects.
        masks: [m, n_train] bool, True for kept examples (``retrain.subsets(...).masks``).
        actual: [m, n_test] measurements of the retrained models.
        confidence: nominal coverage of the interval.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    values = defined_values("LDS", lds_per_query(scores, masks, actual), "across the subsets")
    return _bootstrap(values, confidence, resamples, seed)


def loo_interval(
    scores: Tensor,
    actual: Tensor,
    indices: Tensor | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The Spearman correlation of predicted with actual leave-one-out changes, per test
    example, averaged with a bootstrap interval over test examples (docs/evaluation.md §6).

    Args:
        scores: [n_test, n_train] predicted changes (``Influence.scores``).
        actual: [n_test, k] actual changes (``retrain.leave_one_out(...).measurement``).
        indices: the k training indices ``actual`` covers (default: all).
        confidence: nominal coverage of the interval.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    pred = _np(_at(scores, indices, actual))
    act = _np(actual)
    if pred.ndim != 2 or pred.shape != act.shape:
        raise InvalidInputError(
            f"predicted {pred.shape} and actual {act.shape} must both be [n_test, k]"
        )
    if pred.shape[1] < MIN_PAIRS:
        raise InvalidInputError(
            f"a correlation needs at least {MIN_PAIRS} pairs: {pred.shape[1]} training examples"
        )
    require_finite("predicted (query, example)", pred, NON_FINITE_SCORE)
    require_finite("actual (query, example)", act, NON_FINITE_ACTUAL)
    from scipy import stats

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # NaN says it, per query
        values = np.array([stats.spearmanr(p, a)[0] for p, a in zip(pred, act)], dtype=float)
    values = defined_values("leave-one-out correlation", values, "across the examples")
    return _bootstrap(values, confidence, resamples, seed)


def detection_inputs(
    scores: Tensor | np.ndarray, is_flagged: Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` as finite floats and ``is_flagged`` as booleans (given as bool, or 0 and 1),
    of one length, or an error naming what is wrong."""
    arrays = []
    for name, given in (("scores", scores), ("is_flagged", is_flagged)):
        try:
            values = _np(given)
        except (TypeError, ValueError) as error:
            raise InvalidInputError(f"{name} must be numbers, one per example ({error})") from error
        if values.ndim != 1 or values.size == 0:
            raise InvalidInputError(
                f"{name} must hold one number per example (a non-empty 1-D array or tensor), "
                f"got shape {values.shape}"
            )
        arrays.append(values)
    s, flags = arrays
    if s.shape != flags.shape:
        raise InvalidInputError(
            f"scores has {s.size} values but is_flagged has {flags.size}: is_flagged is a mask, "
            "one boolean per example (for a list of indices: mask = torch.zeros(N, "
            "dtype=torch.bool); mask[indices] = True)"
        )
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise InvalidInputError(
            f"scores of example {bad} is {s[bad]}: rank finite scores (a NaN ranks nowhere, and "
            "an infinite score is an overflow to recompute in a wider precision, not a rank)"
        )
    if flags.dtype != bool and not np.isin(flags, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(flags, (0, 1)))[0])
        raise InvalidInputError(
            f"is_flagged must hold booleans (or 0 and 1); example {bad} is {flags[bad]}"
        )
    return s, flags.astype(bool)


def detection_auc(scores: Tensor | np.ndarray, is_flagged: Tensor | np.ndarray) -> float:
    """ROC AUC of ranking examples by ``scores`` (higher = more suspicious) against the truth."""
    s, y = detection_inputs(scores, is_flagged)
    if y.all() or not y.any():
        raise InvalidInputError("detection AUC needs both flagged and unflagged examples")
    from scipy.stats import rankdata

    # Mann-Whitney: the probability that a flagged example outranks an unflagged one (ties 1/2)
    ranks = rankdata(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fraction_found(
    scores: Tensor | np.ndarray, is_flagged: Tensor | np.ndarray, inspected: float
) -> float:
    """Recall when inspecting the top ``inspected`` fraction ranked by ``scores``.

    The share of all flagged examples that are found among the ``inspected`` fraction of
    examples with the highest scores (e.g. 0.97 = 97% of the mislabelled examples found when
    inspecting the top 10%). Scores tied at the cut count as a random choice among them would
    on average (as the AUC counts ties as 1/2): a tie group of g examples, f of them flagged,
    that r inspected places reach adds ``r f / g``, not the flagged ones first or last
    (:func:`found_curve`).
    """
    s, y = detection_inputs(scores, is_flagged)
    if not y.any():
        raise InvalidInputError(
            "the fraction found needs at least one flagged example (is_flagged has none)"
        )
    fraction = real_number(inspected)
    if fraction is None or not (0 < fraction <= 1):
        raise InvalidInputError(
            f"inspected is the fraction of examples inspected, in (0, 1], got {inspected!r}"
        )
    k = max(1, round(fraction * s.size))
    return float(found_curve(s, y)[k - 1] / y.sum())


def found_curve(scores: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """The expected number of flagged examples found after inspecting the top 1, 2, ..., N
    of ``scores`` (checked finite, :func:`detection_inputs`), ties counted as a random order
    among them would on average: inside a tie group of g examples, f of them flagged, each
    place adds ``f / g`` (so a ranking of constant scores is the diagonal, not the flagged
    ones first because they come first in the data)."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], flags[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    sizes = np.diff(np.r_[starts, ranked.size])
    group_hits = np.add.reduceat(hits, starts)
    return np.cumsum(np.repeat(group_hits / sizes, sizes))


def relative_error(predicted: Tensor, actual: Tensor) -> float:
    """||predicted - actual|| / ||actual||, of two arrays of one shape (or one size)."""
    p, a = (
        torch.as_tensor(predicted, dtype=torch.float64).detach(),
        torch.as_tensor(actual, dtype=torch.float64).detach(),
    )
    if p.shape != a.shape:
        if p.numel() != a.numel():
            raise InvalidInputError(
                f"predicted {tuple(p.shape)} and actual {tuple(a.shape)} differ in size: a "
                "relative error compares the same quantities, entry by entry"
            )
        p, a = p.reshape(-1), a.reshape(-1)
    require_finite("predicted", p.cpu().numpy(), NON_FINITE_SCORE)
    require_finite("actual", a.cpu().numpy(), NON_FINITE_ACTUAL)
    if float(a.norm()) == 0.0:
        raise InvalidInputError(
            "actual is zero, so an error relative to it is undefined: compare the absolute "
            "error, (predicted - actual).norm()"
        )
    return float((p - a).norm() / a.norm())
