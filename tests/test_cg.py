"""method="cg" and the matrix-free curvature products against dense float64 references."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import small_mlp
from torch import Tensor

import infkit
from infkit.curvature import CurvatureOperator
from infkit.data import ExampleSet
from infkit.errors import CurvatureError, Notice, UnsupportedError
from infkit.evaluate import correlation, relative_error
from infkit.gradients import PerExample
from infkit.linalg import block_conjugate_gradients, conjugate_gradients, orthonormal_basis
from infkit.parameters import ParameterSpace


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_curvature_products_equal_the_dense_curvature(mlp_problem: dict, kind: str) -> None:
    task, train = mlp_problem["task"], mlp_problem["train"]
    exact = infkit.Influence(task, "exact", l2=mlp_problem["l2"], curvature=kind).fit(train)
    H = exact.method.data_curvature  # checked against autograd in test_exact_mlp.py
    engine = PerExample(task, ParameterSpace(task.model))
    op = CurvatureOperator(engine, ExampleSet(train), kind, batch_size=16)
    V = torch.randn(5, H.shape[0], dtype=torch.float64)
    assert relative_error(op.matmat(V), V @ H) < 1e-12
    # A subset with the full N as normaliser: the retained curvature of the Newton step.
    sub = CurvatureOperator(engine, ExampleSet(train), kind, indices=range(10), normaliser=60)
    H_sub = exact.method.batch_curvature(ExampleSet(train).take(range(10))) / 60
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
        assert max(inf.method.iterations) < 200


def test_cg_newton_with_the_hessian(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    options = {"l2": l2, "damping": 0.05, "curvature": "hessian"}
    reference = infkit.Influence(task, "exact", "newton", **options).fit(train)
    inf = infkit.Influence(task, "cg", "newton", tol=1e-10, **options).fit(train)
    group = list(range(0, 60, 4))
    with pytest.warns(Notice, match=r"without checking it \(the Hessian less the removed"):
        assert relative_error(inf.remove(group).params, reference.remove(group).params) < 1e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)  # once
        inf.remove([1])
        # the GGN with a ridge: positive definite, nothing to say
        ggn = {**options, "curvature": "ggn"}
        infkit.Influence(task, "cg", "newton", tol=1e-10, **ggn).fit(train).remove(group)


def test_a_retained_curvature_refused_names_its_removal_and_cg_says_it_cannot_check() -> None:
    """A tester's: exact refused the retained curvature of a Newton step "after removing 1
    example(s)", not saying which of the N an answer removed; cg returned the step of an
    indefinite or singular retained curvature without a word (docs/methods/cg.md §7 said CG
    raises). Least squares at l2 = 0 without 8 of its 12 examples, 11 parameters: singular."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 10, generator=gen, dtype=torch.float64)
    y = torch.randn(12, generator=gen, dtype=torch.float64)
    task = infkit.Task.regression(torch.nn.Linear(10, 1).double())
    infkit.train_to_optimum(task, (X, y), 0.0)
    exact = infkit.Influence(task, "exact", "newton", l2=0.0).fit((X, y))
    with pytest.raises(
        CurvatureError,
        match=r"after removing 8 example\(s\) \(example 0, example 1, example 2, example 3, "
        r"example 4 and 3 more\)",
    ):
        exact.remove(list(range(8)))
    cg = infkit.Influence(task, "cg", "newton", l2=0.0).fit((X, y))
    with pytest.warns(Notice, match=r"with no ridge, the retained curvature can be singular"):
        cg.remove(list(range(8)))


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


