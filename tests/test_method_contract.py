"""One contract for every registered method, against a dense float64 reference.

The cases are collected from ``infkit.methods()``: every method, every estimator it declares and
every question it answers. Registering a method (in src/infkit/methods/ or, like
examples/diagonal_ggn.py, from outside the package: conftest.py imports it) gets it tested with
no edit here. Each method's :class:`~infkit.methods.Fidelity` states what it promises on small
problems: exact-class methods agree with the reference to a relative tolerance, approximate ones
reach a correlation floor (docs/architecture.md §6). Everything is also checked for internal
consistency: group removals against the scores they add up, decompositions against the scores
they split.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from reference import DenseReference

import infkit
from infkit.evaluate import correlation, relative_error
from infkit.methods import Fidelity, method_class
from infkit.task import classification_margin

GROUP = [3, 17, 40, 41, 55]
EXTRA = ("leverages", "module_scores", "token_scores", "query_batching", "input_influence")
#: the small problems: the float64 model with the loss as the measurement, and a float32 copy
#: measuring the margin (higher is better, another measurement gradient, float32 products)
PROBLEMS = ("float64-loss", "float32-margin")
#: float32 answers are compared with a float64 reference to this relative error at best
FLOAT32_RTOL = 2e-4


def _cases() -> list[tuple[str, str, str, str]]:
    cases = []
    for problem in PROBLEMS:
        for name, info in infkit.methods().items():
            if method_class(name).fidelity.reference == "trajectory":
                continue  # differentiates a training run: tests/test_unrolled.py checks it
            for estimator in info["estimators"]:
                cases += [
                    (problem, name, estimator, q) for q in ("scores", "self_scores", "remove")
                ]
            cases += [(problem, name, "if", q) for q in EXTRA if q in info["quantities"]]
    return cases


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


@functools.cache
def _trained() -> dict:
    """A tanh MLP classifier (5-8-3, P = 75) on 60 synthetic examples, at a tight optimum."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()
    Xt = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    yt = (Xt[:, 0] + 0.5 * Xt[:, 1] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12).converged
    return {"model": model, "l2": l2, "train": (X, y), "test": (Xt, yt)}


@functools.cache
def _problem(problem: str) -> dict:
    trained = _trained()
    if problem == "float64-loss":
        model = trained["model"]
        task = infkit.Task.classification(model)
        to_model = lambda t: t  # noqa: E731
    else:
        model = copy.deepcopy(trained["model"]).float()
        task = infkit.Task.classification(model, measurement="margin")
        to_model = lambda t: t.float()  # noqa: E731
    (X, y), (Xt, yt) = trained["train"], trained["test"]
    return {
        **trained,
        "model": model,
        "task": task,
        "train": (to_model(X), y),
        "test": (to_model(Xt), yt),
        "float32": problem != "float64-loss",
    }


@functools.cache
def _reference(problem: str, damping: float) -> DenseReference:
    p = _problem(problem)
    measurement = classification_margin if p["float32"] else None
    return DenseReference.build(
        _trained()["model"],
        _cross_entropy,
        _trained()["train"],
        _trained()["test"],
        p["l2"],
        damping,
        measurement=measurement,
    )


@functools.cache
def _fitted(problem: str, name: str) -> infkit.Influence:
    p, fidelity = _problem(problem), method_class(name).fidelity
    return infkit.Influence(
        p["task"], name, l2=p["l2"], damping=fidelity.damping, **dict(fidelity.test_options)
    ).fit(p["train"])


