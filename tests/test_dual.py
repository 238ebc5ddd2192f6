"""method="dual" (docs/methods/dual.md §12): representer, dual = primal, closed-form retraining, forms.

Ground truth never comes from the dual code: it is method="exact" (a dense P x P GGN, Cholesky),
a closed-form ridge regression in numpy, or explicit Jacobians contracted in numpy.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import infkit
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NonFiniteError,
    ProblemTooLargeError,
    UnsupportedError,
)
from infkit.evaluate import relative_error
from infkit.gradients import PerExample
from infkit.linearize import linearize
from infkit.parameters import ParameterSpace

TOL = 1e-8
GROUP = [0, 5, 11, 17, 23]


def _mlp(d_in: int, hidden: int, d_out: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, d_out),
    ).double()


def _data(n: int, n_test: int, d: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Xt = torch.randn(n_test, d, generator=gen, dtype=torch.float64)
    return X, Xt


@pytest.fixture(scope="module")
def classifier() -> dict:
    """N=30, C=3, P=583 > N*C=90: a tanh MLP trained to a tight optimum."""
    X, Xt = _data(30, 7)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    yt = (Xt[:, 0] > 0).long() + (Xt[:, 1] > 0.5).long()
    model = _mlp(4, 20, 3)
    task = infkit.Task.classification(model)
    l2 = 1e-2
    result = infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-6)
    assert result.converged
    return {"task": task, "l2": l2, "train": (X, y), "test": (Xt, yt), "fits": {}}


@pytest.fixture(scope="module")
def regressor() -> dict:
    """Squared loss (Lambda = I), N=25, C=2, P=502, trained only loosely (tolerance 1e-3)."""
    X, Xt = _data(25, 6, seed=2)
    Y = torch.stack([torch.sin(X[:, 0]), X[:, 1] * X[:, 2]], dim=1)
    Yt = torch.stack([torch.sin(Xt[:, 0]), Xt[:, 1] * Xt[:, 2]], dim=1)
    model = _mlp(4, 20, 2, seed=3)
    task = infkit.Task.regression(model)
    l2 = 1e-2
    infkit.train_to_optimum(task, (X, Y), l2, tolerance=1e-3, max_iter=40)
    return {"task": task, "l2": l2, "train": (X, Y), "test": (Xt, Yt), "fits": {}}


def _fit(problem: dict, method: str, estimator: str, **options) -> infkit.Influence:
    """Fits shared between tests of one module (each fit is deterministic)."""
    key = (method, estimator, tuple(sorted(options.items())))
    if key not in problem["fits"]:
        problem["fits"][key] = infkit.Influence(
            problem["task"], method, estimator, l2=problem["l2"], **options
        ).fit(problem["train"])
    return problem["fits"][key]


def _compare(problem: dict, estimator: str, **options) -> dict[str, float]:
    test = problem["test"]
    exact = _fit(problem, "exact", estimator)
    dual = _fit(problem, "dual", estimator, **options)
    r_exact, r_dual = exact.remove(GROUP), dual.remove(GROUP)
    return {
        "scores": relative_error(dual.scores(test), exact.scores(test)),
        "self_scores": relative_error(dual.self_scores(), exact.self_scores()),
        "params": relative_error(r_dual.params, r_exact.params),
        "outputs": relative_error(r_dual.outputs(test), r_exact.outputs(test)),
        "loss": relative_error(r_dual.loss(test), r_exact.loss(test)),
    }


@pytest.mark.parametrize("estimator", ["if", "rif", "newton"])
def test_dual_equals_exact_ggn_classification(classifier: dict, estimator: str) -> None:
    errors = _compare(classifier, estimator)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("estimator", ["if", "rif", "newton"])
def test_dual_equals_exact_ggn_regression_at_a_loose_optimum(
    regressor: dict, estimator: str
) -> None:
    # ||grad L|| is far from 0 here: the representer residual r carries it exactly.
    with pytest.warns(UserWarning, match="stationary"):
        errors = _compare(regressor, estimator)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize(
    "options", [{"form": "woodbury"}, {"solver": "cg", "tol": 1e-13}], ids=["woodbury", "cg"]
)
@pytest.mark.parametrize("estimator", ["if", "rif", "newton"])
def test_symmetric_woodbury_form_equals_push_through(
    classifier: dict, estimator: str, options: dict
) -> None:
    test = classifier["test"]
    push = _fit(classifier, "dual", estimator)
    other = _fit(classifier, "dual", estimator, **options)
    tol = 1e-11 if options.get("solver") != "cg" else 1e-8
    assert relative_error(other.scores(test), push.scores(test)) < tol
    assert relative_error(other.self_scores(), push.self_scores()) < tol
    assert relative_error(other.remove(GROUP).params, push.remove(GROUP).params) < tol


def test_generic_solves_and_leverages_match_exact(classifier: dict) -> None:
    l2 = classifier["l2"]
    exact = _fit(classifier, "exact", "if")
    dual = _fit(classifier, "dual", "if")
    V = torch.randn(3, exact.n_params, dtype=torch.float64)
    m_exact, m_dual = exact.method, dual.method
    assert relative_error(m_dual.solve(V), m_exact.solve(V)) < TOL
    assert relative_error(m_dual.solve(V, -l2 / 30), m_exact.solve(V, -l2 / 30)) < TOL
    group = torch.tensor(GROUP)
    assert relative_error(m_dual.solve_retained(V, group), m_exact.solve_retained(V, group)) < TOL
    assert relative_error(dual.leverages(), exact.leverages()) < TOL


def test_dual_output_and_loss_changes_equal_kernel_form(classifier: dict) -> None:
    """Delta f = K(X_t, X) Delta alpha (docs/methods/dual.md §7) equals J_t Delta theta."""
    task, l2, test = classifier["task"], classifier["l2"], classifier["test"]
    inf = _fit(classifier, "dual", "newton")
    method = inf.method
    removal = method.dual_removal(torch.tensor(GROUP), "newton")
    effect = inf.remove(GROUP)
    assert relative_error(method.output_change(test, removal), effect.outputs(test)) < 1e-11
    assert relative_error(method.loss_change(test, removal), effect.loss(test)) < 1e-11
    # with the regulariser's share: grad l~_t^T Delta theta = grad l_t^T Delta theta + l2 theta^T..
    theta = ParameterSpace(task.model).flat()
    expected = effect.loss(test) + l2 * float(theta @ effect.params)
    got = method.loss_change(test, removal, reg_share=True)
    assert relative_error(got, expected) < 1e-11
    # the removed dual variables are set to -alpha*_F (docs/methods/dual.md §4)
    alpha = method.alpha[GROUP]
    assert relative_error(removal.delta_alpha[GROUP], -alpha) < 1e-12


def _random_features_problem(n: int = 30, d: int = 3, width: int = 40, c: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    features = torch.nn.Linear(d, width).double()
    for p in features.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(width, c).double()
    model = torch.nn.Sequential(features, torch.nn.Tanh(), head)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = torch.randn(n, c, generator=gen, dtype=torch.float64)
    Xt = torch.randn(8, d, generator=gen, dtype=torch.float64)
    Yt = torch.randn(8, c, generator=gen, dtype=torch.float64)
    return model, features, (X, Y), (Xt, Yt)


def _ridge_head(Phi: np.ndarray, Y: np.ndarray, l2: float) -> np.ndarray:
    """argmin (1/n) sum 0.5||W phi + b - y||^2 + (l2/2)(||W||^2 + ||b||^2), as [W | b]."""
    A = np.hstack([Phi, np.ones((len(Phi), 1))])
    n = len(Phi)
    return np.linalg.solve(A.T @ A / n + l2 * np.eye(A.shape[1]), A.T @ Y / n).T


def test_squared_loss_dual_newton_equals_closed_form_retraining() -> None:
    model, features, train, test = _random_features_problem()
    X, Y = train
    l2 = 1e-2
    task = infkit.Task.regression(model)
    infkit.train_to_optimum(task, train, l2, tolerance=1e-6)  # a loose optimum on purpose
    Phi = torch.tanh(features(X)).detach().numpy()
    Phi_t = torch.tanh(features(test[0])).detach().numpy()
    keep = np.setdiff1d(np.arange(len(X)), GROUP)
    head = _ridge_head(Phi[keep], Y.numpy()[keep], l2)  # [c, width + 1]
    expected_theta = np.concatenate([head[:, :-1].reshape(-1), head[:, -1]])
    expected_outputs = Phi_t @ head[:, :-1].T + head[:, -1]

    inf = infkit.Influence(task, "dual", "newton", l2=l2).fit(train)
    effect = inf.remove(GROUP)
    theta = ParameterSpace(model).flat()
    assert relative_error(theta + effect.params, torch.as_tensor(expected_theta)) < 1e-10
    outputs = model(test[0]).detach() + effect.outputs(test)
    assert relative_error(outputs, torch.as_tensor(expected_outputs)) < 1e-10
    method = inf.method
    kernel_outputs = model(test[0]).detach() + method.output_change(
        test, method.dual_removal(torch.tensor(GROUP), "newton")
    )
    assert relative_error(kernel_outputs, torch.as_tensor(expected_outputs)) < 1e-10


def test_representer_identity_linear_softmax() -> None:
    """theta* = J^T alpha*, alpha* = -g/(l2 N), for an L2 softmax regression (numpy J)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(20, 30, generator=gen, dtype=torch.float64)  # P = 93 > N*C = 60
    y = torch.randint(0, 3, (20,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 3).double()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-13).converged
    W, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    Xn = X.numpy()
    logits = Xn @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p - np.eye(3)[y.numpy()]
    alpha = -g / (l2 * len(Xn))
    # J_i^T alpha_i for f = W x + b is (alpha_i x_i^T, alpha_i)
    W_rep, b_rep = alpha.T @ Xn, alpha.sum(0)
    err = np.linalg.norm(np.concatenate([(W - W_rep).ravel(), b - b_rep])) / np.linalg.norm(
        np.concatenate([W.ravel(), b])
    )
    assert err < 1e-10
    inf = infkit.Influence(task, "dual", "newton", l2=l2).fit((X, y))
    method = inf.method
    assert method.representer_error < 1e-10
    np.testing.assert_allclose(method.alpha.numpy(), alpha, rtol=1e-12, atol=1e-15)