def test_cg_says_when_its_answer_is_not_to_be_trusted(mlp_problem: dict) -> None:
    """A tester's: with l2 = damping = 0 on a softmax MLP with more parameters than its GGN's
    rank N (C - 1), exact refused the singular curvature and cg returned scores at a relative
    error of 19.5 from the pseudo-inverse's under a plain "ill-conditioned" warning. CG cannot
    tell a singular curvature from an ill-conditioned one (a reviewer's: refusing refused a
    full-rank least-squares problem at l2 = 0, the default, that CG had solved to 2e-8), so
    it warns, and says where its residual ended above the right-hand side and where nothing
    damps the curvature; a damped solve of the same model matches exact."""
    from sklearn.datasets import load_digits

    pixels, digits = load_digits(return_X_y=True)
    X, y = torch.tensor(pixels[:60] / 16.0), torch.tensor(digits[:60])
    test = (torch.tensor(pixels[60:63] / 16.0), torch.tensor(digits[60:63]))
    task = infkit.Task.classification(small_mlp(64, 16, 10))  # P = 1210 > N (C - 1) = 540
    assert infkit.train_to_optimum(task, (X, y), 1e-2, tolerance=1e-6).converged
    with pytest.raises(CurvatureError, match=r"singular"):
        infkit.Influence(task, "exact", l2=0.0, damping=0.0).fit((X, y))
    for block in (True, False):
        inf = infkit.Influence(task, "cg", l2=0.0, damping=0.0, checks=False, block=block)
        with pytest.warns(
            UserWarning,
            match=r"CG stopped after 500 iterations with a relative residual of [1-9].*e\+0[01] "
            r".*; the residual is larger than the right-hand side.*; with l2 = 0 and damping = 0 "
            r"the curvature may be singular.*; add damping \(e\.g\. damping=1e-3",
        ):
            inf.fit((X, y)).scores(test)
    damped = infkit.Influence(task, "cg", l2=0.0, damping=1e-3).fit((X, y)).scores(test)
    exact = infkit.Influence(task, "exact", l2=0.0, damping=1e-3).fit((X, y)).scores(test)
    assert relative_error(damped, exact) < 1e-6
    # full-rank least squares at l2 = 0 (the default): positive definite, stopped short by
    # maxiter, warned without the singular case's words, and its answer near exact's
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    features = features * torch.logspace(0, -3, 20, dtype=torch.float64)
    targets = features @ torch.randn(20, generator=gen, dtype=torch.float64)
    targets = targets + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64)
    task = infkit.Task.regression(torch.nn.Linear(20, 1).double())
    assert infkit.train_to_optimum(task, (features, targets), 0.0).converged
    queries = (features[:4], targets[:4])
    exact = infkit.Influence(task, "exact").fit((features, targets)).scores(queries)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        short = infkit.Influence(task, "cg", maxiter=8, checks=False)
        short = short.fit((features, targets)).scores(queries)
    stopped = [str(w.message) for w in seen if "CG stopped" in str(w.message)]
    assert stopped and all("larger than the right-hand side" not in m for m in stopped)
    assert relative_error(short, exact) < 1e-6


