"""Several Newton steps for a group removal (``remove(F, steps=K)``) against actual retraining.

Softmax regression on scikit-learn's digits with half of the training set removed: one Newton
step is far from retraining there (the loss is not quadratic), and the iteration on the retained
objective converges to it (docs/estimators.md §12).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import small_mlp
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

import infkit
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.evaluate import correlation
from infkit.parameters import ParameterSpace

L2 = 1e-3
N_TRAIN = 300


@pytest.fixture(scope="module")
def digits_half() -> dict:
    """Softmax regression on 300 digits at a tight optimum, half of them removed (seeded), and
    the model retrained without them."""
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X = torch.as_tensor(StandardScaler().fit_transform(X[perm]))
    y = torch.as_tensor(y[perm])
    train, test = (
        (X[:N_TRAIN], y[:N_TRAIN]),
        (X[N_TRAIN : N_TRAIN + 300], y[N_TRAIN : N_TRAIN + 300]),
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    task = infkit.Task.classification(model)
    assert infkit.train_to_optimum(task, train, L2, tolerance=1e-12).converged
    removed = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))[: N_TRAIN // 2]
    retrained = infkit.retrain.without(task, train, removed, L2, tolerance=1e-12)
    assert retrained.gradient_norm < 1e-12
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(test[0]), test[1], reduction="none")
    return {
        "task": task,
        "model": model,
        "train": train,
        "test": test,
        "removed": removed,
        "retrained": retrained,
        "loss_change": retrained.losses(test) - before,
    }


def _relative_error(effect: infkit.removal.RemovalEffect, retrained) -> float:
    """||theta_K - theta_retrained|| / ||theta_retrained - theta*||."""
    return float((effect.params - retrained.delta).norm() / retrained.delta.norm())


def test_newton_steps_converge_to_retraining(digits_half: dict) -> None:
    p = digits_half
    theta_star = ParameterSpace(p["model"]).flat().clone()
    inf = infkit.Influence(p["task"], "exact", "newton", l2=L2, progress=False).fit(p["train"])
    pearson, errors = {}, {}
    for k in (1, 2, 3, 5):
        effect = inf.remove(p["removed"], steps=k)
        pearson[k] = correlation(effect.loss(p["test"]), p["loss_change"]).pearson
        errors[k] = _relative_error(effect, p["retrained"])
    # Measured: Pearson 0.691 (1 step), 0.9942 (2), 0.99917 (3), 1 - 3e-7 (5); parameter error
    # against retraining 0.26, 0.085, 0.024, 1.4e-4.
    assert pearson[1] < 0.8
    assert pearson[3] >= 0.95 and pearson[5] >= 0.95
    assert pearson[3] > pearson[1] + 0.2
    assert errors[5] < errors[3] < errors[2] < errors[1]
    # Enough steps reach retraining (the GGN of a linear model is its Hessian: true Newton,
    # quadratic convergence). Measured: 2e-14 after 8 steps.
    effect = inf.remove(p["removed"], steps=8)
    assert effect.steps == 8 and "steps=8" in repr(effect)
    assert _relative_error(effect, p["retrained"]) < 1e-6
    norms = effect.gradient_norms
    assert norms is not None and len(norms) == 8
    assert norms[-1] < 1e-12 * max(norms[0], 1.0)  # ||grad L_R(theta_8)||, measured 9e-17
    # The predicted changes are the model's at theta_K: those of the retrained model.
    np.testing.assert_allclose(effect.loss(p["test"]), p["loss_change"], rtol=0, atol=1e-9)
    retrained_outputs = p["retrained"].outputs(p["test"])
    with torch.no_grad():
        change = retrained_outputs - p["model"](p["test"][0])
    np.testing.assert_allclose(effect.outputs(p["test"]), change, rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        ParameterSpace(effect.model()).flat(), p["retrained"].theta, rtol=0, atol=1e-8
    )
    # The model itself is left as it was.
    assert torch.equal(ParameterSpace(p["model"]).flat(), theta_star)


def test_one_step_is_the_estimators_own_answer(digits_half: dict) -> None:
    p = digits_half
    inf = infkit.Influence(p["task"], "exact", "newton", l2=L2, progress=False).fit(p["train"])
    today = inf.remove(p["removed"])
    one = inf.remove(p["removed"], steps=1)
    assert one.steps == today.steps == 1 and one.gradient_norms is None
    torch.testing.assert_close(one.params, today.params, rtol=1e-12, atol=0)
    torch.testing.assert_close(one.loss(p["test"]), today.loss(p["test"]), rtol=1e-12, atol=0)
    # Still first order in Delta theta: grad l(x)^T Delta theta, written out for softmax
    # regression (grad_z l = softmax(z) - onehot(y), z = W x + b), not the change at theta_1.
    X, y = p["test"]
    model = p["model"]
    with torch.no_grad():
        residual = torch.softmax(model(X), 1) - torch.nn.functional.one_hot(y, 10)
    dW, db = one.params[:640].reshape(10, 64), one.params[640:]
    expected = (residual * (X @ dW.T + db)).sum(1)
    torch.testing.assert_close(one.loss(p["test"]), expected, rtol=1e-10, atol=1e-12)


def test_conjugate_gradients_converge_from_the_influence_function(digits_half: dict) -> None:
    # A matrix-free method, started from the IF's answer (further from retraining).
    # Measured: Pearson 0.468 (1 step), 0.9945 (3); parameter error 0.90 (1), 4.0e-3 (5),
    # 1.7e-13 (8).
    p = digits_half
    inf = infkit.Influence(p["task"], "cg", "if", l2=L2, progress=False, tol=1e-10)
    inf.fit(p["train"])
    three = inf.remove(p["removed"], steps=3)
    assert correlation(three.loss(p["test"]), p["loss_change"]).pearson >= 0.95
    eight = inf.remove(p["removed"], steps=8)
    assert _relative_error(eight, p["retrained"]) < 1e-6


def test_hessian_steps_converge_on_a_tanh_mlp() -> None:
    # A non-linear model: its GGN leaves out the network's second derivatives, so Gauss-Newton
    # steps stall (measured parameter error 0.097, 0.077, 0.079, 0.082 for 1-4 steps), while
    # the Hessian's converge quadratically (0.035, 2.9e-5, 2.3e-11).
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    model = small_mlp(5, 8, 2)
    task = infkit.Task.classification(model)
    l2 = 1e-2
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12).converged
    removed = [1, 2, 3, 4, 5]
    retrained = infkit.retrain.without(task, (X, y), removed, l2, tolerance=1e-12)
    inf = infkit.Influence(task, "exact", "newton", l2=l2, curvature="hessian", progress=False)
    inf.fit((X, y))
    one = _relative_error(inf.remove(removed), retrained)
    three = _relative_error(inf.remove(removed, steps=3), retrained)
    assert one > 1e-2 and three < 1e-8


def test_an_exact_first_step_is_not_called_diverging() -> None:
    """A ridge regression's Newton step is its retraining: the later iterates sit at rounding
    (a tester's: 2.45e-16, then 2.47e-16, was warned about as not converging)."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(4, 2, generator=gen, dtype=torch.float64)
    y = y + 0.3 * torch.randn(50, 2, generator=gen, dtype=torch.float64)
    l2 = 0.1
    task = infkit.Task.regression(torch.nn.Linear(4, 2, bias=False).double())
    infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-13)
    inf = infkit.Influence(task, "exact", "newton", l2=l2, progress=False).fit((X, y))
    # at rounding the later norms rise over the first by chance, about half the time here
    for group in ([3, 17, 40], [1, 2], [10, 20, 30, 40], [11, 12]):
        keep = torch.ones(50, dtype=torch.bool)
        keep[group] = False
        Xk, yk, n = X[keep], y[keep], int(keep.sum())
        eye = torch.eye(4, dtype=X.dtype)
        closed = torch.linalg.solve(Xk.T @ Xk / n + l2 * eye, Xk.T @ yk / n)
        for steps in (3, 4):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                effect = inf.remove(group, steps=steps)
            theta = task.model.weight.detach().T + effect.params.reshape(2, 4).T
            assert torch.allclose(theta, closed, rtol=1e-12, atol=1e-14)
            assert effect.gradient_norms is not None and max(effect.gradient_norms) < 1e-13


