"""The empirical NTK against explicit Jacobians contracted densely (independent ground truth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import infkit
from infkit.data import ExampleSet
from infkit.errors import ProblemTooLargeError
from infkit.gradients import PerExample
from infkit.ntk import STRATEGIES, TangentFeatures, empirical_ntk
from infkit.parameters import ParameterSpace


def _explicit(model: torch.nn.Module, X: torch.Tensor, params=None) -> torch.Tensor:
    """Stacked per-example Jacobians [N*C, P] from the core's PerExample (vmap of jacrev)."""
    if params is not None:
        ParameterSpace(model).assign_(params)
    task = infkit.Task(model, lambda out, y: out.reshape(len(out), -1).sum(1))
    J = PerExample(task, ParameterSpace(model)).jacobians(
        ExampleSet((X, torch.zeros(len(X)))).take(torch.arange(len(X)))
    )
    return J.reshape(-1, J.shape[-1]).to(torch.float64)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 9),
        torch.nn.ReLU(),
        torch.nn.Linear(9, 3),
    ).double()


class _ConvNet(torch.nn.Module):
    """A convolution and a layer norm (explicit-Jacobian path) around linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 3, 3)
        self.norm = torch.nn.LayerNorm(18)
        self.fc = torch.nn.Linear(18, 6)
        self.out = torch.nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.conv(x)).flatten(1))
        return self.out(torch.tanh(self.fc(h)))


class _Tied(torch.nn.Module):
    """A linear layer applied twice (tied weights) and one frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, 5)
        self.frozen = torch.nn.Linear(5, 5)
        self.frozen.weight.requires_grad_(False)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(torch.tanh(self.a(self.frozen(x))))))


