"""method="trak": the reduction to the one-step-Newton logistic surrogate (docs/testing.md §5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import infkit
from infkit.errors import CurvatureError, Notice, UnsupportedError
from infkit.evaluate import correlation, relative_error
from infkit.task import classification_margin


def per_example_gradients(model, X, y, fn) -> torch.Tensor:
    """Per-example gradients [n, P] of fn(logits, y) by plain autograd, one example at a time."""
    rows = []
    for i in range(len(y)):
        value = fn(model(X[i : i + 1]), y[i : i + 1])[0]
        grads = torch.autograd.grad(value, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def cross_entropy(logits, y):
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def newton_attribution(model, X, y, Xt, yt, lam, R=None, measurement=classification_margin):
    """tau [T, N] = phi_t^T (Phi^T Phi + lam I)^{-1} Phi^T diag(1 - p_y), densely, in float64."""
    Phi = per_example_gradients(model, X, y, classification_margin)
    F = per_example_gradients(model, Xt, yt, measurement)
    if R is not None:
        Phi, F = Phi @ R, F @ R
    q = 1 - torch.softmax(model(X), -1).gather(1, y[:, None]).squeeze(1).detach()
    gram = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64)
    return F @ torch.linalg.solve(gram, Phi.T) * q


def softmax_margin(n: int) -> tuple[torch.nn.Linear, infkit.Task, torch.Tensor, torch.Tensor]:
    """A float64 softmax regression of 4 inputs and 3 classes read through its margin (its 15
    parameters' margin gradients span 10 directions), and n examples labelled by a random
    linear map: the model, its task, X and y."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = (X @ torch.randn(4, 3, generator=gen, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    return model, infkit.Task.classification(model, measurement="margin"), X, y


def test_identity_projection_is_the_one_step_newton_surrogate(mlp_problem: dict) -> None:
    model = mlp_problem["model"]
    (X, y), (Xt, yt) = mlp_problem["train"], mlp_problem["test"]
    lam = 1e-3  # N = 60 < P = 75: Phi^T Phi alone is singular
    tau = newton_attribution(model, X, y, Xt, yt, lam)
    margin_task = infkit.Task.classification(model, measurement="margin")
    inf = infkit.Influence(
        margin_task, "trak", l2=mlp_problem["l2"], projection="identity", lambda_reg=lam
    ).fit((X, y))
    # removal effect on the margin = -(contribution of including the example)
    assert relative_error(inf.scores((Xt, yt)), -tau) < 1e-9
    # measuring the loss: the target side is grad loss instead of grad margin
    loss_task = infkit.Task.classification(model)
    tau_loss = newton_attribution(model, X, y, Xt, yt, lam, measurement=cross_entropy)
    inf_loss = infkit.Influence(
        loss_task, "trak", l2=mlp_problem["l2"], projection="identity", lambda_reg=lam
    ).fit((X, y))
    S = inf_loss.scores((Xt, yt))
    assert relative_error(S, -tau_loss) < 1e-9
    p_t = torch.softmax(model(Xt), -1).gather(1, yt[:, None]).detach()
    assert relative_error(S, (1 - p_t) * tau) < 1e-9  # d loss / d margin = -(1 - p)
    # group removal is additive and consistent with the scores through the final gradients
    delta = inf.remove([4, 11]).params
    G_t = per_example_gradients(model, Xt, yt, classification_margin)
    assert relative_error(G_t @ delta, -tau[:, [4, 11]].sum(1)) < 1e-9


def test_features_with_null_directions_are_inverted_on_their_span() -> None:
    """Softmax regression of 4 inputs and 3 classes (P = 15, N = 80): the margin does not
    change when every logit moves together, so the gradients span 10 of the 15 dimensions and
    the default (k = P, lambda_reg = 0) raised a singular-Gram CurvatureError (a tester's).
    Inverted on the span: the dense pseudo-inverse's answer (queries share the null
    directions), with a Notice; a float64 and a float32 model alike."""
    model, task, X, y = softmax_margin(90)
    infkit.train_to_optimum(task, (X[:80], y[:80]), 1e-2)
    Phi = per_example_gradients(model, X[:80], y[:80], classification_margin)
    F = per_example_gradients(model, X[80:], y[80:], classification_margin)
    assert int(torch.linalg.matrix_rank(Phi)) == 10
    q = 1 - torch.softmax(model(X[:80]), -1).gather(1, y[:80, None]).squeeze(1).detach()
    tau = F @ torch.linalg.pinv(Phi.T @ Phi) @ Phi.T * q
    for projection in ("identity", "gaussian"):
        inf = infkit.Influence(task, "trak", projection=projection, normalise=False)
        with pytest.warns(Notice, match=r"span 10 of their 15 dimensions"):
            scores = inf.fit((X[:80], y[:80])).scores((X[80:], y[80:]))
        if projection == "identity":
            assert relative_error(scores, -tau) < 1e-8
        else:  # a projection of full rank k = P keeps the span: the same answer
            assert relative_error(scores, -tau) < 1e-6
    single = copy.deepcopy(model).float()
    single_task = infkit.Task.classification(single, measurement="margin")
    with pytest.warns(Notice, match=r"span 10 of their 15 dimensions"):
        inf = infkit.Influence(single_task, "trak", projection="identity", normalise=False)
        scores = inf.fit((X[:80].float(), y[:80])).scores((X[80:].float(), y[80:]))
    assert relative_error(scores.double(), -tau) < 1e-3


def test_a_float32_removal_along_null_directions_is_the_pseudo_inverses() -> None:
    """A float32 4-5-3 tanh MLP: the removal's parameter change was 87% off the dense
    pseudo-inverse's when the null directions were inverted with a ridge of 1e-10 of the
    largest eigenvalue (rounding along them amplified 1e10 times, a reviewer's); with the
    largest eigenvalue as theirs, 3e-8. A full-rank Gram matrix with a direction 1.9e-14 of
    the largest (two inputs 3e-7 apart, float64) is inverted as it is, without a Notice."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(90, 3, generator=gen, dtype=torch.float64)
    y = (X @ torch.randn(4, 3, generator=gen, dtype=torch.float64) + noise).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    task = infkit.Task.classification(model.float())
    train = (X[:80].float(), y[:80])
    infkit.train_to_optimum(task, train, 1e-2)
    with pytest.warns(Notice, match=r"span \d+ of their 43 dimensions"):
        inf = infkit.Influence(task, "trak", projection="identity").fit(train)
    Phi, _, _ = inf.method._models_data[0]
    group = torch.tensor([3, 7, 11])
    pinv = torch.linalg.pinv(Phi.T @ Phi, hermitian=True, rtol=1e-8)
    expected = -(pinv @ (Phi[group].T @ inf.method.weights[group]))
    assert relative_error(inf.remove(group).params.double(), expected) < 1e-6

    gen = torch.Generator().manual_seed(1)
    X = torch.randn(220, 4, generator=gen, dtype=torch.float64)
    X[:, 1] = X[:, 0] + 3e-7 * torch.randn(220, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + X[:, 2] + 0.7 * torch.randn(220, generator=gen, dtype=torch.float64)) > 0
    torch.manual_seed(0)
    binary = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0)).double()
    task = infkit.Task.binary_classification(binary)
    train, test = (X[:200], y[:200].double()), (X[200:], y[200:].double())
    infkit.train_to_optimum(task, train, 1e-2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=Notice, message=".*span")
        inf = infkit.Influence(task, "trak", projection="identity").fit(train)
    Phi, _, _ = inf.method._models_data[0]
    gram = Phi.T @ Phi
    values = torch.linalg.eigvalsh(gram)
    assert float(values[0] / values[-1]) < 1e-13
    F = inf.method.features(test).double()
    expected = -(F @ torch.linalg.solve(gram, Phi.T)) * inf.method.weights
    assert relative_error(inf.scores(test), expected) < 1e-2  # 0.59 on the span path


def test_repeated_examples_leave_null_directions_whatever_k() -> None:
    """80 training rows of 5 distinct inputs, k = 7 of P = 15: the Gram matrix has rank 5 and
    pivots at rounding's level, which Cholesky took (normalised scores near 1e-14, a divisor of
    1.2e13: a reviewer's); the span is found as for a small model, with the dense pseudo-inverse's
    answer."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(5, 4, generator=gen, dtype=torch.float64)[torch.arange(80) % 5]
    y = (X @ torch.randn(4, 3, generator=gen, dtype=torch.float64)).argmax(1)
    test = (torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    torch.manual_seed(0)
    task = infkit.Task.classification(torch.nn.Linear(4, 3).double())
    infkit.train_to_optimum(task, (X, y), 1e-2)
    with pytest.warns(Notice, match="span 5 of their 7 dimensions"):
        inf = infkit.Influence(task, "trak", proj_dim=7, normalise=False).fit((X, y))
    Phi, _, _ = inf.method._models_data[0]
    features = inf.method.features(test).double()
    pinv = torch.linalg.pinv(Phi.T @ Phi, hermitian=True, rtol=1e-10)
    expected = -(features @ pinv @ Phi.T) * inf.method.weights
    assert relative_error(inf.scores(test), expected) < 1e-8


def test_a_small_spanned_direction_of_a_large_float64_model_is_kept() -> None:
    """P = 259, k = 11 of N = 12 (a repeated example among them), two inputs 4e-6 apart: the
    Gram's smallest eigenvalue is 1.3e-14 of the largest, a direction the features span (the
    exact inverse moves under float64's rounding); a cut-off of 10 k epsilons (2.4e-14) lifted
    such a direction and the scores were 1.0 off (a reviewer's, at k = N = 12, which is now
    refused). Kept: the exact inverse's answer, without a Notice."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = X[:, :3].argmax(1)
    y[1] = y[0]
    X[1] = X[0] + 4e-6
    X[3], y[3] = X[2], y[2]
    test = (torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    task = infkit.Task.classification(mlp.double())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=Notice, message=".*span")
        warnings.filterwarnings("ignore", message=".*close to the 12 training examples")
        inf = infkit.Influence(task, "trak", proj_dim=11, normalise=False).fit((X, y))
    Phi, _, _ = inf.method._models_data[0]
    values = torch.linalg.eigvalsh(Phi.T @ Phi)
    assert 10 * 2.2e-16 < float(values[0] / values[-1]) < 10 * 11 * 2.2e-16  # the case
    features = inf.method.features(test).double()
    expected = -(features @ torch.linalg.inv(Phi.T @ Phi) @ Phi.T) * inf.method.weights
    assert relative_error(inf.scores(test), expected) < 2e-3


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_random_projection_and_ensemble(mlp_problem: dict, projection: str) -> None:
    model, l2 = mlp_problem["model"], mlp_problem["l2"]
    (X, y), (Xt, yt) = mlp_problem["train"], mlp_problem["test"]
    task = infkit.Task.classification(model, measurement="margin")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoints = [model.state_dict(), other.state_dict()]
    inf = infkit.Influence(
        task, "trak", l2=l2, proj_dim=20, projection=projection, checkpoints=checkpoints
    ).fit((X, y))
    R = inf.method.projector.matrix.double()
    assert R.shape == (75, 20)
    # Ensemble as trak implements it: average of the per-model products, times average Q.
    parts, qs = [], []
    for m in (model, other):
        tau = newton_attribution(m, X, y, Xt, yt, 0.0, R=R)
        q = 1 - torch.softmax(m(X), -1).gather(1, y[:, None]).squeeze(1).detach()
        parts.append(tau / q)
        qs.append(q)
    expected = (parts[0] + parts[1]) / 2 * (qs[0] + qs[1]) / 2
    assert relative_error(inf.scores((Xt, yt)), -expected) < 1e-9
    # A streamed projection (regenerated chunk by chunk) is the same matrix.
    streamed = infkit.Influence(
        task, "trak", l2=l2, proj_dim=20, projection=projection, projection_memory=0
    ).fit((X, y))
    kept = infkit.Influence(task, "trak", l2=l2, proj_dim=20, projection=projection).fit((X, y))
    assert streamed.method.projector.matrix is None
    assert relative_error(streamed.scores((Xt, yt)), kept.scores((Xt, yt))) < 1e-10


def test_checkpoints_bring_their_own_frozen_parameters() -> None:
    """A tester's checkpoints of two independently initialised models, each with its own frozen
    random first layer: the ensemble took their trainable parameters and buffers but scored both
    with the task model's frozen layer, 0.75 off TRAK's formula at each model as its state dict
    loads it (TracInCP the same). Each checkpoint's frozen parameters are loaded as its buffers
    are."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = (X @ torch.randn(4, 3, generator=gen, dtype=torch.float64)).argmax(1)
    Xt, yt = X[:5] + 0.1, y[:5]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
        ).double()
        net[0].requires_grad_(False)
        models.append(net)
    assert float((models[0][0].weight - models[1][0].weight).abs().max()) > 0.1
    task = infkit.Task.classification(copy.deepcopy(models[0]), measurement="margin")
    checkpoints = [m.state_dict() for m in models]
    inf = infkit.Influence(
        task, "trak", projection="identity", lambda_reg=1e-3, checkpoints=checkpoints
    ).fit((X, y))

    def grads(m: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        trainable = [p for p in m.parameters() if p.requires_grad]
        rows = []
        for i in range(len(labels)):
            value = classification_margin(m(inputs[i : i + 1]), labels[i : i + 1])[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, trainable)]))
        return torch.stack(rows)

    parts, qs = [], []
    for m in models:  # TRAK's ensemble: the mean of the models' products, times the mean Q
        Phi, F = grads(m, X, y), grads(m, Xt, yt)
        gram = Phi.T @ Phi + 1e-3 * torch.eye(Phi.shape[1], dtype=torch.float64)
        parts.append(F @ torch.linalg.solve(gram, Phi.T))
        qs.append(1 - torch.softmax(m(X), -1).gather(1, y[:, None]).squeeze(1).detach())
    expected = -(parts[0] + parts[1]) / 2 * (qs[0] + qs[1]) / 2
    assert relative_error(inf.scores((Xt, yt)), expected) < 1e-9
    assert torch.equal(task.model[0].weight, models[0][0].weight)  # (the model left as it was)


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
def test_an_ensembles_removal_meets_each_model_at_its_own_parameters(mlp_problem: dict) -> None:
    """Three models: a group's change of the measurement is the sum of its scores, and the loss
    and outputs change by each model's own Jacobian times its own step, averaged; they were
    J(theta*) times the models' mean step (off 40-400% from the scores: a tester's)."""
    model, (X, y) = mlp_problem["model"], mlp_problem["train"]
    test = mlp_problem["test"]
    margin = infkit.Task.classification(model, measurement="margin")
    gen = torch.Generator().manual_seed(5)
    models = []
    for _ in range(3):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        models.append(other)
    checkpoints = [m.state_dict() for m in models]
    inf = infkit.Influence(
        margin, "trak", projection="identity", lambda_reg=0.1, checkpoints=checkpoints
    ).fit((X, y))
    group = [7, 11, 30]
    removal = inf.remove(group)
    scores = inf.scores(test)
    assert relative_error(removal.measurement(test), scores[:, group].sum(1)) < 1e-12
    steps = inf.method._model_steps(torch.tensor(group))
    assert relative_error(removal.params, sum(steps) / 3) < 1e-12
    loss_change = torch.zeros(len(test[1]), dtype=torch.float64)
    output_change = torch.zeros(len(test[1]), 3, dtype=torch.float64)
    Xt, yt = test
    for m, step in zip(models, steps):  # each model's own Jacobian, by plain autograd
        G = per_example_gradients(m, Xt, yt, cross_entropy)
        loss_change += G @ step / 3
        for c in range(3):
            Gc = per_example_gradients(m, Xt, yt, lambda logits, _y, c=c: logits[:, c])
            output_change[:, c] += Gc @ step / 3
    assert relative_error(removal.loss(test), loss_change) < 1e-10
    assert relative_error(removal.outputs(test), output_change) < 1e-10