def test_a_diverging_iteration_warns_and_the_workdir_is_left_alone(
    digits_half: dict, tmp_path
) -> None:
    # K-FAC's E[Lambda] (x) E[x x^T] misses this problem's curvature by more than a factor 2 in
    # some directions: I - K^{-1} H has spectral radius about 7 at theta*, so the plain
    # iteration diverges (measured ||grad L_R||: 0.011, 0.066, 0.32 over 3 steps).
    p = digits_half
    inf = infkit.Influence(p["task"], "kfac", "if", l2=L2, progress=False, workdir=tmp_path)
    inf.fit(p["train"])
    files = sorted(q.relative_to(tmp_path) for q in tmp_path.rglob("*"))
    assert files  # the fit's factors
    with pytest.warns(UserWarning, match="did not converge"):
        effect = inf.remove(p["removed"], steps=3)
    assert effect.gradient_norms is not None
    assert effect.gradient_norms[-1] > 2 * effect.gradient_norms[0]
    assert sorted(q.relative_to(tmp_path) for q in tmp_path.rglob("*")) == files


def test_bad_steps_and_methods_that_cannot_iterate_are_refused(wine_logreg: dict) -> None:
    task, train, l2 = wine_logreg["task"], wine_logreg["train"], wine_logreg["l2"]
    inf = infkit.Influence(task, "exact", "newton", l2=l2, progress=False).fit(train)
    for bad in (0, -2, 1.5, 2.0, True, "3"):
        with pytest.raises(InvalidInputError, match=r"steps=.*integer >= 1"):
            inf.remove([0, 1], steps=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        inf.remove([0, 1], 3)  # type: ignore[misc]  # keyword only
    trak = infkit.Influence(task, "trak", l2=l2, proj_dim=20, progress=False).fit(train)
    trak.remove([0, 1])  # one step stays available
    with pytest.raises(UnsupportedError, match=r"method 'trak'.*methods that can: .*'cg'"):
        trak.remove([0, 1], steps=2)
    identity = infkit.Influence(task, "identity", progress=False).fit(train)
    with pytest.raises(UnsupportedError, match=r"no curvature.*'exact'"):
        identity.remove([0, 1], steps=2)
    with pytest.raises(UnsupportedError, match="relatif"):
        inf.with_estimator("relatif").remove([0, 1], steps=2)