class _TiedDecoder(torch.nn.Module):
    """A tied autoencoder (the decoder reads the encoder's weight, transposed, outside its
    call) and a head reading a slice of its own weight besides its call."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoded = torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t())
        return self.head(decoded) + decoded[:, :4] @ self.head.weight[:, :4].T


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_and_cross_kernels_equal_explicit_jacobians(strategy: str) -> None:
    model = _mlp()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(11, 4, generator=gen, dtype=torch.float64)
    Xt = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    J, Jt = _explicit(model, X), _explicit(model, Xt)
    K = empirical_ntk(model, X, strategy=strategy, batch_size=4)
    assert K.shape == (33, 33)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(K, K.T)
    Kt = empirical_ntk(model, Xt, X, strategy=strategy, batch_size=3)
    torch.testing.assert_close(Kt, Jt @ J.T, rtol=1e-12, atol=1e-12)
    # block (i, j) is J_i J_j^T
    torch.testing.assert_close(K[3:6, 9:12], J[3:6] @ J[9:12].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_cls", [_ConvNet, _Tied])
def test_structured_rule_falls_back_exactly_where_it_does_not_apply(model_cls) -> None:
    torch.manual_seed(1)
    model = model_cls().double()
    shape = (1, 8) if model_cls is _ConvNet else (5,)
    X = torch.randn(7, *shape, dtype=torch.float64)
    J = _explicit(model, X)
    for strategy in ("structured", "jacobian", "jvp"):
        K = empirical_ntk(model, X, strategy=strategy, batch_size=3)
        torch.testing.assert_close(K, J @ J.T, rtol=1e-11, atol=1e-12)


def test_kernel_at_another_point_and_in_float64_for_a_float32_model() -> None:
    model = _mlp()
    X = torch.randn(6, 4, dtype=torch.float64)
    theta = ParameterSpace(model).flat()
    other = theta + 0.3 * torch.randn_like(theta)
    K_other = empirical_ntk(model, X, params=other)
    assert torch.equal(ParameterSpace(model).flat(), theta)  # the model is left alone
    J = _explicit(_mlp(), X, params=other)
    torch.testing.assert_close(K_other, J @ J.T, rtol=1e-12, atol=1e-12)
    model32 = _mlp().float()
    K32 = empirical_ntk(model32, X.float())
    assert K32.dtype == torch.float64
    J = _explicit(_mlp(), X.float().double())
    torch.testing.assert_close(K32, J @ J.T, rtol=1e-6, atol=1e-6)


def test_tangent_products_are_the_jacobian() -> None:
    model = _mlp()
    X = torch.randn(5, 4, dtype=torch.float64)
    J = _explicit(model, X)
    task = infkit.Task.classification(model)
    tm = PerExample(task, ParameterSpace(model), dtype=torch.float64)
    batch = ExampleSet((X, torch.zeros(5).long())).take(torch.arange(5))
    w = torch.randn(3, J.shape[1], dtype=torch.float64)
    torch.testing.assert_close(tm.jvp(batch, w).reshape(3, -1), w @ J.T, rtol=1e-12, atol=1e-13)
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(tm.vjp(batch, u), u.reshape(2, -1) @ J, rtol=1e-12, atol=1e-13)


def test_memory_is_checked_before_allocation() -> None:
    model = _mlp()
    X = torch.randn(50, 4, dtype=torch.float64)
    with pytest.raises(ProblemTooLargeError, match=r"150 x 150.*scales with N") as info:
        empirical_ntk(model, X, memory_limit=100_000)
    assert "memory limit" in str(info.value)


def test_a_weight_read_outside_its_layers_call_takes_the_explicit_jacobian() -> None:
    """A tester's tied autoencoder: the structured rule took the encoder's weight through its
    one call, its kernel 0.32 off J J^T and dual's scores 0.95 off a dense solve, unsaid (auto
    picked dual for a wide one). Checked on the first batch, such a weight is left to the
    explicit Jacobians: the kernel is J J^T, and the layers read by their call alone keep the
    rule."""
    torch.manual_seed(2)
    model = _TiedDecoder().double()
    X = torch.randn(7, 6, dtype=torch.float64)
    J = _explicit(model, X)
    for strategy in ("auto", "structured"):
        K = empirical_ntk(model, X, strategy=strategy, batch_size=3)
        torch.testing.assert_close(K, J @ J.T, rtol=1e-11, atol=1e-12)
    engine = PerExample(infkit.Task.regression(model), ParameterSpace(model))
    features = TangentFeatures(engine)
    features.resolved_strategy(ExampleSet((X, torch.zeros(7, 2))).take(torch.arange(7)))
    assert features.layers == [] and features.rest == [n for n, _ in model.named_parameters()]
    # the dual method on it against a dense solve with the same kernel
    y = torch.randn(7, 2, dtype=torch.float64)
    task = infkit.Task.regression(model)
    dual = infkit.Influence(task, "dual", l2=1e-2).fit((X, y))
    exact = infkit.Influence(task, "exact", l2=1e-2, curvature="ggn").fit((X, y))
    test = (X[:3] + 0.1, y[:3])
    assert infkit.evaluate.relative_error(dual.scores(test), exact.scores(test)) < 1e-8


def test_structured_rule_covers_single_use_linear_layers_only() -> None:
    torch.manual_seed(1)
    model = _Tied().double()
    X = torch.randn(4, 5, dtype=torch.float64)
    engine = PerExample(infkit.Task.regression(model), ParameterSpace(model))
    tm = TangentFeatures(engine)
    batch = ExampleSet((X, torch.zeros(4, 2))).take(torch.arange(4))
    assert tm.resolved_strategy(batch) == "structured"
    assert tm.layers is not None
    covered = sorted(n for layer in tm.layers for n in (layer.weight, layer.bias) if n)
    assert covered == ["frozen.bias", "head.bias", "head.weight"]
    assert tm.rest == ["a.weight", "a.bias"]


def test_inputs_and_parameters_the_kernel_cannot_be_taken_at_are_named() -> None:
    """Inputs of another width, integer inputs, a 1-d input, NaN inputs or parameters and a
    batch_size of 0 raised PyTorch's errors or gave a NaN kernel without a word (a tester's);
    each is named. A kernel that overflows (a weight of 1e306) is refused."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    mlp = mlp.double()
    X = torch.randn(6, 5, dtype=torch.float64)
    P = sum(p.numel() for p in mlp.parameters())
    cases = {
        "could not be called on x1 example 0": lambda: empirical_ntk(mlp, torch.randn(4, 7)),
        "could not be called on x2 example 0": lambda: empirical_ntk(mlp, X, torch.randn(3, 7)),
        "they are integer tensors": lambda: empirical_ntk(mlp, torch.ones(4, 5).long()),
        "batch_size must be an integer >= 1": lambda: empirical_ntk(mlp, X, batch_size=0),
        "x1 example 0 contains NaN": lambda: empirical_ntk(mlp, torch.full((2, 5), torch.nan)),
        r"taken at hold NaN or Inf \(params\)": lambda: empirical_ntk(
            mlp, X, params=torch.full((P,), torch.nan, dtype=torch.float64)
        ),
        # (a tester's: a list or a NumPy array was a raw AttributeError; both are taken below)
        r"x1 must be the inputs of N examples: .*got str": lambda: empirical_ntk(mlp, "x"),
        r"x2 must be the inputs of N examples: .*got float": lambda: empirical_ntk(mlp, X, 1.0),
        r"x1 is a NumPy array of <U1": lambda: empirical_ntk(mlp, np.array(["a", "b"])),
        r"x1 must be .* got a 0-d tensor": lambda: empirical_ntk(mlp, torch.tensor(1.0)),
        r"got a dict whose 'flag' is a 0-d tensor": lambda: empirical_ntk(
            mlp, {"features": X, "flag": torch.tensor(True)}
        ),
        r"got a dict without a tensor \(keys 'mask'\)": lambda: empirical_ntk(mlp, {"mask": None}),
    }
    for message, call in cases.items():
        with pytest.raises(infkit.InfkitError, match=message):
            call()
    K = empirical_ntk(mlp, X, X[:2])

    class Keywords(torch.nn.Module):  # a tokenizer-style model: keyword inputs, an optional one
        def __init__(self) -> None:
            super().__init__()
            self.mlp = mlp

        def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.mlp(features if mask is None else features * mask)

    keywords = {"features": X.numpy(), "mask": None}  # (None was refused by 25a775a)
    by_keywords = empirical_ntk(Keywords(), keywords, {"features": X[:2].tolist()})
    assert float((by_keywords - K).abs().max()) <= 1e-12 * float(K.abs().max())
    for rows, columns in ((X.tolist(), X[:2].numpy()), (X.numpy(), X[:2].tolist())):
        assert torch.equal(empirical_ntk(mlp, rows, columns), K)
    with torch.no_grad():
        mlp[2].weight.mul_(1e306)
    with pytest.raises(infkit.errors.NonFiniteError, match="the NTK holds NaN or Inf"):
        empirical_ntk(mlp, X)


def test_a_task_given_for_its_model_is_not_checked_for_labels() -> None:
    """A regression Task of two outputs: the placeholder targets the kernel reads its inputs
    with were checked against the task's loss and refused (a reviewer's): the model's inputs
    alone are checked, and the kernel is the module's."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    mlp = mlp.double()
    X = torch.randn(6, 3, dtype=torch.float64)
    K = empirical_ntk(infkit.Task.regression(mlp), X)
    torch.testing.assert_close(K, empirical_ntk(mlp, X), rtol=0, atol=0)
