"""Exact influence against closed forms: ordinary least squares and ridge regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import infkit
from infkit.evaluate import relative_error


def _ols_problem(n: int = 50, d: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return X, y


def _linear_model(d: int, c: int = 1, bias: bool = False) -> torch.nn.Module:
    return torch.nn.Linear(d, c, bias=bias).double()


def test_ols_influence_and_leverage_match_closed_form() -> None:
    X, y = _ols_problem()
    n, d = X.shape
    XtX_inv = np.linalg.inv(X.T @ X)
    beta = XtX_inv @ X.T @ y
    model = _linear_model(d)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(beta).reshape(1, d))
    task = infkit.Task.regression(model)
    data = (torch.as_tensor(X), torch.as_tensor(y).reshape(n, 1))
    residual = X @ beta - y
    hat = np.einsum("ij,jk,ik->i", X, XtX_inv, X)

    inf = infkit.Influence(task, "exact", "if", l2=0.0).fit(data)
    # Classic IF: Delta beta_j = (X^T X)^{-1} x_j e_j (removal, 1/N included).
    for j in (0, 7, 31):
        expected = XtX_inv @ X[j] * residual[j]
        assert relative_error(inf.remove([j]).params, torch.as_tensor(expected)) < 1e-10
    np.testing.assert_allclose(inf.leverages().numpy(), hat, rtol=1e-10, atol=1e-13)
    # Leverages of OLS sum to the number of parameters (trace of the hat matrix).
    assert abs(float(inf.leverages().sum()) - d) < 1e-10

    # RIF and Newton are exact leave-one-out for OLS: Delta beta_j = IF_j / (1 - h_j).
    for estimator in ("rif", "newton"):
        inf_e = infkit.Influence(task, "exact", estimator, l2=0.0).fit(data)
        for j in (0, 7, 31):
            loo = XtX_inv @ X[j] * residual[j] / (1 - hat[j])
            assert relative_error(inf_e.remove([j]).params, torch.as_tensor(loo)) < 1e-9
            keep = np.delete(np.arange(n), j)
            refit = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
            assert relative_error(inf_e.remove([j]).params, torch.as_tensor(refit - beta)) < 1e-9


def test_newton_scores_linearise_the_measurement_and_its_model_is_retraining() -> None:
    """OLS: Newton's parameter change is leave-one-out's exactly, and its self-score is the
    measurement linearised along it, grad l_j^T (beta_-j - beta), which misses the loss's
    curvature term (1/2) (x_j^T Delta)^2 (a tester read the score as the retrained loss change:
    11% apart on a high-leverage ridge example); the model remove([j]).model() returns gives
    the retrained loss change itself (docs/estimators.md §5)."""
    X, y = _ols_problem(n=30, d=4, seed=3)
    n, d = X.shape
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    model = _linear_model(d)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(beta).reshape(1, d))
    task = infkit.Task.regression(model)
    data = (torch.as_tensor(X), torch.as_tensor(y).reshape(n, 1))
    inf = infkit.Influence(task, "exact", "newton", l2=0.0).fit(data)
    own = inf.self_scores()
    hat = np.einsum("ij,jk,ik->i", X, np.linalg.inv(X.T @ X), X)
    j = int(np.argmax(hat))  # the most leveraged: the largest curvature term
    keep = np.delete(np.arange(n), j)
    step = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0] - beta
    residual = X[j] @ beta - y[j]
    linearised = residual * (X[j] @ step)  # grad l_j^T Delta, l_j = (1/2) residual^2
    retrained = 0.5 * (X[j] @ (beta + step) - y[j]) ** 2 - 0.5 * residual**2
    assert retrained - linearised == pytest.approx(0.5 * (X[j] @ step) ** 2, rel=1e-12)
    assert retrained - linearised > 0.05 * abs(retrained)  # the term matters here
    assert float(own[j]) == pytest.approx(linearised, rel=1e-9)
    moved = inf.remove([j]).model()
    with torch.no_grad():
        after = 0.5 * (float(moved(torch.as_tensor(X[j : j + 1]))[0, 0]) - y[j]) ** 2
    assert after - 0.5 * residual**2 == pytest.approx(retrained, rel=1e-9)


def _ridge(X: np.ndarray, Y: np.ndarray, l2: float) -> np.ndarray:
    """argmin (1/n) sum 0.5 ||W^T x~ - y||^2 + (l2/2)||W||^2 with x~ = [x, 1] (bias penalised)."""
    Xa = np.hstack([X, np.ones((len(X), 1))])
    n = len(X)
    return np.linalg.solve(Xa.T @ Xa / n + l2 * np.eye(Xa.shape[1]), Xa.T @ Y / n)  # [d+1, c]


def _flat(W: np.ndarray) -> torch.Tensor:
    """Ridge solution [d+1, c] in nn.Linear's flat order: weight [c, d] row-major, then bias [c]."""
    return torch.as_tensor(np.concatenate([W[:-1].T.reshape(-1), W[-1]]))


@pytest.mark.parametrize("group_size", [1, 5, 50])
def test_ridge_newton_group_removal_equals_retraining(group_size: int) -> None:
    rng = np.random.default_rng(1)
    n, d, c, l2 = 200, 10, 2, 0.05
    X = rng.normal(size=(n, d))
    Y = X @ rng.normal(size=(d, c)) + 0.3 * rng.normal(size=(n, c))
    Xt = rng.normal(size=(15, d))
    W = _ridge(X, Y, l2)
    model = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(W[:-1].T))
        model.bias.copy_(torch.as_tensor(W[-1]))
    task = infkit.Task.regression(model)
    train = (torch.as_tensor(X), torch.as_tensor(Y))
    test = (torch.as_tensor(Xt), torch.zeros(15, c, dtype=torch.float64))
    inf = infkit.Influence(task, "exact", "newton", l2=l2).fit(train)

    group = rng.choice(n, size=group_size, replace=False)
    keep = np.setdiff1d(np.arange(n), group)
    W_r = _ridge(X[keep], Y[keep], l2)
    effect = inf.remove(group.tolist())
    true_delta = _flat(W_r) - _flat(W)
    assert relative_error(effect.params, true_delta) < 1e-8
    Xta = np.hstack([Xt, np.ones((15, 1))])
    true_outputs = torch.as_tensor(Xta @ (W_r - W))
    assert relative_error(effect.outputs(test), true_outputs) < 1e-8
    # The predicted retrained model is the retrained model.
    unlearned = effect.model()
    with torch.no_grad():
        out = unlearned(torch.as_tensor(Xt))
    assert relative_error(out, torch.as_tensor(Xta @ W_r)) < 1e-8


def test_ridge_if_is_first_order_and_newton_beats_it() -> None:
    """IF misses the removed group's curvature; it must be less accurate than Newton."""
    rng = np.random.default_rng(2)
    n, d, l2 = 60, 8, 1e-2
    X = rng.normal(size=(n, d))
    Y = X @ rng.normal(size=(d, 1)) + 0.3 * rng.normal(size=(n, 1))
    W = _ridge(X, Y, l2)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(W[:-1].T))
        model.bias.copy_(torch.as_tensor(W[-1]))
    task = infkit.Task.regression(model)
    train = (torch.as_tensor(X), torch.as_tensor(Y))
    group = list(range(10))
    W_r = _ridge(X[10:], Y[10:], l2)
    truth = _flat(W_r) - _flat(W)
    err = {
        est: relative_error(
            infkit.Influence(task, "exact", est, l2=l2).fit(train).remove(group).params, truth
        )
        for est in ("if", "newton")
    }
    assert err["newton"] < 1e-9
    assert 1e-3 < err["if"] < 0.5