def _agrees(
    got: torch.Tensor,
    expected: torch.Tensor,
    fidelity: Fidelity,
    floor: float | None,
    float32: bool = False,
) -> None:
    got, expected = got.double().reshape(-1), expected.double().reshape(-1)
    assert bool(torch.isfinite(got).all())
    if fidelity.rtol is not None:
        rtol = max(fidelity.rtol, FLOAT32_RTOL) if float32 else fidelity.rtol
        error = relative_error(got, expected)
        assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"
        return
    assert floor is not None, "an approximate method must declare a correlation floor"
    r = correlation(got, expected).pearson
    assert r >= floor, f"Pearson {r:.4f} below the declared floor {floor}"
    assert fidelity.scale is not None, "an approximate method must declare its scale band"
    slope = float(got @ expected / (expected @ expected))
    low, high = fidelity.scale
    assert low <= slope <= high, f"scale {slope:.3g} outside the declared band [{low}, {high}]"


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
@pytest.mark.parametrize(("problem", "name", "estimator", "question"), _cases())
def test_method_answers_like_the_dense_reference(
    problem: str, name: str, estimator: str, question: str
) -> None:
    fidelity = method_class(name).fidelity
    reference = _reference(problem, fidelity.damping)
    inf = _fitted(problem, name).with_estimator(estimator)
    p = _problem(problem)
    test, float32 = p["test"], p["float32"]
    kind = fidelity.reference
    floor = fidelity.min_correlation
    agrees = functools.partial(_agrees, float32=float32)
    if question == "scores":
        S = inf.scores(test)
        assert S.shape == (7, 60)
        assert S.dtype == (torch.float32 if float32 else torch.float64)
        agrees(S, reference.scores(estimator, kind), fidelity, floor)
        top = inf.top_k(test, k=3)  # (stochastic methods differ from call to call in rounding)
        assert relative_error(top.proponent_scores, S.gather(1, top.proponent_indices)) < 1e-6
    elif question == "self_scores":
        agrees(inf.self_scores(), reference.self_scores(estimator, kind), fidelity, floor)
    elif question == "remove":
        if estimator == "relatif":
            with pytest.raises(infkit.UnsupportedError, match="no counterfactual units"):
                inf.remove(GROUP)
            return
        effect = inf.remove(GROUP)
        expected = reference.removal(GROUP, estimator, kind)
        agrees(effect.params, expected, fidelity, fidelity.removal_correlation or floor)
        if fidelity.rtol is not None:
            agrees(effect.loss(test), reference.loss_change(expected), fidelity, None)
        if estimator in ("if", "rif"):  # linear / additive over the group: the scores add up
            S = inf.scores(test)
            tolerance = 1e-4 if float32 else 1e-8
            assert relative_error(effect.measurement(test), S[:, GROUP].sum(1)) < tolerance
    elif question == "leverages":
        agrees(inf.leverages(), reference.leverages(kind), fidelity, floor)
    elif question == "module_scores":
        tight = 1e-4 if float32 else 1e-10
        parts = inf.module_scores(test)
        assert list(parts) == list(reference.groups)
        assert relative_error(sum(parts.values()), inf.scores(test)) < tight
        # exact given the method's own preconditioned queries, and as close as its fidelity
        own = reference.module_scores(_own_queries(inf, reference))
        assert relative_error(_stack(parts), _stack(own)) < tight
        if fidelity.rtol is not None:
            expected = reference.module_scores(reference.preconditioned(kind))
            agrees(_stack(parts), _stack(expected), fidelity, None)
    elif question == "token_scores":
        tokens = inf.token_scores(test, indices=GROUP)
        tight = 1e-4 if float32 else 1e-10
        assert relative_error(tokens.total, inf.scores(test)[:, GROUP]) < tight
        if fidelity.rtol is not None:
            agrees(tokens.total, reference.scores("if", kind)[:, GROUP], fidelity, None)
    elif question == "query_batching":
        full_rank = inf.batched_scores(test, rank=64)
        assert relative_error(full_rank, inf.scores(test)) < (1e-4 if float32 else 1e-10)
        if fidelity.rtol is not None:
            agrees(full_rank, reference.scores("if", kind), fidelity, None)
    elif question == "input_influence":
        got = inf.input_influence(test, [0, 5])
        assert got.shape == (7, 2, 5)
        own = reference.input_influence(_own_queries(inf, reference), [0, 5])
        assert relative_error(got, own) < (1e-4 if float32 else 1e-10)
        if fidelity.rtol is not None:
            expected = reference.input_influence(reference.preconditioned(kind), [0, 5])
            agrees(got, expected, fidelity, None)
    else:  # pragma: no cover - a new question needs a check here
        pytest.fail(f"no contract check for question {question!r}")


