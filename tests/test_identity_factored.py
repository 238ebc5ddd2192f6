"""method="identity": the factored per-layer products against per-example gradients and autograd.

For Linear layers on [B, d] inputs the gradient dot products are computed as
(delta_t . delta_j)(a_t . a_j) summed over layers; every other model, and every model that fails
fit's check, uses per-example gradients. Both must give the same scores.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from autograd_reference import autograd_gradients
from kfac_helpers import Conv1D

import infkit
from infkit.errors import NonFiniteError
from infkit.evaluate import relative_error

identity_module = importlib.import_module("infkit.methods.identity")
factored_module = importlib.import_module("infkit.layers.factored")

N, T, L2 = 40, 6, 1e-2


# the models here are not trained: their stationarity warnings are not the point
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def data(d_in: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N + T, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N + T,), generator=gen)
    return (X[:N], y[:N]), (X[N:], y[N:])


def mlp(seed: int = 0) -> torch.nn.Module:
    """Two bias layers and one bias-free layer (no ones-column)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 4, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 3),
    ).double()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def perturbed(model, scale: float, seed: int):
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def both_paths(monkeypatch, make, **kwargs):
    """The fitted Influence with the factored products and with per-example gradients."""
    factored = make(**kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(identity_module, "factored_layers", lambda engine, train: None)
        materialised = make(**kwargs)
    assert factored.describe()["gradients"] == "factored"
    assert materialised.describe()["gradients"] == "per-example"
    return factored, materialised


def test_gradient_dot_product_factored_equals_per_example_and_autograd(monkeypatch) -> None:
    model = mlp()
    task = infkit.Task.classification(model)
    train, test = data()
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    V = G + L2 * flat(model)
    for estimator in ("if", "relatif"):

        def make(estimator=estimator):
            return infkit.Influence(task, "identity", estimator, l2=L2, batch_size=16).fit(train)

        fac, mat = both_paths(monkeypatch, make)
        if estimator == "if":
            expected, expected_self = Q @ V.T / N, (G * V).sum(1) / N
        else:
            unit = V / V.norm(dim=1, keepdim=True)
            expected, expected_self = Q @ unit.T, (G * unit).sum(1)
        for inf in (fac, mat):
            assert relative_error(inf.scores(test), expected) < 1e-10
            assert relative_error(inf.self_scores(), expected_self) < 1e-10
        assert relative_error(fac.scores(test), mat.scores(test)) < 1e-10
    # RelatIF's loss norm sqrt(v . H^{-1} v) is ||v|| too when H = I
    loss_norm = infkit.Influence(task, "identity", "relatif", l2=L2, relatif="loss").fit(train)
    assert relative_error(loss_norm.scores(test), Q @ (V / V.norm(dim=1, keepdim=True)).T) < 1e-10
    # l2 = 0: no regulariser share at all
    plain = infkit.Influence(task, "identity", l2=0.0, batch_size=16).fit(train)
    assert relative_error(plain.scores(test), Q @ G.T / N) < 1e-10
    assert relative_error(plain.self_scores(), (G * G).sum(1) / N) < 1e-10


def test_tracincp_factored_equals_per_example_and_autograd(monkeypatch) -> None:
    model = mlp(1)
    task = infkit.Task.classification(model)
    train, test = data(seed=1)
    trajectory = [perturbed(model, 0.4, 1), perturbed(model, 0.2, 2), model]
    checkpoints = [trajectory[0].state_dict(), flat(trajectory[1]), model.state_dict()]
    rates = [0.5, 0.2, 0.05]
    final = flat(model).clone()
    for estimator in ("if", "relatif"):

        def make(estimator=estimator):
            return infkit.Influence(
                task,
                "identity",
                estimator,
                l2=L2,
                batch_size=16,
                checkpoints=checkpoints,
                learning_rates=rates,
            ).fit(train)

        fac, mat = both_paths(monkeypatch, make)
        expected = torch.zeros(T, N, dtype=torch.float64)
        expected_self = torch.zeros(N, dtype=torch.float64)
        for m, eta in zip(trajectory, rates):
            G, Q = autograd_gradients(m, *train), autograd_gradients(m, *test)
            V = G + L2 * flat(m)
            if estimator == "if":
                expected += eta * Q @ V.T / N
                expected_self += eta * (G * V).sum(1) / N
            else:
                unit = V / V.norm(dim=1, keepdim=True)
                expected += eta * Q @ unit.T
                expected_self += eta * (G * unit).sum(1)
        for inf in (fac, mat):
            assert relative_error(inf.scores(test), expected) < 1e-10
            assert relative_error(inf.self_scores(), expected_self) < 1e-10
        assert relative_error(fac.scores(test), mat.scores(test)) < 1e-10
        assert relative_error(fac.self_scores(), mat.self_scores()) < 1e-10
    assert torch.equal(flat(model), final)  # the model is left at its own parameters


def test_a_factored_run_abandoned_at_a_checkpoint_restores_the_model(monkeypatch) -> None:
    """The fallback after a failure at checkpoint 2 runs with the model's own parameters."""
    model = mlp(7)
    task = infkit.Task.classification(model)
    train, test = data(seed=7)
    trajectory = [perturbed(model, 0.4, 7), perturbed(model, 0.2, 8)]
    rates = [0.5, 0.2]
    inf = infkit.Influence(
        task,
        "identity",
        l2=L2,
        batch_size=16,
        checkpoints=[m.state_dict() for m in trajectory],
        learning_rates=rates,
    ).fit(train)
    assert inf.describe()["gradients"] == "factored"
    calls = {"n": 0}
    gram = factored_module.FactoredGradients.gram

    def failing(left, right):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first batch
            raise factored_module.NotFactoredError
        return gram(left, right)

    final = flat(model).clone()
    monkeypatch.setattr(factored_module.FactoredGradients, "gram", staticmethod(failing))
    S = inf.scores(test)
    assert calls["n"] == 4
    assert torch.equal(flat(model), final)
    expected = torch.zeros(T, N, dtype=torch.float64)
    for m, eta in zip(trajectory, rates):
        G, Q = autograd_gradients(m, *train), autograd_gradients(m, *test)
        expected += eta * Q @ (G + L2 * flat(m)).T / N
    assert relative_error(S, expected) < 1e-10


def test_margin_measurement_and_float32(monkeypatch) -> None:
    model = mlp(2)
    train, test = data(seed=2)
    task = infkit.Task.classification(model, measurement="margin")
    fac, mat = both_paths(
        monkeypatch, lambda: infkit.Influence(task, "identity", l2=L2, batch_size=16).fit(train)
    )
    assert relative_error(fac.scores(test), mat.scores(test)) < 1e-10
    # float32: the products run in float32, accumulated in float64
    model32 = copy.deepcopy(model).float()
    task32 = infkit.Task.classification(model32)
    train32 = (train[0].float(), train[1])
    test32 = (test[0].float(), test[1])
    inf32 = infkit.Influence(task32, "identity", l2=L2, batch_size=16).fit(train32)
    assert inf32.describe()["gradients"] == "factored"
    S32 = inf32.scores(test32)
    assert S32.dtype == torch.float32
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    assert relative_error(S32, Q @ (G + L2 * flat(model)).T / N) < 1e-5


def test_hugging_face_conv1d_layout_is_factored() -> None:
    torch.manual_seed(6)
    model = torch.nn.Sequential(Conv1D(6, 5), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    task = infkit.Task.classification(model)
    train, test = data(seed=6)
    inf = infkit.Influence(task, "identity", l2=L2, batch_size=16).fit(train)
    assert inf.describe()["gradients"] == "factored"
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    V = G + L2 * flat(model)
    assert relative_error(inf.scores(test), Q @ V.T / N) < 1e-10
    assert relative_error(inf.self_scores(), (G * V).sum(1) / N) < 1e-10


class WithLayerNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class WithEmbedding(torch.nn.Module):
    """Integer inputs [B, 2] -> embedding sum -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.embed(ids).sum(1)))


class LinearTwice(torch.nn.Module):
    """One Linear called twice per example: its gradient is a sum of two outer products."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class PerPosition(torch.nn.Module):
    """A Linear on [B, 3, d] positions (its gradient sums three outer products), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        positions = torch.stack([x, x.roll(1, dims=1), x.flip(1)], dim=1)
        return torch.tanh(self.fc(positions)).sum(1)


class WeightReusedOutsideItsModule(torch.nn.Module):
    """fc1.weight is also used functionally: hooks on fc1 miss part of its gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h + 0.3 * torch.nn.functional.linear(h, self.fc1.weight))


class BatchCoupled(torch.nn.Module):
    """Subtracts the batch mean even in eval mode: examples are not independent in a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h - 0.5 * h.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "make_model",
    [WithLayerNorm, LinearTwice, PerPosition, WeightReusedOutsideItsModule, WithEmbedding],
)
def test_unsupported_models_fall_back_to_per_example_gradients(make_model) -> None:
    torch.manual_seed(3)
    model = make_model().double()
    task = infkit.Task.classification(model)
    if make_model is WithEmbedding:
        gen = torch.Generator().manual_seed(3)
        X = torch.randint(0, 10, (N + T, 2), generator=gen)
        y = torch.randint(0, 3, (N + T,), generator=gen)
        train, test = (X[:N], y[:N]), (X[N:], y[N:])
    else:
        train, test = data(seed=3)
    checkpoints = [perturbed(model, 0.3, 4).state_dict(), model.state_dict()]
    inf = infkit.Influence(
        task, "identity", l2=L2, batch_size=16, checkpoints=checkpoints, learning_rates=[0.3, 0.1]
    ).fit(train)
    assert inf.describe()["gradients"] == "per-example"
    expected = torch.zeros(T, N, dtype=torch.float64)
    expected_self = torch.zeros(N, dtype=torch.float64)
    for state, eta in zip(checkpoints, [0.3, 0.1]):
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        G, Q = autograd_gradients(m, *train), autograd_gradients(m, *test)
        V = G + L2 * flat(m)
        expected += eta * Q @ V.T / N
        expected_self += eta * (G * V).sum(1) / N
    assert relative_error(inf.scores(test), expected) < 1e-10
    assert relative_error(inf.self_scores(), expected_self) < 1e-10


def test_fit_check_catches_examples_coupled_within_a_batch() -> None:
    torch.manual_seed(4)
    model = BatchCoupled().double()
    task = infkit.Task.classification(model)
    train, test = data(seed=4)
    inf = infkit.Influence(task, "identity", l2=L2, batch_size=16).fit(train)
    assert inf.describe()["gradients"] == "per-example"
    # per-example gradients: each example alone, as engine.grads evaluates it
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    assert relative_error(inf.scores(test), Q @ (G + L2 * flat(model)).T / N) < 1e-10


def test_frozen_weight_with_trainable_bias_falls_back() -> None:
    model = mlp(5)
    model[0].weight.requires_grad_(False)  # its bias stays trainable: not a factored block
    task = infkit.Task.classification(model)
    train, test = data(seed=5)
    inf = infkit.Influence(task, "identity", l2=L2, batch_size=16).fit(train)
    assert inf.describe()["gradients"] == "per-example"
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    assert relative_error(inf.scores(test), Q @ (G + L2 * flat(model)).T / N) < 1e-10
    # a frozen layer as a whole is fine: the remaining layers are factored
    model[0].bias.requires_grad_(False)
    inf = infkit.Influence(task, "identity", l2=L2, batch_size=16).fit(train)
    assert inf.describe()["gradients"] == "factored"
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    assert relative_error(inf.scores(test), Q @ (G + L2 * flat(model)).T / N) < 1e-10


class SqrtFirstFeature(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.linear(torch.cat([x[:, :1].sqrt(), x[:, 1:]], dim=1))


def test_a_nan_test_gradient_still_names_the_example() -> None:
    model = SqrtFirstFeature().double()
    task = infkit.Task.classification(model)
    train, (Xt, yt) = data(seed=6)
    train[0][:, 0] = train[0][:, 0].abs() + 0.1
    Xt = Xt.clone()
    Xt[:, 0] = Xt[:, 0].abs() + 0.1
    Xt[3, 0] = -1.0
    inf = infkit.Influence(task, "identity", l2=L2).fit(train)
    assert inf.describe()["gradients"] == "factored"
    with pytest.raises(NonFiniteError, match=r"example 3 of the test set contains NaN"):
        inf.scores((Xt, yt))


def test_queries_are_scored_together_in_one_pass_and_an_oversized_one_is_named(
    monkeypatch,
) -> None:
    """Each chunk of queries is a pass over the training data: the chunks take up to a quarter
    of memory_limit, not a tenth of the result (a tester's 32 language-model queries took 33
    passes, one each, under the default limit), and a single query over that quarter is said
    to run past the limit, not silently (the same tester's run peaked at 3.8x its limit)."""
    memory = importlib.import_module("infkit.memory")
    monkeypatch.setattr(memory, "CHUNK_MIN_BYTES", 1)  # a tenth of the result: one query
    train, test = data()
    model = mlp()
    rows: list[int] = []
    model[0].register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))
    inf = infkit.Influence(infkit.Task.classification(model), "identity", batch_size=N).fit(train)
    rows.clear()
    scores = inf.scores(test)
    assert rows.count(N) == 1, rows  # one pass over the training set for all T queries
    reference = torch.stack(
        [inf.scores((test[0][i : i + 1], test[1][i : i + 1]))[0] for i in range(T)]
    )
    assert relative_error(scores, reference) < 1e-12
    # the chunks are sized by the factored path's own bytes a query (its factors and score
    # row), not by the per-example path's [P] gradients and solves: a limit whose quarter holds
    # T factored queries scores them in one pass, where per-example rows would take T
    p = inf.fitted.space.size
    factored_row = inf.method.query_row_bytes(N, p)
    # per-example rows (a query's gradient, solve and score row in float64): one a chunk here
    assert T * factored_row // (3 * (N + p) * 8) == 1
    fitting = infkit.Influence(
        infkit.Task.classification(model),
        "identity",
        batch_size=N,
        memory_limit=4 * T * factored_row,
    ).fit(train)
    rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infkit.errors.Notice)
        assert relative_error(fitting.scores(test), reference) < 1e-12
    assert rows.count(N) == 1, rows
    with monkeypatch.context() as patch:  # the per-example path: a query's [P] temporaries
        patch.setattr(identity_module, "factored_layers", lambda engine, train: None)
        row_bytes = 3 * (N + p) * 8
        tight = infkit.Influence(
            infkit.Task.classification(model), "identity", memory_limit=3 * row_bytes
        ).fit(train)
        with pytest.warns(UserWarning, match=r"one query at a time .* runs past the limit"):
            tight.scores(test)


