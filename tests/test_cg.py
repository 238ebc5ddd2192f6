"""method="cg" and the matrix-free curvature products against dense float64 references."""

from __future__ import annotations

import pytest
import torch

import infkit
from infkit.curvature import CurvatureOperator
from infkit.data import ExampleSet
from infkit.errors import CurvatureError
from infkit.evaluate import correlation, relative_error
from infkit.gradients import PerExample
from infkit.linalg import conjugate_gradients
from infkit.parameters import ParameterSpace


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_curvature_products_equal_the_dense_curvature(mlp_problem: dict, kind: str) -> None:
    task, train = mlp_problem["task"], mlp_problem["train"]
    exact = infkit.Influence(task, "exact", l2=mlp_problem["l2"], curvature=kind).fit(train)
    H = exact.state.method.data_curvature  # checked against autograd in test_exact_mlp.py
    engine = PerExample(task, ParameterSpace(task.model))
    op = CurvatureOperator(engine, ExampleSet(train), kind, batch_size=16)
    V = torch.randn(5, H.shape[0], dtype=torch.float64)
    assert relative_error(op.matmat(V), V @ H) < 1e-12
    # A subset with the full N as normaliser: the retained curvature of the Newton step.
    sub = CurvatureOperator(engine, ExampleSet(train), kind, indices=range(10), normaliser=60)
    H_sub = exact.state.method.batch_curvature(ExampleSet(train).take(range(10))) / 60
    assert relative_error(sub.matmat(V), V @ H_sub) < 1e-12


@pytest.mark.parametrize("estimator", ["if", "rif", "newton"])
def test_cg_scores_match_exact(mlp_problem: dict, estimator: str) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    reference = infkit.Influence(task, "exact", estimator, l2=l2).fit(train)
    for preconditioner in (None, "diagonal"):
        inf = infkit.Influence(
            task, "cg", estimator, l2=l2, tol=1e-9, preconditioner=preconditioner
        ).fit(train)
        S, R = inf.scores(test), reference.scores(test)
        assert correlation(S, R).pearson >= 0.999
        assert relative_error(S, R) <= 1e-6
        assert (
            relative_error(inf.remove([2, 8, 40]).params, reference.remove([2, 8, 40]).params)
            <= 1e-6
        )
        assert max(inf.state.method.iterations) < 200


def test_cg_newton_with_the_hessian(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    options = {"l2": l2, "damping": 0.05, "curvature": "hessian"}
    reference = infkit.Influence(task, "exact", "newton", **options).fit(train)
    inf = infkit.Influence(task, "cg", "newton", tol=1e-10, **options).fit(train)
    group = list(range(0, 60, 4))
    assert relative_error(inf.remove(group).params, reference.remove(group).params) < 1e-7


def test_conjugate_gradients_stop_cleanly_and_report() -> None:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    eig = torch.logspace(-3, 1, 30, dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    B = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    B[:, 3] = 0.0  # a zero right-hand side is solved at iteration 0
    result = conjugate_gradients(lambda X: A @ X, B, tol=1e-12, maxiter=10_000)
    assert torch.isfinite(result.X).all()
    assert bool(result.converged.all()) and result.iterations < 200
    assert relative_error(result.X, torch.linalg.solve(A, B)) < 1e-9
    # A Jacobi preconditioner on a badly scaled diagonal solves in one step.
    D = torch.diag(torch.logspace(-4, 4, 30, dtype=torch.float64))
    pre = conjugate_gradients(lambda X: D @ X, B, precondition=lambda R: R / D.diagonal()[:, None])
    assert pre.iterations == 1
    capped = conjugate_gradients(lambda X: A @ X, B, tol=1e-14, maxiter=3)
    assert capped.iterations == 3 and not bool(capped.converged[:3].any())
    with pytest.raises(CurvatureError, match="non-positive curvature"):
        conjugate_gradients(lambda X: -A @ X, B)


def test_cg_warns_when_it_does_not_converge(mlp_problem: dict) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    inf = infkit.Influence(task, "cg", l2=l2, maxiter=2).fit(train)
    with pytest.warns(UserWarning, match="CG stopped after 2 iterations"):
        inf.scores(test)
