"""Bootstrap intervals of LDS and leave-one-out correlation (docs/evaluation.md §6), against
independent computations: ranks by hand, scipy's own bootstrap, and the coverage of a known mean."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from infkit import evaluate
from infkit.errors import InvalidInputError, Notice


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x)
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def _spearman_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)  # no ties in continuous random data
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture()
def bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, t, m = 40, 12, 30
    scores = torch.randn(t, n, generator=g, dtype=torch.float64)
    masks = torch.rand(m, n, generator=g) < 0.5
    # measurements: the additive prediction plus noise, so the LDS is positive but not 1
    actual = (~masks).double() @ scores.T + 2.0 * torch.randn(
        m, t, generator=g, dtype=torch.float64
    )
    return scores, masks, actual


def test_per_query_lds_is_the_spearman_of_the_additive_prediction(bank) -> None:
    scores, masks, actual = bank
    per_query = evaluate.lds_per_query(scores, masks, actual)
    predicted = ((~masks).double() @ scores.T).numpy()
    for t in range(scores.shape[0]):
        assert per_query[t] == pytest.approx(
            _spearman_by_hand(predicted[:, t], actual[:, t].numpy()), abs=1e-12
        )
    assert evaluate.lds(scores, masks, actual) == pytest.approx(per_query.mean(), abs=1e-15)


def test_interval_matches_scipys_percentile_bootstrap(bank) -> None:
    scores, masks, actual = bank
    ours = evaluate.lds_interval(scores, masks, actual, confidence=0.9, resamples=20000)
    reference = stats.bootstrap(
        (ours.values,),
        np.mean,
        confidence_level=0.9,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(1),
    ).confidence_interval
    # two Monte Carlo estimates of the same quantiles: within a few hundredths of the spread
    spread = ours.values.std() / np.sqrt(ours.n)
    assert abs(ours.low - reference.low) < 0.05 * spread * 4
    assert abs(ours.high - reference.high) < 0.05 * spread * 4
    assert ours.low < ours.mean < ours.high
    assert ours.n == scores.shape[0] and "90%" in str(ours)


def test_coverage_of_a_known_mean() -> None:
    """Per-query values drawn around a known mean: the 90% interval covers it in about 90% of
    repetitions (the percentile bootstrap under-covers a little at n = 40)."""
    rng = np.random.default_rng(0)
    covered = 0
    reps = 300
    for r in range(reps):
        values = rng.normal(0.5, 0.2, size=40)
        interval = evaluate.bootstrap_mean(values, confidence=0.9, resamples=1000, seed=r)
        covered += interval.low <= 0.5 <= interval.high
    assert 0.82 <= covered / reps <= 0.96


def test_loo_interval_per_query_is_spearman_of_each_row(bank) -> None:
    scores, _, _ = bank
    g = torch.Generator().manual_seed(1)
    indices = torch.arange(0, 40, 4)
    actual = scores[:, indices] + 0.5 * torch.randn(scores.shape[0], 10, generator=g).double()
    interval = evaluate.loo_interval(scores, actual, indices)
    for t in range(scores.shape[0]):
        expected = evaluate.correlation(scores[t, indices], actual[t]).spearman
        assert interval.values[t] == pytest.approx(expected, abs=1e-12)
    assert interval.low <= interval.mean <= interval.high


def test_loo_correlation_pools_several_queries_and_says_so() -> None:
    """A tester read docs/evaluation.md §6 as loo_correlation being the per-query mean: it pools
    the pairs. Two queries whose own correlations are -1, with effects of different scales:
    the pooled Spearman is +11/21 (the scales alone), the per-query mean -1; pooled, it says so."""
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [11.0, 12.0, 13.0, 14.0]], dtype=torch.float64)
    actual = torch.tensor([[4.0, 3.0, 2.0, 1.0], [14.0, 13.0, 12.0, 11.0]], dtype=torch.float64)
    with pytest.warns(Notice, match=r"pooled the pairs of 2 test examples.*loo_interval"):
        pooled = evaluate.loo_correlation(scores, actual)
    flat = stats.spearmanr(scores.reshape(-1).numpy(), actual.reshape(-1).numpy())[0]
    assert pooled.spearman == pytest.approx(flat, abs=1e-12)
    assert pooled.spearman == pytest.approx(11 / 21, abs=1e-12) and pooled.n == 8
    assert evaluate.loo_interval(scores, actual).mean == pytest.approx(-1.0, abs=1e-12)
    with warnings.catch_warnings():  # one query (or a vector): its own correlation, quiet
        warnings.simplefilter("error")
        single = evaluate.loo_correlation(scores[:1], actual[:1])
        vector = evaluate.loo_correlation(scores[0], actual[0])
    assert single.spearman == pytest.approx(-1.0) and vector.spearman == pytest.approx(-1.0)


def test_undefined_queries_are_skipped_and_bad_input_is_refused(bank) -> None:
    scores, masks, actual = bank
    actual = actual.clone()
    actual[:, 0] = 1.0  # a constant measurement: no rank correlation
    with pytest.warns(Notice, match=rf"mean over {scores.shape[0] - 1} of {scores.shape[0]}"):
        interval = evaluate.lds_interval(scores, masks, actual)
    assert np.isnan(interval.values[0]) and interval.n == scores.shape[0] - 1
    # the interval warned once (the LDS's own Notice), not again from the bootstrap
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate.lds_interval(scores, masks, actual)
    assert len([w for w in caught if issubclass(w.category, Notice)]) == 1
    # bootstrap_mean skipped NaN without a word, and took an Inf into the mean
    values = np.array([0.2, np.nan, 0.4, 0.6])
    with pytest.warns(Notice, match="the mean is over 3 of 4 values: the other 1 are NaN"):
        skipped = evaluate.bootstrap_mean(values)
    assert skipped.mean == pytest.approx(0.4, abs=1e-15) and skipped.n == 3
    with pytest.raises(InvalidInputError, match=r"values\[2\] is inf: NaN is skipped"):
        evaluate.bootstrap_mean([0.1, 0.2, np.inf])
    with pytest.raises(InvalidInputError, match="confidence"):
        evaluate.bootstrap_mean([0.1, 0.2], confidence=1.5)
    with pytest.raises(InvalidInputError, match="at least 2 queries"):
        evaluate.bootstrap_mean([0.3])
    with pytest.raises(InvalidInputError, match="resamples"):
        evaluate.bootstrap_mean([0.1, 0.2], resamples=10)
    with pytest.raises(InvalidInputError, match="shapes do not line up"):
        evaluate.lds_interval(scores, masks[:, :5], actual)
