"""A tracked layer's weight used outside the layer's own calls, a layer the forward pass skips
and one applied to routed rows: the hooks see none of these, so the Kronecker methods refuse
them and `identity` answers by per-example gradients, against plain autograd's (a tester's gated
use, its unused layer and its routed expert; infkit.layers.outside)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from autograd_reference import autograd_gradients
from torch import Tensor, nn

import infkit
from infkit.errors import UnsupportedError
from infkit.evaluate import relative_error

N, T, L2 = 40, 6, 1e-2


# the models here are not trained: their stationarity warnings are not the point
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _data(gate: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Six features and a seventh, the gate, 0 or 1 per training example; the queries' gates 1."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N + T, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N + T,), generator=g)
    gates = torch.cat([gate.double(), torch.ones(T, dtype=torch.float64)])
    X = torch.cat([X, gates[:, None]], 1)
    return (X[:N], y[:N]), (X[N:], y[N:])


class Gated(nn.Module):
    """``a``'s weight is applied outside ``a``'s call too, on the examples whose gate is 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        z, gate = x[:, :6], x[:, 6:]
        return self.head(torch.tanh(self.a(z)) + self.beside(z, gate))

    def beside(self, z: Tensor, gate: Tensor) -> Tensor:
        """The use of ``a``'s weight beside its call (the subclasses' variants of it)."""
        return torch.tanh(F.linear(z * gate, self.a.weight.t()))


class _Product(torch.autograd.Function):
    """h @ w as a fused kernel takes a weight: its own operations run without gradients."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, w: Tensor) -> Tensor:
        return h @ w

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
        h, w = ctx.saved_tensors
        return grad @ w.T, h.transpose(-1, -2) @ grad


class FusedGated(Gated):
    """The gated use through a custom autograd.Function (a reviewer's: unseen by a watch of
    torch functions, identity 0.25 off)."""

    def beside(self, z: Tensor, gate: Tensor) -> Tensor:
        return torch.tanh(_Product.apply(z * gate, self.a.weight))


class GatedUnviewed(Gated):
    """The gated use taking the weight itself (no view): under autocast it shares the layer's
    cached cast of it, one graph node for both (a reviewer's, unseen under bfloat16)."""

    def beside(self, z: Tensor, gate: Tensor) -> Tensor:
        return torch.tanh(F.linear(z * gate, self.a.weight))


class GatedDetachedCall(Gated):
    """The gated use beside a second call of the layer whose output is detached: that call
    uses nothing on the loss's graph (a reviewer's: counted, it hid the use)."""

    def beside(self, z: Tensor, gate: Tensor) -> Tensor:
        stopped = torch.tanh(self.a(z.flip(0))).detach()
        return super().beside(z, gate) + stopped


class UpstreamKeyword(Gated):
    """The gated use upstream of the layer, which is given that input by keyword: the search of
    the call's own nodes stops at keyword inputs too (else it would walk into the use upstream
    and take it for the call's own)."""

    def forward(self, x: Tensor) -> Tensor:
        z, gate = x[:, :6], x[:, 6:]
        up = F.linear(z * gate, self.a.weight.t())
        return self.head(torch.tanh(self.a(input=up)))


class Plain(nn.Module):
    """A 7-6-3 tanh MLP of the features and the gate, every weight used by its layer alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x)))


class Logged(Plain):
    """Reads a tracked weight for a statistic it keeps: no use on the loss's graph."""

    def forward(self, x: Tensor) -> Tensor:
        self.stats = {"a_norm": self.a.weight.norm().item()}
        return super().forward(x)


class Spare(Plain):
    """A Linear layer the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(6, 6)


class Routed(nn.Module):
    """An expert Linear applied to the rows whose gate is 1 only (mixture-of-experts style)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.expert = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        z, routed = x[:, :6], x[:, 6] > 0.5
        h = torch.tanh(self.a(z)).clone()
        h[routed] = h[routed] + torch.tanh(self.expert(h[routed]))
        return self.head(h)


def _products(model: nn.Module, train, test) -> Tensor:
    """identity's IF scores by plain autograd: g_t . (g_j + l2 theta) / N."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    G, Q = autograd_gradients(model, *train), autograd_gradients(model, *test)
    return Q @ (G + L2 * theta).T / N


def _scores_equal_its_twin(model: Plain, method: str, train, test) -> None:
    """``model``'s scores by ``method`` equal those of the same layers as a plain Sequential."""
    twin = nn.Sequential(model.a, nn.Tanh(), model.head)
    scores = [
        infkit.Influence(infkit.Task.classification(m), method, l2=L2, damping=0.1)
        .fit(train)
        .scores(test)
        for m in (model, twin)
    ]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=1e-15)


def _first_five_off() -> Tensor:
    return torch.arange(N) >= 5