def test_representer_identity_linearised_model_with_init_anchor() -> None:
    """theta* - theta_0 = J_0^T alpha* for a linearised MLP trained with the anchor theta_0."""
    X, _ = _data(20, 1, d=4, seed=5)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.7).long()
    net = _mlp(4, 12, 3, seed=4)
    theta0 = ParameterSpace(net).flat().clone()
    lin = linearize(net, offset=True)  # (l2/2)||params||^2 = (l2/2)||theta - theta_0||^2
    task = infkit.Task.classification(lin)
    l2 = 1e-2
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12).converged
    # independent J_0: explicit per-example Jacobians of the network at theta_0
    J0 = PerExample(infkit.Task.classification(net), ParameterSpace(net)).jacobians(
        infkit.data.ExampleSet((X, y)).take(torch.arange(len(X)))
    )
    logits = lin(X).detach()
    g = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, 3)
    alpha = -g / (l2 * len(X))
    delta = lin.flat_params() - theta0
    rep = torch.einsum("ncp,nc->p", J0, alpha)
    assert relative_error(rep, delta) < 1e-10

    # the same model in the absolute parametrisation, attributed with anchor="init"
    absolute = linearize(net)
    ParameterSpace(absolute).assign_(lin.flat_params())
    # The facade's stationarity check uses the method's anchor: no warning at this optimum.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf_abs = infkit.Influence(
            infkit.Task.classification(absolute), "dual", "newton", l2=l2, anchor="init"
        ).fit((X, y))
    assert inf_abs.stationarity < 1e-8
    inf_off = infkit.Influence(task, "dual", "newton", l2=l2).fit((X, y))
    assert inf_abs.method.representer_error < 1e-10
    assert (
        relative_error(inf_abs.remove(GROUP[:3]).params, inf_off.remove(GROUP[:3]).params) < 1e-10
    )


