"""method="astra": EK-FAC-preconditioned iterations converge to the dense damped inverse (§6.7)."""

from __future__ import annotations

import pytest
import torch

import infkit
from infkit.evaluate import correlation, relative_error


def test_astra_converges_to_the_dense_damped_ggn_solve(mlp_problem: dict) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    damping = 1e-3
    exact = infkit.Influence(task, "exact", l2=l2, damping=damping).fit(train)
    astra = infkit.Influence(task, "astra", l2=l2, damping=damping).fit(train)
    ekfac = infkit.Influence(task, "ekfac", l2=l2, damping=damping).fit(train)
    V = torch.randn(5, exact.n_params, dtype=torch.float64)
    reference = exact.method.solve(V)
    assert relative_error(astra.method.solve(V), reference) <= 1e-4
    # EK-FAC alone is far off on this model; ASTRA's scores are the exact ones.
    S, R = astra.scores(test), exact.scores(test)
    assert correlation(S, R).pearson >= 0.999
    assert relative_error(S, R) <= 1e-4
    assert relative_error(ekfac.scores(test), R) > 0.1
    # The heuristic module damping changes the preconditioner only, not the answer.
    damped = infkit.Influence(
        task, "astra", l2=l2, damping=damping, damping_scale="auto", fisher="sampled"
    ).fit(train)
    assert relative_error(damped.method.solve(V), reference) <= 1e-4


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_astra_first_iterate_is_ekfac(mlp_problem: dict, solver: str) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    ekfac = infkit.Influence(task, "ekfac", l2=l2).fit(train)
    first = infkit.Influence(task, "astra", l2=l2, solver=solver, maxiter=0).fit(train)
    V = torch.randn(3, ekfac.n_params, dtype=torch.float64)
    assert torch.equal(first.method.solve(V), ekfac.method.solve(V))


def test_astra_neumann_series_converges(wine_logreg: dict) -> None:
    task, train, l2 = wine_logreg["task"], wine_logreg["train"], wine_logreg["l2"]
    exact = infkit.Influence(task, "exact", l2=l2).fit(train)
    astra = infkit.Influence(task, "astra", l2=l2, solver="neumann", tol=1e-9, maxiter=500)
    astra.fit(train)
    V = torch.randn(4, exact.n_params, dtype=torch.float64)
    assert relative_error(astra.method.solve(V), exact.method.solve(V)) <= 1e-6
    m = astra.method
    assert 0 < m.steps[l2] <= 1.5 and m.iterations[-1] < 500
    # describe() reports each solve's largest relative residual ||v - (H + ridge) x|| / ||v||
    X = astra.method.solve(V)
    A = exact.method.solve(torch.eye(exact.n_params, dtype=torch.float64)).inverse()
    measured = float(((V - X @ A.T).norm(dim=1) / V.norm(dim=1)).max())
    assert astra.describe()["residuals"][-1] == pytest.approx(measured, rel=0.5, abs=1e-10)
    assert astra.describe()["residuals"][-1] <= 1e-9
    diverging = infkit.Influence(task, "astra", l2=l2, solver="neumann", step=50.0).fit(train)
    with pytest.warns(UserWarning) as record:
        diverging.method.solve(V)
    messages = " ".join(str(w.message) for w in record)
    # one warning that says why, not a second that would blame imprecise products
    assert "diverges" in messages and "stopped after" not in messages
    assert diverging.describe()["residuals"][-1] > 1e-3


def test_a_short_solve_warns_once_per_right_hand_side(wine_logreg: dict) -> None:
    """Solving the same queries again (module or token scores after the scores) does not
    repeat the warning that the solve stopped short; other queries get their own."""
    import warnings

    task, train, l2 = wine_logreg["task"], wine_logreg["train"], wine_logreg["l2"]
    short = infkit.Influence(task, "astra", l2=l2, solver="neumann", tol=1e-12, maxiter=1)
    short.fit(train)
    V = torch.randn(3, short.n_params, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # every warning given is seen, not once per place
        short.method.solve(V)
        short.method.solve(V.clone())
        short.method.solve(2 * V)
    said = [str(w.message) for w in record if "ASTRA stopped after" in str(w.message)]
    assert len(said) == 2 and "raise maxiter" in said[0]
    assert len(short.describe()["residuals"]) >= 3  # every solve is still reported
    # the self-scores solve a batch at a time: one warning for the call, saying so
    solves = len(short.describe()["residuals"])
    small_batches = infkit.Influence(
        task, "astra", l2=l2, solver="neumann", tol=1e-12, maxiter=1, batch_size=16
    ).fit(train)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small_batches.self_scores()
    said = [str(w.message) for w in record if "ASTRA stopped after" in str(w.message)]
    assert len(small_batches.describe()["residuals"]) > 2 and solves >= 3
    assert len(said) == 1 and "this question solves batch by batch" in said[0]
    # so do RelatIF's and RIF's scores, which solve each training batch's gradients (after a
    # refit, whose solves warn afresh: these are the self-scores' right-hand sides again)
    Xte, yte = wine_logreg["test"]
    for estimator in ("relatif", "rif"):
        small_batches.fit(train)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            small_batches.with_estimator(estimator).scores((Xte[:2], yte[:2]))
        said = [str(w.message) for w in record if "ASTRA stopped after" in str(w.message)]
        assert len(said) == 1, (estimator, said)
    # and RelatIF with the self-scores from the same solves (a reviewer: 6 warnings, one a
    # training batch, where the two calls apart gave one each)
    small_batches.fit(train)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert small_batches.relatif_and_self_scores((Xte[:2], yte[:2])) is not None
    said = [str(w.message) for w in record if "ASTRA stopped after" in str(w.message)]
    assert len(said) == 1, said


def test_astra_newton_step_with_the_ggn_and_the_hessian(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    group = [1, 5, 9, 30]
    exact = infkit.Influence(task, "exact", "newton", l2=l2).fit(train)
    astra = infkit.Influence(task, "astra", "newton", l2=l2).fit(train)
    assert relative_error(astra.remove(group).params, exact.remove(group).params) <= 1e-5
    options = {"l2": l2, "damping": 0.05, "curvature": "hessian"}
    exact = infkit.Influence(task, "exact", "newton", **options).fit(train)
    astra = infkit.Influence(task, "astra", "newton", **options).fit(train)
    assert relative_error(astra.remove([2, 8]).params, exact.remove([2, 8]).params) <= 1e-5


def test_a_float32_model_raises_tol_to_what_its_products_certify_and_says_so(
    wine_logreg: dict,
) -> None:
    """tol 1e-9 on a float32 model is raised to 100 float32 epsilons (1.2e-5), reported in
    describe() and, when a solve stops above it, in the warning beside the tol asked."""
    import copy

    model = copy.deepcopy(wine_logreg["model"]).float()
    Xtr, ytr = wine_logreg["train"]
    task = infkit.Task.classification(model)
    short = infkit.Influence(task, "astra", l2=1e-2, solver="neumann", tol=1e-9, maxiter=1)
    short.fit((Xtr.float(), ytr))
    assert short.describe()["effective_tol"] == pytest.approx(100 * 2.0**-23)
    with pytest.warns(
        UserWarning,
        match=r"tol 1\.2e-05, what torch\.float32 products certify, "
        r"above the 1e-09 asked",
    ):
        short.method.solve(torch.randn(2, short.n_params))