@pytest.mark.parametrize("model_class", [Gated, FusedGated, GatedDetachedCall])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("workdir", [False, True])
def test_kronecker_methods_refuse_a_weight_used_outside_its_layer_off_on_first_examples(
    model_class: type[nn.Module], method: str, workdir: bool, tmp_path
) -> None:
    """The first examples' gate is 0, so no gradient of theirs shows the outside use (the check
    by gradients passed, and scores from the hooks were 34% off): the use itself is refused."""
    torch.manual_seed(0)
    train, _ = _data(_first_five_off())
    task = infkit.Task.classification(model_class().double())
    options = {"workdir": str(tmp_path)} if workdir else {}
    with pytest.raises(
        UnsupportedError, match=r"'a' \(1 use in the loss's graph beside [12] calls?"
    ):
        infkit.Influence(task, method, l2=L2, damping=1.0, progress=False, **options).fit(train)


@pytest.mark.parametrize(
    ("model_class", "gate"),
    [
        (Gated, _first_five_off()),
        (FusedGated, _first_five_off()),
        (Spare, torch.ones(N, dtype=torch.bool)),
        # routed: the first examples all, later ones every other: batches of 8 from example 8 on
        (Routed, (torch.arange(N) < 8) | (torch.arange(N) % 2 == 0)),
    ],
)
def test_identity_answers_by_per_example_gradients_where_hooks_do_not_see_every_use(
    model_class: type[nn.Module], gate: Tensor
) -> None:
    torch.manual_seed(0)
    train, test = _data(gate)
    model = model_class().double()
    task = infkit.Task.classification(model)
    inf = infkit.Influence(task, "identity", l2=L2, batch_size=8, progress=False).fit(train)
    assert relative_error(inf.scores(test), _products(model, train, test)) < 1e-10


def test_the_refusal_of_unsupported_error_says_why_a_linear_layer_is_not_tracked() -> None:
    """Two Linear layers sharing one weight: the refusal names the sharing, not only the
    parameters "outside" the nn.Linear layers it factors."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    task = infkit.Task.classification(model.double())
    with pytest.raises(UnsupportedError, match="another module uses their weights: '0'"):
        infkit.Influence(task, "kfac", unsupported="error")


def test_a_weight_read_off_the_losss_graph_is_no_use() -> None:
    """A reviewer's: a forward pass keeping its weight's norm (a statistic, .item()) was refused
    by a watch of torch functions; no gradient term comes of it, so kfac fits and scores as the
    same model without that line, and identity keeps its factored products."""
    torch.manual_seed(0)
    train, test = _data(torch.ones(N, dtype=torch.bool))
    logged = Logged().double()
    _scores_equal_its_twin(logged, "kfac", train, test)
    inf = infkit.Influence(infkit.Task.classification(logged), "identity", l2=L2).fit(train)
    assert inf.method.factored is not None
    assert relative_error(inf.scores(test), _products(logged, train, test)) < 1e-10


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_a_use_outside_is_refused_under_autocast_too(method: str) -> None:
    """Under dtype=torch.bfloat16 the layer's call and a use of the weight beside it share
    autocast's cast of the weight; the graph is read outside autocast."""
    torch.manual_seed(0)
    train, _ = _data(_first_five_off())
    train = (train[0].float(), train[1])
    task = infkit.Task.classification(GatedUnviewed())
    with pytest.raises(UnsupportedError, match=r"'a' \(1 use in the loss's graph beside 1 call"):
        infkit.Influence(task, method, l2=L2, damping=1.0, dtype=torch.bfloat16).fit(train)


def test_a_use_upstream_of_a_layer_given_its_input_by_keyword_is_found() -> None:
    from infkit.layers.outside import uses_outside_calls
    from infkit.layers.tracked import find_modules
    from infkit.parameters import ParameterSpace

    torch.manual_seed(0)
    train, _ = _data(torch.ones(N, dtype=torch.bool))
    model = UpstreamKeyword().double()
    tracked, _ = find_modules(model, ParameterSpace(model))
    found = uses_outside_calls(model, tracked, lambda: model(train[0]).sum())
    assert found == {"a": "1 use in the loss's graph beside 1 call: TBackward0"}


def test_a_layer_given_its_input_by_keyword_is_tracked() -> None:
    """A tracked layer called as self.a(input=h) met a raw IndexError in the Kronecker
    methods' hooks, which read the positional input: it scores as its positional twin."""

    class ByKeyword(Plain):
        def forward(self, x: Tensor) -> Tensor:
            return self.head(input=torch.tanh(self.a(input=x)))

    torch.manual_seed(0)
    train, test = _data(torch.ones(N, dtype=torch.bool))
    _scores_equal_its_twin(ByKeyword().double(), "ekfac", train, test)