def _own_queries(inf: infkit.Influence, reference: DenseReference) -> torch.Tensor:
    """The method's own u_t = H^{-1} q_t, from the reference's query gradients."""
    return inf.method.precondition_queries(reference.Q).double()


def _stack(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.double() for p in parts.values()])


def test_every_registered_method_is_covered() -> None:
    covered = {name for _, name, _, _ in _cases()}
    trajectory = {
        name for name in infkit.methods() if method_class(name).fidelity.reference == "trajectory"
    }
    assert trajectory == {"unrolled", "source"}  # checked by tests/test_unrolled.py
    assert covered == set(infkit.methods()) - trajectory
    assert "diagonal_ggn" in covered  # registered from examples/, outside the package
    for name in covered:
        fidelity = method_class(name).fidelity
        exact = fidelity.rtol is not None
        assert exact or (fidelity.min_correlation is not None and fidelity.scale is not None), name


def test_a_method_from_outside_the_package_answers_through_the_facade() -> None:
    p = _problem("float64-loss")
    inf = infkit.Influence(p["task"], "diagonal_ggn", l2=p["l2"]).fit(p["train"])
    assert inf.scores(p["test"]).shape == (7, 60)
    assert inf.self_scores().shape == (60,)
    assert inf.top_k(p["test"], k=2).proponent_indices.shape == (7, 2)
    assert inf.remove(GROUP).params.shape == (75,)
    assert inf.describe()["method"] == "diagonal_ggn"
    with pytest.raises(infkit.UnsupportedError, match=r"'diagonal_ggn' cannot compute.*rif"):
        infkit.Influence(p["task"], "diagonal_ggn", "rif", l2=p["l2"])
    with pytest.raises(infkit.UnsupportedError, match=r"did you mean 'floor'"):
        infkit.Influence(p["task"], "diagonal_ggn", l2=p["l2"], flor=1.0)


@pytest.mark.parametrize(
    "name",
    [n for n in infkit.methods() if method_class(n).fidelity.reference != "trajectory"],
)
def test_the_plan_after_fit_plans_the_scoring_alone(name: str) -> None:
    """After fit, ``plan(test=queries)`` plans scoring more queries: the stages before the
    first that scoring runs are marked run (a tester's plan listed the whole fit again), and
    every method's stages name one that scoring runs (else the plan warns and lists all)."""
    from infkit.plan import SCORING_STAGES

    p = _problem("float64-loss")
    inf = _fitted("float64-loss", name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", infkit.errors.Notice)
        after = inf.plan(test=p["test"], timed=False)
    whole = inf.plan(p["train"], p["test"], timed=False)
    names = [s.name for s in after.stages]
    assert names == [s.name for s in whole.stages]
    first = min(names.index(n) for n in SCORING_STAGES if n in names)
    assert [s.done for s in after.stages] == [k < first for k in range(len(names))], names
    assert after.passes == sum(s.passes for s in whole.stages[first:]) <= whole.passes
    assert after.peak_bytes <= whole.peak_bytes
    # the largest object counts what the fit keeps (a reviewer's dual plan named a 22 KiB
    # query chunk beside its 759 KiB kernel, held)
    kept = [s for s in after.stages if s.done and s.held]
    if kept:
        assert after.largest[1] >= max(min(s.largest[1], s.held) for s in kept)
    if name == "dual":
        assert after.largest == whole.largest and after.largest[0] == "dense curvature or kernel"