def test_the_plan_counts_the_factored_path_and_its_check() -> None:
    """The plan of a Linear model scored by factored products: the queries' factors
    (T x sum(d_in + 1 + d_out), with the bias column) and the [T, N] float64 scores, not the
    per-example path's [B, P] gradients (a tester's 0.4M-parameter MLP was planned at 1.17 GiB
    against 0.12 measured), and the fit's check on a few examples' per-example gradients; a
    model the products do not apply to keeps the per-example outline."""
    train, test = data()
    model = mlp()
    plan = infkit.Influence(infkit.Task.classification(model), "identity").plan(
        train, test, timed=False
    )
    stages = {s.name: s for s in plan.stages}
    width = (5 + 1 + 7) + (7 + 4) + (4 + 1 + 3)  # (cols + d_out) of each layer
    assert stages["queries"].bytes == T * width * 8
    assert stages["scores"].largest[1] == T * N * 8
    p = sum(x.numel() for x in model.parameters())
    check = stages["factored products' check"].bytes
    assert 4 * p * 8 <= check <= 4 * 8 * (5 * p + 2 * 7 * 6)
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    X = torch.randn(N, 1, 5, dtype=torch.float64)
    other = infkit.Influence(infkit.Task.classification(conv.double()), "identity").plan(
        (X, train[1]), (X[:T], test[1]), timed=False
    )
    assert "factored products' check" not in {s.name for s in other.stages}
