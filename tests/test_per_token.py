"""Per-token and per-module scores are exact decompositions of the sequence scores (§4.4)."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import TinySequenceModel, sequence_data, sequence_loss

import infkit
from infkit.errors import UnsupportedError
from infkit.evaluate import relative_error

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


class PooledClassifier(torch.nn.Module):
    """Token layers, then a mean-pooled linear head (a layer with one position)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinySequenceModel(vocab=4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(x, attention_mask)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))


class TwiceApplied(torch.nn.Module):
    """A hidden layer applied twice (a shared block): its terms are its two calls' positions,
    2T per example, the first call's first."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mix(h))
        return self.out(torch.tanh(self.mix(h) + h))


@pytest.fixture(scope="module")
def sequences() -> dict:
    torch.manual_seed(11)
    model = TinySequenceModel(conv1d=True).double()
    task = infkit.Task(model, sequence_loss, name="tokens")
    train = sequence_data(n=16, seed=1)
    test = sequence_data(n=3, seed=2)
    return {"model": model, "task": task, "train": train, "test": test}


@pytest.mark.parametrize("method", ["ekfac", "exact"])
def test_per_token_scores_sum_to_the_sequence_scores(sequences: dict, method: str) -> None:
    task, train, test = sequences["task"], sequences["train"], sequences["test"]
    inf = infkit.Influence(task, method, l2=1e-2, damping=1e-3, batch_size=5).fit(train)
    S = inf.scores(test)
    tokens = inf.token_scores(test)
    assert tokens.tokens.shape == (3, 16, 5)
    assert relative_error(tokens.total, S) < 1e-10
    # Padding positions contribute nothing; the l2 share is the only non-token part here.
    pad = train[0]["attention_mask"] == 0
    assert float(tokens.tokens[:, pad].abs().max()) < 1e-14
    assert tokens.layers == ["inp", "mix", "out"]
    U = inf.method.precondition_queries(inf.fitted.query_gradients(infkit.data.ExampleSet(test)))
    l2_share = 1e-2 * (U @ inf.fitted.theta) / 16
    assert relative_error(tokens.rest, l2_share.unsqueeze(1).expand(3, 16)) < 1e-10
    # A subset of training sequences.
    part = inf.token_scores(test, indices=[3, 7])
    assert relative_error(part.total, S[:, [3, 7]]) < 1e-10
    assert relative_error(part.tokens, tokens.tokens[:, [3, 7]]) < 1e-12
    # each index once, as scores(among=) and remove() take them (a tester found repeats taken)
    with pytest.raises(infkit.errors.InvalidInputError, match="training index 3 is given twice"):
        inf.token_scores(test, indices=[3, 3])


@pytest.mark.parametrize("streamed", [False, True])
def test_pooled_head_goes_to_the_rest(streamed: bool, tmp_path) -> None:
    """Both ways of splitting: from the preconditioned queries and the cached gradients, and in
    the Kronecker scorer's pass (with a workdir), which hands each layer's terms over as the
    backward reaches it."""
    torch.manual_seed(3)
    model = PooledClassifier().double()
    task = infkit.Task.classification(model)
    x, _ = sequence_data(n=12, seed=4)
    y = torch.randint(0, 2, (12,))
    place = {"workdir": tmp_path} if streamed else {}
    inf = infkit.Influence(task, "kfac", damping=1e-2, **place).fit((x, y))
    tokens = inf.token_scores((x, y))
    assert inf.describe()["query_groups"] == int(streamed)  # the scorer's pass, or none
    assert "head" not in tokens.layers
    assert relative_error(tokens.total, inf.scores((x, y))) < 1e-10
    # positions=1 decomposes the head instead (it sees one position); a count that no layer
    # has would leave every token score 0, and is refused naming the counts there are
    head = inf.token_scores((x, y), positions=1)
    assert head.layers == ["head"] and head.tokens.shape[-1] == 1
    assert relative_error(head.total, tokens.total) < 1e-10
    with pytest.raises(infkit.errors.InvalidInputError, match=r"positions=3 .*theirs: 1, 5"):
        inf.token_scores((x, y), positions=3)


def test_per_module_scores_sum_to_the_scores(sequences: dict) -> None:
    task, train, test = sequences["task"], sequences["train"], sequences["test"]
    inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-3).fit(train)
    parts = inf.module_scores(test)
    assert list(parts) == ["inp", "mix", "out"]
    assert relative_error(sum(parts.values()), inf.scores(test)) < 1e-10
    # With a block-diagonal curvature a layer's score is its influence in isolation.
    m = inf.method
    t = m.tracked_layers().tracked[1]
    idx = m.tracked_layers().layout.flat_index(t)
    Q = inf.fitted.query_gradients(infkit.data.ExampleSet(test))
    V = inf.fitted.train_gradients + 1e-2 * inf.fitted.theta
    Qm = torch.zeros_like(Q)
    Qm[:, idx] = Q[:, idx]
    alone = m.solve(Qm) @ V.T / 16
    assert relative_error(parts["mix"], alone) < 1e-10
    # Any primal method: the layer shares of the exact scores; other parameters by module.
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    task = infkit.Task.classification(model.double())
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    exact = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    shares = exact.module_scores((X[:4], y[:4]))
    assert list(shares) == ["0", "1", "2"]
    assert relative_error(sum(shares.values()), exact.scores((X[:4], y[:4]))) < 1e-10
    with pytest.raises(UnsupportedError, match="with_estimator"):
        exact.with_estimator("rif").module_scores((X[:4], y[:4]))


@pytest.mark.parametrize("positions", [None, 5])
def test_a_layer_applied_twice_keeps_its_calls_in_the_forward_order(positions, tmp_path) -> None:
    """The Kronecker scorer's pass (a workdir) hands a layer's calls over in the backward's
    order, the reverse of the forward's: placed by their forward order, its per-token scores
    are those of the cached path (a reviewer found the two calls' halves swapped)."""
    torch.manual_seed(5)
    task = infkit.Task(TwiceApplied().double(), sequence_loss, name="tokens")
    train, test = sequence_data(n=10, seed=1), sequence_data(n=2, seed=2)
    cached = infkit.Influence(task, "kfac", damping=1e-2).fit(train)
    streamed = infkit.Influence(task, "kfac", damping=1e-2, workdir=tmp_path).fit(train)
    expected = cached.token_scores(test, positions=positions)
    split = streamed.token_scores(test, positions=positions)
    assert streamed.describe()["query_groups"] == 1 and cached.describe()["query_groups"] == 0
    # by default the largest count, the shared layer's 2 x 5; with 5, the others
    assert split.layers == expected.layers == (["mix"] if positions is None else ["inp", "out"])
    assert split.tokens.shape == expected.tokens.shape == (2, 10, positions or 10)
    assert relative_error(split.tokens, expected.tokens) < 1e-10
    assert relative_error(split.rest, expected.rest) < 1e-10
    if positions is None:  # the halves differ, so a swap would show
        halves = expected.tokens[..., :5], expected.tokens[..., 5:]
        assert relative_error(*halves) > 0.1


def test_a_scalar_parameter_is_attributed_and_goes_to_the_rest() -> None:
    """A model with a 0-dimensional parameter (a learned temperature): the fitted state's
    check for changes reshaped its slice of theta with no shape at all and raised a raw
    TypeError at the first per-token call."""
    from lm_helpers import LENGTH, VOCAB, TinyLM

    from infkit import language_modeling as lm

    class Tempered(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.tensor(1.3))

        def forward(self, input_ids, attention_mask=None):  # type: ignore[no-untyped-def]
            return super().forward(input_ids, attention_mask) * self.temperature

    torch.manual_seed(0)
    model = Tempered().double().eval()
    train = lm.examples(torch.randint(0, VOCAB, (8, LENGTH)))
    test = lm.examples(torch.randint(0, VOCAB, (2, LENGTH)))
    inf = infkit.Influence(infkit.Task.language_modeling(model), "exact", l2=0.1)
    with pytest.warns(UserWarning):  # (an untrained model: not at its optimum)
        inf.fit(train)
    split = inf.token_scores(test)
    scores = inf.scores(test)
    assert relative_error(split.tokens.sum(-1) + split.rest, scores) < 1e-12
    # the temperature's share is in the rest: its gradient by hand, the query's solved
    modules = inf.module_scores(test)
    assert relative_error(sum(modules.values()), scores) < 1e-12
    assert float(modules[""].abs().max()) > 0  # the root module's own parameter
