"""infkit.linearize: the first-order Taylor model, its training, and the linearizability check."""

from __future__ import annotations

import copy

import pytest
import torch

import infkit
from infkit.data import ExampleSet
from infkit.evaluate import relative_error
from infkit.gradients import PerExample
from infkit.linearize import LinearizedModel, linearizability, linearize
from infkit.parameters import ParameterSpace


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 10), torch.nn.Tanh(), torch.nn.Linear(10, 2)
    ).double()


def _jacobian(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    task = infkit.Task.regression(model)
    J = PerExample(task, ParameterSpace(model)).jacobians(
        ExampleSet((X, torch.zeros(len(X), 2))).take(torch.arange(len(X)))
    )
    return J  # [N, C, P]


@pytest.mark.parametrize("offset", [False, True])
def test_linearised_model_is_the_taylor_expansion(offset: bool) -> None:
    net = _net()
    X = torch.randn(6, 3, dtype=torch.float64)
    f0 = net(X).detach()
    J0 = _jacobian(net, X)
    lin = linearize(net, offset=offset)
    assert isinstance(lin, LinearizedModel)
    torch.testing.assert_close(lin(X), f0, rtol=0, atol=0)
    space = ParameterSpace(lin)
    assert space.size == J0.shape[-1]
    step = 0.5 * torch.randn(space.size, dtype=torch.float64)
    space.add_(step)
    expected = f0 + torch.einsum("ncp,p->nc", J0, step)
    torch.testing.assert_close(lin(X).detach(), expected, rtol=1e-12, atol=1e-12)
    theta0 = ParameterSpace(net).flat()
    torch.testing.assert_close(lin.flat_params(), theta0 + step, rtol=0, atol=1e-15)
    # the wrapped network is untouched; network() gives a copy at the linearised model's theta
    assert torch.equal(ParameterSpace(net).flat(), theta0)
    torch.testing.assert_close(ParameterSpace(lin.network()).flat(), theta0 + step)
    # Jacobian of the linearised model (any theta) = J_0, as the exact method sees it
    torch.testing.assert_close(_jacobian(lin, X), J0, rtol=1e-12, atol=1e-12)


def test_linearised_model_trains_and_deep_copies() -> None:
    net = _net(1)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    Y = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    lin = linearize(net, offset=True)
    task = infkit.Task.regression(lin)
    result = infkit.train_to_optimum(task, (X, Y), 1e-2, tolerance=1e-10)
    assert result.converged
    # squared loss on a model linear in theta: the optimum is a ridge regression on J_0
    J0 = _jacobian(net, X).reshape(40, -1)
    r0 = (Y - net(X).detach()).reshape(-1)
    n, p = 20, J0.shape[1]
    delta = torch.linalg.solve(
        J0.T @ J0 / n + 1e-2 * torch.eye(p, dtype=torch.float64), J0.T @ r0 / n
    )
    assert relative_error(ParameterSpace(lin).flat(), delta) < 1e-8
    clone = copy.deepcopy(lin)
    torch.testing.assert_close(clone(X), lin(X))


def test_linearizability_of_a_linear_model_is_exact() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X = torch.randn(15, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (15,))
    report = linearizability(infkit.Task.classification(model), (X, y), steps=20, lr=0.5, l2=1e-2)
    assert report.max_param_distance < 1e-12
    assert report.max_output_rmse < 1e-12
    assert report.linearizable(1e-10)
    assert report.accuracy is not None and len(report.steps) == len(report.output_rmse)


def test_linearizability_separates_lazy_from_feature_learning_training() -> None:
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = (X[:, 0] * X[:, 1] > 0).long()
    net = _net(2)
    before = ParameterSpace(net).flat().clone()
    task = infkit.Task.classification(net)
    lazy = linearizability(task, (X, y), steps=30, lr=0.01, record_every=10)
    far = linearizability(task, (X, y), steps=30, lr=1.0, record_every=10)
    assert torch.equal(ParameterSpace(net).flat(), before)  # copies are trained
    assert lazy.param_distance[0] == 0 and lazy.output_rmse[0] == 0
    assert list(lazy.steps) == [0, 10, 20, 30]
    assert 0 < lazy.max_param_distance < far.max_param_distance
    assert lazy.max_output_rmse < 0.1 * far.max_output_rmse
    assert "| step |" in far.table()


def test_linearizability_refuses_settings_that_train_nothing() -> None:
    """lr = -1 raised torch's "Invalid learning rate", lr = nan gave NaN curves, l2 = -1 was
    taken (a tester's): each is named."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    task = infkit.Task.regression(torch.nn.Linear(3, 1).double())
    for settings, message in (
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"l2": -1.0}, "l2 must be a finite number >= 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"record_every": -2}, "record_every must be an integer >= 1"),
    ):
        with pytest.raises(infkit.InvalidInputError, match=message):
            linearizability(task, (X, y), **settings)
    with pytest.raises(infkit.errors.NonFiniteError, match="training set example 2"):
        linearizability(task, (torch.where(torch.arange(12)[:, None] == 2, torch.nan, X), y))


def test_a_network_in_training_mode_is_expanded_in_evaluation_mode() -> None:
    """A tester's: a freshly built network with BatchNorm (in training mode) failed inside the
    jvp ("in-place operation ... would mutate a captured Tensor"), one with dropout gave two calls
    1.69 apart, and ``lin.eval()`` set the user's network's mode. The network is now expanded in
    evaluation mode whatever either module's, as empirical_ntk takes it: the outputs are
    f(x; theta_0) + J(x) delta of the evaluation-mode network (its dense Jacobian), the same on
    every call, and the user's network keeps its mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 2),
    ).double()
    with torch.no_grad():  # running statistics of its own, so evaluation mode is not identity
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    assert net.training
    X = torch.randn(7, 3, dtype=torch.float64)
    lin = linearize(net)
    with torch.no_grad():
        for t in lin.theta:
            t.add_(0.01 * torch.randn_like(t))
    first, second = lin(X), lin(X)
    assert torch.equal(first, second)
    evaluated = copy.deepcopy(net).eval()
    delta = torch.cat([d.reshape(-1) for d in lin.delta().values()]).detach()
    expected = evaluated(X) + _jacobian(evaluated, X) @ delta
    assert relative_error(first.detach(), expected.detach()) < 1e-12
    lin.eval()
    assert net.training and all(m.training for m in net.modules())
    lin.train()
    assert torch.equal(lin(X), first)
    assert float(net[1].num_batches_tracked) == 0  # running statistics untouched
