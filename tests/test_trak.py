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


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
def test_trak_refusals(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.raises(CurvatureError, match=r"lower proj_dim below N .*or set lambda_reg"):
        infkit.Influence(task, "trak", l2=l2, proj_dim=70).fit(train)
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
    assert stages["queries"].passes == stages["scores"].passes == 0
    training = inf.fitted.train
    read: list[int] = []
    batches = training.batches
    monkeypatch.setattr(training, "batches", lambda *a, **k: read.append(1) or batches(*a, **k))
    inf.scores(mlp_problem["test"])
    assert read == []
    inf.self_scores()  # which does read them: the count works
    assert read