def test_the_identity_projection_is_held_to_n_by_the_span_of_its_features(
    mlp_problem: dict,
) -> None:
    """k = P = 75 against 20 examples and no ridge: the gradients span 20 directions, and the
    pseudo-inverse attributed each training example to itself alone (train x train scores
    diagonal, with a Notice blaming the margin: a tester's): refused. The span, not P, is what
    counts: a softmax regression's 15 parameters span 10 directions, and 12 examples invert
    them exactly (the dense pseudo-inverse's scores, a reviewer's), with the inflation warned
    of (10 > N / 2)."""
    task, (X, y), l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with (
        pytest.raises(CurvatureError, match=r"span 20 directions, as many as the 20 training"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", Notice)  # (a notice blaming the margin came first)
        infkit.Influence(task, "trak", l2=l2, projection="identity").fit((X[:20], y[:20]))
    model, margin, X, y = softmax_margin(16)
    with pytest.warns(UserWarning, match=r"span 10 directions, close to the 12 .* = 6\.0"):
        inf = infkit.Influence(margin, "trak", projection="identity").fit((X[:12], y[:12]))
    Phi = per_example_gradients(model, X[:12], y[:12], classification_margin)
    F = per_example_gradients(model, X[12:], y[12:], classification_margin)
    q = 1 - torch.softmax(model(X[:12]), -1).gather(1, y[:12, None]).squeeze(1).detach()
    tau = F @ torch.linalg.pinv(Phi.T @ Phi, hermitian=True, rtol=1e-10) @ Phi.T * q
    assert relative_error(inf.scores((X[12:], y[12:])), -tau) < 1e-8


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
def test_trak_refusals(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.raises(CurvatureError, match=r"lower proj_dim below N .*or set lambda_reg"):
        infkit.Influence(task, "trak", l2=l2, proj_dim=70).fit(train)
    # k = N features spanning N directions: each training example attributed to itself alone
    # (a reviewer's train x train scores were diagonal to 6e-14): refused, by the span
    X, y = train
    with pytest.raises(CurvatureError, match=r"span 20 directions, as many as the 20 training"):
        infkit.Influence(task, "trak", l2=l2, proj_dim=20).fit((X[:20], y[:20]))
    # ... and only by it: a softmax regression's 15 parameters span 10 directions, and k = N =
    # 15 inverts them exactly, as the identity projection does (another reviewer's, refused by
    # k alone)
    _, softmax, X, y = softmax_margin(15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        projected = infkit.Influence(softmax, "trak", proj_dim=15).fit((X, y)).scores((X, y))
        whole = infkit.Influence(softmax, "trak", projection="identity").fit((X, y)).scores((X, y))
    assert relative_error(projected, whole) < 1e-8
    off = projected - torch.diag(torch.diagonal(projected))
    assert float(off.abs().max() / torch.diagonal(projected).abs().max()) > 0.05
    with pytest.raises(UnsupportedError, match="'trak' cannot compute estimator 'rif'"):
        infkit.Influence(task, "trak", "rif", l2=l2).fit(train)
    regression = infkit.Task.regression(mlp_problem["model"])
    with pytest.raises(UnsupportedError, match="pass output=fn"):
        X, _y = train
        infkit.Influence(regression, "trak", proj_dim=10).fit((X, torch.zeros(60, 3).double()))


def test_trak_defaults_work_when_n_is_below_p(mlp_problem: dict) -> None:
    """N = 60 < P = 75: the default projection stays at N // 4 and needs no ridge; so narrow
    a projection (below 64 dimensions and P) is told, a proj_dim given is not."""
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.warns(
        Notice,
        match=r"projects the 75 gradient coordinates to k = 15 \(N // 4, at least 1, with N = 60",
    ):
        inf = infkit.Influence(task, "trak", l2=l2).fit(train)
    assert inf.describe()["proj_dim"] == 15
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        infkit.Influence(task, "trak", l2=l2, proj_dim=15).fit(train)
    S = inf.scores(mlp_problem["test"])
    assert bool(torch.isfinite(S).all())
    exact = infkit.Influence(task, "exact", l2=l2).fit(train)
    # the surrogate agrees with the influence function in direction (see its declared fidelity)
    assert correlation(S, exact.scores(mlp_problem["test"])).pearson > 0.3


def test_a_proj_dim_above_p_is_told_as_capped(mlp_problem: dict) -> None:
    """proj_dim=100 of P = 75 parameters projects to k = 75: said (describe() alone said it)."""
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.warns(Notice, match=r"proj_dim=100 exceeds the 75 attributed parameters: .*k = 75"):
        inf = infkit.Influence(task, "trak", l2=l2, proj_dim=100, lambda_reg=1.0).fit(train)
    assert inf.describe()["proj_dim"] == 75


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
def test_trak_warns_when_the_projection_is_close_to_n(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.warns(UserWarning, match=r"inflates by about N / \(N - k\) = 2\.4"):
        infkit.Influence(task, "trak", l2=l2, proj_dim=35).fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        infkit.Influence(task, "trak", l2=l2, proj_dim=35, lambda_reg=1.0).fit(train)
        infkit.Influence(task, "trak", l2=l2, proj_dim=25).fit(train)


def test_the_plan_of_trak_counts_what_its_fit_keeps(
    mlp_problem: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan(): the fit holds the features [M, N, k], each model's k x k factor and R as the
    fitted method keeps them, in one pass a model; the queries and scores read no training
    data (TRAK scores against its kept features)."""
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    checkpoints = [copy.deepcopy(mlp_problem["model"].state_dict()) for _ in range(2)]
    inf = infkit.Influence(task, "trak", l2=l2, proj_dim=10, checkpoints=checkpoints)
    stages = {s.name: s for s in inf.plan(train, mlp_problem["test"], timed=False).stages}
    inf.fit(train)
    method = inf.method
    assert method.projector.matrix is not None  # R kept whole at this size
    kept = method.projector.matrix.nbytes + sum(
        Phi.nbytes + L.nbytes for Phi, L, _ in method._models_data
    )
    assert stages["fit trak"].held == kept and stages["fit trak"].passes == 2
    # the projections are priced (the plan said 0 GFLOP: a tester's fit took 70-615 times it),
    # R's draws at every batch where it is regenerated chunk by chunk
    n, p = len(train[1]), 75
    assert stages["fit trak"].flops >= 2 * n * p * 10 * 2 and stages["queries"].flops > 0
    streamed = infkit.Influence(
        task, "trak", l2=l2, proj_dim=10, checkpoints=checkpoints, projection_memory=0
    ).plan(train, mlp_problem["test"], timed=False)
    assert streamed.stages[0].flops > stages["fit trak"].flops
    # the identity projection neither projects nor draws (its plan priced both: a reviewer's
    # 10.6 s for a 1.9 s run), and its Gram is decomposed for its span
    plans = {
        lam: infkit.Influence(task, "trak", l2=l2, projection="identity", lambda_reg=lam).plan(
            train, mlp_problem["test"], timed=False
        )
        for lam in (0.0, 1.0)
    }
    assert plans[0.0].stages[0].flops == 0 and plans[0.0].stages[1].flops == 0
    assert plans[0.0].stages[0].float64_flops >= 9 * p**3  # the span looked for, as fit does
    assert plans[1.0].stages[0].float64_flops < 9 * p**3  # with a ridge it is not (a reviewer's)
    assert stages["queries"].passes == stages["scores"].passes == 0
    training = inf.fitted.train
    read: list[int] = []
    batches = training.batches
    monkeypatch.setattr(training, "batches", lambda *a, **k: read.append(1) or batches(*a, **k))
    inf.scores(mlp_problem["test"])
    assert read == []
    inf.self_scores()  # which does read them: the count works
    assert read