def test_linearize_at_matches_numpy_dual_newton() -> None:
    """linearize_at=theta_0 on a trained network: the paper's formula, checked in numpy.

    K_0 from explicit Jacobians at theta_0; g, Lambda at the trained outputs; the simplified
    system (Lambda_R K_RR + N_R l2 I) Delta-alpha_R = N_F l2 alpha*_R + Lambda_R K_RF alpha*_F.
    """
    X, _ = _data(16, 1, d=3, seed=6)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.3).long()
    net = _mlp(3, 10, 3, seed=7)
    space = ParameterSpace(net)
    theta0 = space.flat().clone()
    J0 = (
        PerExample(infkit.Task.classification(net), space)
        .jacobians(infkit.data.ExampleSet((X, y)).take(torch.arange(len(X))))
        .numpy()
    )
    l2 = 1e-1
    task = infkit.Task.classification(net)
    infkit.train_to_optimum(task, (X, y), l2, max_iter=30)  # any trained point will do
    n, c, p = J0.shape
    K = J0.reshape(n * c, p) @ J0.reshape(n * c, p).T
    probs = torch.softmax(net(X), 1).detach().numpy()
    g = probs - np.eye(c)[y.numpy()]
    lam = np.stack([np.diag(q) - np.outer(q, q) for q in probs])
    alpha = (-g / (l2 * n)).reshape(-1)
    F = np.array([2, 7, 9])
    R = np.setdiff1d(np.arange(n), F)
    rows = (R[:, None] * c + np.arange(c)).ravel()
    cols = (F[:, None] * c + np.arange(c)).ravel()
    lam_R = np.zeros((len(rows), len(rows)))
    for k, i in enumerate(R):
        lam_R[k * c : (k + 1) * c, k * c : (k + 1) * c] = lam[i]
    A = lam_R @ K[np.ix_(rows, rows)] + len(R) * l2 * np.eye(len(rows))
    b = len(F) * l2 * alpha[rows] + lam_R @ K[np.ix_(rows, cols)] @ alpha[cols]
    delta_alpha = np.zeros(n * c)
    delta_alpha[rows] = np.linalg.solve(A, b)
    delta_alpha[cols] = -alpha[cols]
    expected = J0.reshape(n * c, p).T @ delta_alpha

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not at an exact optimum: irrelevant here
        inf = infkit.Influence(task, "dual", "newton", l2=l2, linearize_at=theta0).fit((X, y))
    assert relative_error(inf.remove(F.tolist()).params, torch.as_tensor(expected)) < 1e-10
    # Outputs change at the linearisation point: K_0(X_t, X) Delta-alpha = J_0(X_t) Delta theta.
    Xt = X[:4] + 0.1
    J0t = (
        PerExample(
            infkit.Task.classification(_mlp(3, 10, 3, seed=7)),
            ParameterSpace(_mlp(3, 10, 3, seed=7)),
        )
        .jacobians(infkit.data.ExampleSet((Xt, y[:4])).take(torch.arange(4)))
        .numpy()
    )
    predicted = inf.remove(F.tolist()).outputs((Xt, y[:4]))
    assert relative_error(predicted, torch.as_tensor(J0t @ expected)) < 1e-10
    # The loss and the measurement (here the loss) change by g_t^T K_0 Delta-alpha, alike.
    effect = inf.remove(F.tolist())
    g_t = torch.softmax(net(Xt), 1).detach() - torch.eye(c, dtype=torch.float64)[y[:4]]
    loss_change = (g_t * torch.as_tensor(J0t @ expected)).sum(1)
    assert relative_error(effect.loss((Xt, y[:4])), loss_change) < 1e-10
    assert relative_error(effect.measurement((Xt, y[:4])), loss_change) < 1e-10
    # Decompositions use gradients at theta*, not at the expansion point: refused, not wrong.
    with pytest.raises(UnsupportedError, match=r"with linearize_at.*methods that do"):
        inf.with_estimator("if").module_scores((Xt, y[:4]))