def _spd(n: int, low: float, high: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A = Q diag(eig) Q^T with log-spaced eigenvalues in [low, high]; returns A, Q, eig."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)
    return (Q * eig) @ Q.T, Q, eig


def test_block_cg_solves_many_right_hand_sides_in_few_iterations() -> None:
    A, _, _ = _spd(200, 1e-2, 10.0)
    B = torch.randn(200, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = torch.linalg.solve(A, B)
    products = []

    def matmat(X: Tensor) -> Tensor:
        products.append(X.shape[1])
        return A @ X

    block = block_conjugate_gradients(matmat, B, tol=1e-12, maxiter=1000)
    single = conjugate_gradients(lambda X: A @ X, B, tol=1e-12, maxiter=1000)
    assert bool(block.converged.all()) and float(block.residuals.max()) <= 1e-12
    assert relative_error(block.X, reference) <= 1e-8
    assert relative_error(single.X, reference) <= 1e-8
    # One product per iteration on at most k columns, and far fewer iterations than k
    # independent recursions (which need ~ sqrt(condition) log(1/tol) each).
    assert len(products) == block.iterations and max(products) <= 40
    assert 3 * block.iterations < single.iterations
    # More right-hand sides than unknowns: the first block spans the whole space.
    wide = torch.randn(200, 250, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = block_conjugate_gradients(lambda X: A @ X, wide, tol=1e-12)
    assert result.iterations <= 2
    assert relative_error(result.X, torch.linalg.solve(A, wide)) <= 1e-8


def test_block_cg_drops_dependent_directions_without_nan() -> None:
    A, Q, eig = _spd(60, 1e-1, 10.0)
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(60, generator=gen, dtype=torch.float64)
    columns = [
        b,
        b,  # duplicate
        torch.zeros(60, dtype=torch.float64),  # zero right-hand side
        Q[:, 5],  # exact eigenvectors
        3.0 * Q[:, 7],
        2.0 * b - 3.0 * Q[:, 7],  # a combination of the others
        1e-9 * b,  # tiny but in the span
    ]
    B = torch.stack(columns, dim=1)
    result = block_conjugate_gradients(lambda X: A @ X, B, tol=1e-12, maxiter=1000)
    assert torch.isfinite(result.X).all() and bool(result.converged.all())
    assert float(result.X[:, 2].abs().max()) == 0.0
    assert relative_error(result.X, torch.linalg.solve(A, B)) <= 1e-8
    # Right-hand sides that are all eigenvectors are solved exactly by the first block.
    E = Q[:, :6] * torch.arange(1.0, 7.0, dtype=torch.float64)
    result = block_conjugate_gradients(lambda X: A @ X, E, tol=1e-12)
    assert result.iterations == 1 and torch.isfinite(result.X).all()
    assert relative_error(result.X, Q[:, :6] * (torch.arange(1.0, 7.0) / eig[:6])) <= 1e-12
    # Nothing to solve: zero iterations, zero solution.
    zero = block_conjugate_gradients(lambda X: A @ X, torch.zeros(60, 3, dtype=torch.float64))
    assert zero.iterations == 0 and bool(zero.converged.all()) and not bool(zero.X.any())
    # The basis itself: duplicates, zero and dependent columns are truncated away.
    basis = orthonormal_basis(B)
    assert basis.shape[1] == 3
    assert relative_error(basis.T @ basis, torch.eye(3, dtype=torch.float64)) <= 1e-12


def test_block_cg_with_a_preconditioner() -> None:
    A, _, _ = _spd(150, 1e-1, 10.0)
    d = torch.logspace(-3, 3, 150, dtype=torch.float64)
    A = d.sqrt()[:, None] * A * d.sqrt()  # badly scaled: Jacobi helps
    B = torch.randn(150, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    jacobi = A.diagonal()[:, None]
    plain = block_conjugate_gradients(lambda X: A @ X, B, tol=1e-11, maxiter=5000)
    pre = block_conjugate_gradients(
        lambda X: A @ X, B, tol=1e-11, maxiter=5000, precondition=lambda R: R / jacobi
    )
    assert bool(pre.converged.all()) and pre.iterations < plain.iterations / 2
    assert relative_error(pre.X, torch.linalg.solve(A, B)) <= 1e-8
    # The exact inverse as preconditioner: one iteration.
    inverse = torch.linalg.inv(A)
    exact = block_conjugate_gradients(lambda X: A @ X, B, precondition=lambda R: inverse @ R)
    assert exact.iterations == 1


def test_block_cg_raises_and_caps() -> None:
    A, _, _ = _spd(50, 1e-2, 10.0)
    B = torch.randn(50, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.raises(CurvatureError, match=r"non-positive curvature.*Increase damping"):
        block_conjugate_gradients(lambda X: -A @ X, B)
    indefinite = A - 0.5 * torch.eye(50, dtype=torch.float64)
    with pytest.raises(CurvatureError, match="non-positive curvature"):
        block_conjugate_gradients(lambda X: indefinite @ X, B, maxiter=1000)
    capped = block_conjugate_gradients(lambda X: A @ X, B, tol=1e-14, maxiter=2)
    assert capped.iterations == 2 and not bool(capped.converged.any())
    assert torch.isfinite(capped.X).all()


@pytest.mark.parametrize("block", [True, False])
def test_cg_block_option_matches_exact(mlp_problem: dict, block: bool) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    reference = infkit.Influence(task, "exact", l2=l2, damping=0.01).fit(train)
    inf = infkit.Influence(
        task,
        "cg",
        l2=l2,
        damping=0.01,
        tol=1e-10,
        block=block,
        batch_size=8,
        product_batch_size=16,
    ).fit(train)
    S, R = inf.scores(test), reference.scores(test)
    assert correlation(S, R).pearson >= 0.999
    assert relative_error(S, R) <= 1e-6
    method = inf.method
    # product_batch_size reaches the method through the facade, next to its own batch_size.
    assert method.operator.batch_size == 16 and inf.batch_size == 8
    described = inf.describe()
    assert described["options"]["block"] is block and described["iterations"] == method.iterations
    single = infkit.Influence(task, "cg", l2=l2, damping=0.01, block=False).fit(train)
    single.scores(test)
    if block:  # 7 test gradients share one block Krylov space
        assert method.iterations[-1] < single.method.iterations[-1]


def test_cg_rejects_an_unknown_block_mode(mlp_problem: dict) -> None:
    with pytest.raises(UnsupportedError, match=r"option 'block' must be True or False or 'auto'"):
        infkit.Influence(mlp_problem["task"], "cg", block="yes").fit(mlp_problem["train"])


def test_the_drift_check_of_an_iterative_solve_is_the_exact_solves() -> None:
    """A tester's: cg and astra took the drift check's step from the GGN of a 256-example
    sample, whose inverse stretches the gradient's share outside the sample's span by 1/ridge
    (19x too long on a small Llama: a false warning of 7348%). Their own solve gives exact's
    step (here P = 4,810 > 256 examples x 10 classes: 4% off before)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:600] / 16), torch.tensor(y[:600])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
    ).double()
    task = infkit.Task.classification(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stopped short on purpose: off its optimum
        infkit.train_to_optimum(task, (X, y), 1e-3, max_iter=40)
    drifts = {}
    for method in ("exact", "cg", "astra"):
        inf = infkit.Influence(task, method, l2=1e-3, damping=1e-2).fit((X, y))
        drifts[method] = inf.describe()["drift"]
    for method in ("cg", "astra"):
        for key in ("step", "residual_shift"):
            assert drifts[method][key] == pytest.approx(drifts["exact"][key], rel=1e-6)


def test_slow_solves_per_training_example_are_said_after_the_first_batch(
    mlp_problem: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tester's RIF scores by lissa on 300 examples ran for minutes with nothing but progress
    lines (cg: 17 s): an iterative method's pass of solves per training example now says, after
    its first batch, how long the rest of the answer takes at that pace, and what answers at
    once; once an answer, whose chunks of queries (a pass each) count in the rest."""
    from infkit import estimators

    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    cg = infkit.Influence(task, "cg", "rif", l2=l2, tol=1e-6, batch_size=20).fit(train)
    exact = infkit.Influence(task, "exact", "rif", l2=l2, batch_size=20).fit(train)
    n = len(train[1])

    def notices(inf: infkit.Influence, answer: str, queries: object = test) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if answer == "scores":
                inf.scores(queries)
            elif answer == "relatif":
                inf.with_estimator("relatif").scores(queries)
            elif answer == "self_scores":
                inf.with_estimator("if").self_scores()
            else:
                inf.leverages()
        return [str(w.message) for w in caught if "per training example" in str(w.message)]

    assert notices(cg, "scores") == []  # at this size the rest takes well under a minute
    monkeypatch.setattr(estimators, "SLOW_SOLVES_SECONDS", -1.0)  # any pace is slow
    per_query = "scores with estimator 'if' solve one system per query"
    for answer, what, direct in (
        ("scores", "estimator 'rif'", "exact, dual, ekfac, kfac"),
        ("relatif", "estimator 'relatif'", "exact, ekfac, kfac"),  # (dual answers no RelatIF)
        ("self_scores", "estimator 'if'", "exact, dual, ekfac, kfac"),
        ("leverages", "leverages", "exact, dual, ekfac, kfac"),
    ):
        said = notices(cg, answer)
        assert len(said) == 1, (answer, said)  # once a pass, not once a batch
        assert said[0].startswith(f"{what} by 'cg': a system per training example, each")
        assert f"the first 20 of {n:,} took" in said[0]
        assert f"A direct method ({direct}) answers them at once" in said[0]
        assert said[0].endswith(per_query) == (answer in ("scores", "relatif")), said[0]
        assert notices(exact, answer) == []  # a direct method's solves are not iterations
    # a call the memory limit takes in chunks of queries solves for every example in each:
    # one notice for the call, its rest counting every chunk (a reviewer's 25 chunks of 55 s
    # each had run silent, each chunk's rest under the threshold)
    tight = infkit.Influence(
        task, "cg", "rif", l2=l2, tol=1e-6, batch_size=20, memory_limit=160_000
    ).fit(train)
    many = (test[0].repeat(6, 1), test[1].repeat(6))
    chunks = len(tight._query_chunks(len(many[1]), tight.estimator_spec)[0])
    assert chunks > 2
    said = notices(tight, "scores", many)
    assert len(said) == 1, said
    assert f"in each of {chunks} chunks of queries" in said[0]
    assert re.search(rf"the first \d+ of {n * chunks:,} took", said[0]), said[0]


def test_a_groups_jacobian_refusal_names_its_joint_lambda(mlp_problem: dict) -> None:
    """A Newton step of a group downdates one joint [kC, kC] Lambda: the refusal beyond
    memory_limit names it, and the bytes it gives are that count (a reviewer's 30-example group
    was told of a Lambda_j [C, C] each, for bytes of the joint block)."""
    from infkit.errors import UnsupportedError
    from infkit.memory import human_bytes

    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    inf = infkit.Influence(
        task, "ekfac", "newton", l2=l2, damping=1e-3, memory_limit=150_000, batch_size=10
    ).fit(train)
    c, p, k = 3, inf.n_params, 30
    with pytest.raises(UnsupportedError) as refused:
        inf.remove(list(range(k)))
    message = str(refused.value)
    assert f"the group's joint Lambda [{k} C, {k} C]" in message and "Lambda_j" not in message
    assert f"{human_bytes((k * 2 * c * p + (k * c) ** 2) * 8)} for {k} example(s)" in message


def test_a_singular_curvature_is_told_as_singular_not_as_a_loss_to_check() -> None:
    """A tester's least squares at l2 = 0 with P = 65 > N = 40 (the built-in squared error, its
    GGN singular): cg refused with "check the task's loss: a custom Task whose loss is not
    convex", the wrong cause. A direction whose curvature is zero to rounding is told as a
    singular curvature with its remedy; a negative one keeps the indefinite one's."""
    gen = torch.Generator().manual_seed(0)
    Xa = torch.randn(40, 65, generator=gen, dtype=torch.float64)
    singular = Xa.T @ Xa / 40  # rank 40 of 65
    _, vectors = torch.linalg.eigh(singular)
    flat = vectors[:, :2]  # two directions it does not have
    indefinite = singular - 0.5 * torch.eye(65, dtype=torch.float64)
    for solve in (conjugate_gradients, block_conjugate_gradients):
        with pytest.raises(CurvatureError, match=r"zero curvature.*singular.*e.g. damping="):
            solve(lambda V: singular @ V, flat, curvature="ggn")
        with pytest.raises(CurvatureError, match=r"non-positive curvature.*check the task's"):
            solve(lambda V: indefinite @ V, flat, curvature="ggn")
