"""Sign and orientation (docs/testing.md §4): scores are removal effects, positive = helped."""

from __future__ import annotations

import torch

import infkit


def _binary_data(n: int = 80, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = (X[:, 0] - X[:, 1] + 0.8 * torch.randn(n, generator=gen, dtype=torch.float64) > 0).long()
    return X, y


def _fit_logreg(X, y, l2=1e-2, measurement="loss"):
    model = torch.nn.Linear(3, 2).double()
    task = infkit.Task.classification(model, measurement=measurement)
    infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12)
    return model, task


def test_removing_an_aligned_example_raises_the_test_loss() -> None:
    X, y = _binary_data()
    l2 = 1e-6  # the regulariser share is negligible: the attributed gradient is grad l_j
    _, task = _fit_logreg(X, y, l2=l2)
    inf = infkit.Influence(task, l2=l2).fit((X, y))
    # A test example identical to training example j: j's gradient aligns with its test loss,
    # so S[j, j] = (1/N) g_j^T H^{-1} g_j > 0.
    S = inf.scores((X, y))
    assert bool((S.diagonal() > 0).all())
    # Self-influence is the same quantity: removal effect on its own loss.
    torch.testing.assert_close(inf.self_scores(), S.diagonal(), rtol=1e-10, atol=1e-14)
    # Actual retraining agrees on the sign for the most self-influential example.
    j = int(inf.self_scores().argmax())
    retrained = infkit.retrain.without(task, (X, y), [j], l2, tolerance=1e-12)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(task.model(X[j : j + 1]), y[j : j + 1])
    assert float(retrained.losses((X[j : j + 1], y[j : j + 1]))[0] - base) > 0


def test_duplicates_increase_their_contribution_to_their_own_margin() -> None:
    X, y = _binary_data()
    j = 3
    contributions = []
    for copies in (1, 3, 6):
        Xd = torch.cat([X, X[j : j + 1].repeat(copies - 1, 1)])
        yd = torch.cat([y, y[j : j + 1].repeat(copies - 1)])
        _, task = _fit_logreg(Xd, yd, measurement="margin")
        inf = infkit.Influence(task, estimator="newton", l2=1e-2).fit((Xd, yd))
        group = [j, *range(len(X), len(Xd))]
        change = inf.remove(group).measurement((X[j : j + 1], y[j : j + 1]))[0]
        # The contribution of the copies to the margin is minus the removal effect.
        contributions.append(-float(change))
        assert task.higher_is_better
    assert contributions[0] > 0
    assert contributions[0] < contributions[1] < contributions[2]


def test_top_k_orientation_for_loss_and_margin() -> None:
    X, y = _binary_data()
    query = (X[:4], y[:4])
    _, task = _fit_logreg(X, y)
    top = infkit.Influence(task, l2=1e-2).fit((X, y)).top_k(query, k=5)
    assert bool((top.proponent_scores[:, 0] > 0).all())
    assert bool((top.opponent_scores[:, 0] < 0).all())
    assert bool((top.proponent_scores[:, :-1] >= top.proponent_scores[:, 1:]).all())
    # The proponent of a loss is the example whose removal raises the loss most...
    _, task_m = _fit_logreg(X, y, measurement="margin")
    top_m = infkit.Influence(task_m, l2=1e-2).fit((X, y)).top_k(query, k=5)
    # ...and of a margin, the one whose removal lowers the margin most: same examples.
    assert bool((top_m.proponent_scores < 0).all())
    assert bool((top_m.proponent_indices[:, 0] == top.proponent_indices[:, 0]).all())


def test_top_k_takes_a_numpy_integer_and_refuses_a_fraction() -> None:
    """A k computed with NumPy (an np.int64) ranks as the same int does; 2.5 and True are
    refused by name (they used to be refused alike, the NumPy integer with them)."""
    import numpy as np
    import pytest

    from infkit.errors import InvalidInputError

    X, y = _binary_data()
    query = (X[:3], y[:3])
    _, task = _fit_logreg(X, y)
    fitted = infkit.Influence(task, l2=1e-2).fit((X, y))
    expected = fitted.top_k(query, k=4)
    top = fitted.top_k(query, k=np.int64(4))
    assert top.proponent_indices.shape == (3, 4)
    assert bool((top.proponent_indices == expected.proponent_indices).all())
    for bad in (2.5, True, 0):
        with pytest.raises(InvalidInputError, match=r"k must be an integer >= 1, got"):
            fitted.top_k(query, k=bad)


def test_a_callable_measurement_takes_its_orientation() -> None:
    """The probability of the true class, higher-is-better: with higher_is_better=True the
    proponents are the examples whose removal lowers it (negative scores), the same examples
    as the loss's proponents; without it the callable is taken as loss-like, with a notice (a
    tester's proponents were the examples that lowered the probability); the loss and the
    margin refuse an orientation that contradicts theirs."""
    import pytest

    from infkit.errors import InvalidInputError, Notice

    X, y = _binary_data()
    query = (X[:4], y[:4])
    model, task = _fit_logreg(X, y)

    def probability(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out.softmax(-1).gather(1, target[:, None])[:, 0]

    loss_top = infkit.Influence(task, l2=1e-2).fit((X, y)).top_k(query, k=3)
    prob = infkit.Task.classification(model, measurement=probability, higher_is_better=True)
    top = infkit.Influence(prob, l2=1e-2).fit((X, y)).top_k(query, k=3)
    assert prob.higher_is_better and bool((top.proponent_scores < 0).all())
    assert bool((top.proponent_indices[:, 0] == loss_top.proponent_indices[:, 0]).all())
    with pytest.warns(Notice, match="taken as lower-is-better"):
        loss_like = infkit.Task.classification(model, measurement=probability)
    assert not loss_like.higher_is_better
    with pytest.raises(InvalidInputError, match="'loss' is lower-is-better"):
        infkit.Task.classification(model, higher_is_better=True)
    with pytest.raises(InvalidInputError, match="'margin' is higher-is-better"):
        infkit.Task.binary_classification(model, measurement="margin", higher_is_better=False)


def test_upweighting_is_minus_n_times_removal() -> None:
    """Koh & Liang's upweighting derivative is -N x the removal effect (docs/conventions.md).

    Upweighting j by eps (with its regulariser share) trains on
    mean_i l_i + eps * l_j + (l2/2)(1 + eps)||theta||^2; the test loss then moves by about
    eps * (-N) * scores[t, j].
    """
    import copy

    X, y = _binary_data()
    n, j, eps, l2 = len(X), 7, 1e-4, 1e-2
    model, task = _fit_logreg(X, y, l2=l2)
    inf = infkit.Influence(task, l2=l2).fit((X, y))
    weights = torch.ones(n, dtype=torch.float64)
    weights[j] += eps * n

    def weighted_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(out, target[:, 0], reduction="none")
        return ce * weights[target[:, 1]]

    upweighted = copy.deepcopy(model)
    up_task = infkit.Task(upweighted, loss=weighted_loss)
    targets = torch.stack([y, torch.arange(n)], dim=1)
    assert infkit.train_to_optimum(up_task, (X, targets), l2 * (1 + eps), tolerance=1e-13).converged
    q = (X[:5], y[:5])
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        actual = ce(upweighted(q[0]), q[1], reduction="none") - ce(
            model(q[0]), q[1], reduction="none"
        )
    predicted = -n * eps * inf.scores(q)[:, j]
    torch.testing.assert_close(actual, predicted, rtol=1e-2, atol=1e-10)