def test_memory_refusal_names_scalable_methods(classifier: dict) -> None:
    task, l2, train = classifier["task"], classifier["l2"], classifier["train"]
    inf = infkit.Influence(task, "dual", l2=l2, memory_limit=100_000)
    with pytest.raises(ProblemTooLargeError, match=r"N\*C.*scales") as info:
        inf.fit(train)
    assert "identity" in str(info.value)
    assert isinstance(info.value, MemoryError)


def test_auto_picks_dual_when_parameters_dwarf_the_data() -> None:
    X, _ = _data(5, 1, d=4, seed=8)
    y = torch.tensor([0, 1, 0, 1, 1])
    model = _mlp(4, 20, 2, seed=9)  # P = 562 >= 20 * N * C = 200
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, (X, y), 1e-1, tolerance=1e-6)
    # exact's P x P curvature (7.6 MB) is over the limit, dual's (N*C)^2 is not
    inf = infkit.Influence(task, "auto", l2=1e-1, memory_limit=1_000_000).fit((X, y))
    assert inf.method.name == "dual"
    assert infkit.methods()["dual"]["estimators"] == ["if", "rif", "newton"]


def test_errors_are_explicit(classifier: dict) -> None:
    task, train = classifier["task"], classifier["train"]
    with pytest.raises(UnsupportedError, match="relatif"):
        infkit.Influence(task, "dual", "relatif", l2=1e-2).fit(train)
    with pytest.raises(CurvatureError, match="l2"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # l2=0: not the trained objective
        infkit.Influence(task, "dual", l2=0.0).fit(train)
    with pytest.raises(UnsupportedError, match="form"):
        infkit.Influence(task, "dual", l2=1e-2, form="qr").fit(train)
    # options are checked against the model when Influence is constructed
    with pytest.raises(InvalidInputError, match="linearize_at"):
        infkit.Influence(task, "dual", l2=1e-2, anchor="init")
    with pytest.raises(InvalidInputError, match=r"'anchor' has 3 values.*P = "):
        infkit.Influence(task, "dual", l2=1e-2, anchor=torch.zeros(3))
    with pytest.raises(InvalidInputError, match="solver='cg' works on the symmetric"):
        infkit.Influence(task, "dual", l2=1e-2, solver="cg", form="push-through")
    # a NaN anchor dropped out of the representer's residual: the scores were anchor=None's,
    # describe() read nan and nothing was said (a tester's); a NaN expansion point failed at
    # scores() with advice to damp more
    size = sum(p.numel() for p in task.model.parameters())
    names = [name for name, _ in task.model.named_parameters()]
    nan = torch.full((size,), float("nan"), dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"option 'anchor' holds NaN or Inf"):
        infkit.Influence(task, "dual", l2=1e-2, anchor=nan)
    with pytest.raises(NonFiniteError, match=r"option 'linearize_at' holds NaN or Inf"):
        infkit.Influence(task, "dual", l2=1e-2, linearize_at=nan, anchor="init")
    at = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    at[names[-1]][0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"'linearize_at' \({names[-1]}\) holds NaN"):
        infkit.Influence(task, "dual", l2=1e-2, linearize_at=at)


def test_damping_and_float32_model(classifier: dict) -> None:
    """damping enters both the same way; a float32 model still gets a float64 kernel."""
    task, l2, train, test = (classifier[k] for k in ("task", "l2", "train", "test"))
    exact = infkit.Influence(task, "exact", "newton", l2=l2, damping=1e-3).fit(train)
    dual = infkit.Influence(task, "dual", "newton", l2=l2, damping=1e-3).fit(train)
    assert relative_error(dual.scores(test), exact.scores(test)) < TOL
    assert relative_error(dual.remove(GROUP).params, exact.remove(GROUP).params) < TOL
    model32 = copy.deepcopy(task.model).float()
    task32 = infkit.Task.classification(model32)
    X, y = train
    inf32 = infkit.Influence(task32, "dual", "if", l2=l2).fit((X.float(), y))
    assert inf32.method.K.dtype == torch.float64
    ref = _fit(classifier, "dual", "if")
    assert relative_error(inf32.scores((test[0].float(), test[1])), ref.scores(test)) < 1e-4
    # kernel_dtype reaches the method: Influence's own dtype= (the passes' autocast precision)
    # had taken the option's old name, which left the kernel in float64 without a word.
    single = infkit.Influence(task32, "dual", "if", l2=l2, kernel_dtype=torch.float32)
    single.fit((X.float(), y))
    assert single.method.K.dtype == torch.float32
    assert single.describe()["options"]["kernel_dtype"] == "float32"
    assert relative_error(single.scores((test[0].float(), test[1])), ref.scores(test)) < 1e-3


def test_a_kernel_without_ridge_names_exact_where_p_is_small() -> None:
    """N = 40, P = 4 at l2 = damping = 0: the refusal said the GGN was singular "with P > N*C",
    where P < N*C and exact answers; it names the kernel system and exact (a tester's)."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    task = infkit.Task.regression(torch.nn.Linear(3, 1).double())
    infkit.train_to_optimum(task, (X, y), 0.0)
    with pytest.raises(CurvatureError, match=r"whatever P and N\*C.*method='exact'"):
        infkit.Influence(task, "dual", l2=0.0).fit((X, y))
    assert bool(
        torch.isfinite(infkit.Influence(task, "exact", l2=0.0).fit((X, y)).self_scores()).all()
    )


def test_scores_that_overflow_are_refused_and_an_interpolant_is_not_drift() -> None:
    """A last layer scaled by 1e306: dual gave NaN and exact Inf self-scores without a word;
    both refused, naming the method. An interpolating least-squares fit (residuals 1.6e-15,
    its step to the optimum 7e-16 of theta) was warned of as "not at a stationary point ...
    100%": a step at the parameters' rounding is no drift (a tester's)."""
    torch.manual_seed(7)
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    mlp = mlp.double()
    with torch.no_grad():
        mlp[2].weight.mul_(1e306)
    task = infkit.Task.classification(mlp)
    for method in ("dual", "exact"):
        refused = pytest.raises(infkit.errors.NonFiniteError, match=f"method '{method}'")
        with refused, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            infkit.Influence(task, method, l2=1e-2).fit((X, y)).self_scores()
    torch.manual_seed(3)
    X, y = torch.randn(10, 30, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    model = torch.nn.Linear(30, 1).double()
    with torch.no_grad():
        solution = torch.linalg.lstsq(torch.cat([X, torch.ones(10, 1).double()], 1), y).solution
        model.weight.copy_(solution[:30].T)
        model.bias.copy_(solution[30])
    task = infkit.Task.regression(model)
    for method in ("dual", "exact"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*not at a stationary point")
            inf = infkit.Influence(task, method, l2=0.0, damping=1e-6).fit((X, y))
        assert inf.describe()["drift"]["relative_step"] < 1e-13


def test_a_low_precision_model_off_its_optimum_is_still_warned_of() -> None:
    """The rounding guard of the drift warning (a step below 10 epsilons of theta is none)
    must not silence a real step: a bfloat16 model 2.4-3.6% of theta from its optimum (a
    reviewer's; a cut-off of 1000 epsilons of bfloat16 let it pass). (In float32 the guard is
    10 epsilons, 1.2e-6 of theta.)"""
    torch.manual_seed(0)
    X = torch.randn(40, 4, dtype=torch.float64)
    w = torch.tensor([[1.0], [2.0], [-1.0], [0.5]], dtype=torch.float64)
    y = X @ w + 0.05 * torch.randn(40, 1, dtype=torch.float64)
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1).double()
    infkit.train_to_optimum(infkit.Task.regression(model), (X, y), 1e-2)
    for dtype, moved in ((torch.bfloat16, 0.05),):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted.weight.add_(moved * shifted.weight.norm() * torch.randn_like(shifted.weight))
        task = infkit.Task.regression(shifted.to(dtype))
        with pytest.warns(UserWarning, match="not at a stationary point"):
            infkit.Influence(task, "exact", l2=1e-2).fit((X.to(dtype), y.to(dtype)))
