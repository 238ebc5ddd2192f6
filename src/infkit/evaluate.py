"""Faithfulness metrics: correlation with leave-one-out, LDS, detection AUC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from infkit.errors import InvalidInputError


@dataclass
class Correlation:
    pearson: float
    spearman: float
    n: int


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)


def correlation(predicted: Tensor | np.ndarray, actual: Tensor | np.ndarray) -> Correlation:
    """Pearson and Spearman correlation of two equally long vectors (flattened)."""
    p, a = _np(predicted).reshape(-1), _np(actual).reshape(-1)
    if p.shape != a.shape:
        raise InvalidInputError(f"predicted has {p.size} values but actual has {a.size}")
    if p.size < 3:
        raise InvalidInputError("a correlation needs at least 3 pairs")
    from scipy import stats  # imported here: scipy.stats takes seconds to import

    return Correlation(float(stats.pearsonr(p, a)[0]), float(stats.spearmanr(p, a)[0]), p.size)


def loo_correlation(scores: Tensor, actual: Tensor, indices: Tensor | None = None) -> Correlation:
    """Correlation of predicted removal effects with actual leave-one-out changes.

    Args:
        scores: predicted changes, [n_test, n_train] (``Influence.scores``) or [n_train].
        actual: actual changes, [n_test, k] or [k] (``retrain.leave_one_out(...).measurement``).
        indices: the k training indices ``actual`` covers (default: all).
    """
    pred = scores if indices is None else scores[..., torch.as_tensor(indices)]
    return correlation(pred, actual)


def lds(scores: Tensor, masks: Tensor, actual: Tensor) -> float:
    """Linear datamodeling score (docs/evaluation.md §4), oriented for removal-effect scores.

    The datamodel prediction for a subset S is m(full) + sum of the removal effects of the
    examples left out of S; LDS is the Spearman correlation of that with the measurement of a
    model retrained on S, across subsets, averaged over test examples.

    Args:
        scores: [n_test, n_train] removal effects.
        masks: [m, n_train] bool, True for kept examples.
        actual: [m, n_test] measurements of the models retrained on each subset.
    """
    S, M, Y = _np(scores), _np(masks).astype(bool), _np(actual)
    if M.shape[1] != S.shape[1] or Y.shape != (M.shape[0], S.shape[0]):
        raise InvalidInputError(
            f"shapes do not line up: scores {S.shape}, masks {M.shape}, actual {Y.shape}; "
            "expected [T, N], [m, N], [m, T]"
        )
    from scipy import stats

    predicted = (~M).astype(float) @ S.T  # [m, T]
    rhos = [stats.spearmanr(predicted[:, t], Y[:, t])[0] for t in range(S.shape[0])]
    return float(np.nanmean(rhos))


def detection_auc(scores: Tensor | np.ndarray, is_flagged: Tensor | np.ndarray) -> float:
    """ROC AUC of ranking examples by ``scores`` (higher = more suspicious) against the truth."""
    s, y = _np(scores).reshape(-1), _np(is_flagged).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise InvalidInputError(f"scores has {s.size} values but is_flagged has {y.size}")
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
    inspecting the top 10%).
    """
    s, y = _np(scores).reshape(-1), _np(is_flagged).reshape(-1).astype(bool)
    k = max(1, round(inspected * s.size))
    top = np.argsort(-s)[:k]
    return float(y[top].sum() / max(y.sum(), 1))


def relative_error(predicted: Tensor, actual: Tensor) -> float:
    """||predicted - actual|| / ||actual||."""
    p, a = (
        torch.as_tensor(predicted, dtype=torch.float64),
        torch.as_tensor(actual, dtype=torch.float64),
    )
    return float((p - a).norm() / a.norm().clamp_min(1e-300))
